"""fewstep.samplers.registry: one entry per short name, registration from outside, the old path's shim."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from fewstep.samplers import registry as reg
from fewstep.samplers.registry import SchedulerEntry, get_entry, make_scheduler, register_scheduler, scheduler_names

DIGITS_CONFIG = {
    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
    "timestep_spacing": "trailing", "_class_name": "DDPMScheduler",
}


def test_every_entry_builds_with_its_preset_and_names_its_class():
    for entry in reg.SCHEDULERS:
        assert entry.name == entry.name.lower() and " " not in entry.name
        assert entry.source in ("fewstep", "diffusers"), entry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # dpm-v3 without EMS falls back, with a warning
            s = entry.build(DIGITS_CONFIG)
        assert type(s).__name__ == entry.class_name
        for key, value in entry.preset.items():  # the preset is what makes the variant
            assert s.config[key] == value, (entry.name, key)
        assert s.config.prediction_type == "v_prediction"  # the pipeline's config carries over


def test_adding_a_short_name_is_one_entry(monkeypatch, capsys):
    """A new entry is listed, built and reachable from `fewstep sample` like the built-in ones."""
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))  # undone after the test
    entry = register_scheduler(SchedulerEntry("ddim-trailing", "fewstep.samplers.DPMSolverPPScheduler",
                                              "DDIM on the trailing grid", {"solver_order": 1,
                                                                            "timestep_spacing": "trailing"}))
    assert scheduler_names()[-1] == "ddim-trailing" and get_entry("ddim-trailing") is entry
    s = make_scheduler("ddim-trailing", {**DIGITS_CONFIG, "timestep_spacing": "leading"})
    assert s.config.solver_order == 1 and s.config.timestep_spacing == "trailing"
    assert "ddim-trailing" in reg.describe()
    from fewstep.apps.cli import main

    assert main(["sample", "--list-schedulers"]) == 0
    assert "DDIM on the trailing grid" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already registered"):
        register_scheduler(SchedulerEntry("ddim", "diffusers.DDIMScheduler", "x"))
    for bad in ("Upper", "a b", "x:y", ""):
        with pytest.raises(ValueError, match="lower-case"):
            register_scheduler(SchedulerEntry(bad, "diffusers.DDIMScheduler", "x"))
    with pytest.raises(ValueError, match=r"'solver_ordre'.*not accepted"):
        make_scheduler("ddim-trailing", DIGITS_CONFIG, {"solver_ordre": 2})


def test_old_import_path_warns_and_gives_the_same_objects():
    with pytest.warns(DeprecationWarning, match="fewstep.samplers.registry.make_scheduler"):
        from fewstep.apps.schedulers import make_scheduler as old
    assert old is make_scheduler
    with pytest.warns(DeprecationWarning, match="fewstep.apps.common.load_model moved to fewstep.apps.loading"):
        from fewstep.apps.common import load_model
    from fewstep.apps.loading import load_model as new

    assert load_model is new
    with pytest.warns(DeprecationWarning, match="fewstep.guidance.spec.parse_guidance"):
        from fewstep.apps.common import parse_guidance
    assert parse_guidance("cfg:3").scale == 3.0
    with pytest.raises(ImportError):
        from fewstep.apps.common import GUIDANCE_REGISTRY  # noqa: F401  (never existed)


def test_registry_and_spec_import_without_torch():
    """The CLI validates names before it imports torch: the registry and the spec parser must not pull it in."""
    code = ("import sys\n"
            "import fewstep.samplers.registry, fewstep.guidance.spec, fewstep.apps.options, fewstep.apps.cli\n"
            "from fewstep.apps.cli import build_parser\n"
            "build_parser()\n"
            "heavy = [m for m in ('torch', 'diffusers', 'gradio', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
