"""The common scheduler keywords are declared once (fewstep.samplers.config): every FewstepScheduler
subclass's ``__init__`` must agree with the tables, names and defaults, mechanically."""

import numpy as np
import pytest
from diffusers.configuration_utils import register_to_config

import fewstep.samplers
from fewstep.samplers import COMMON_CONFIG, EDM_CONFIG, OPTIONAL_CONFIG, DPMSolverPPScheduler, FewstepScheduler
from fewstep.samplers.config import check_config, signature_mismatches

for _name in fewstep.samplers.__all__:  # load every exported scheduler (the package imports lazily)
    getattr(fewstep.samplers, _name)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


SHIPPED = [c for c in _subclasses(FewstepScheduler) if c.__module__.startswith("fewstep.")]


def test_the_shipped_schedulers_are_checked():
    names = {c.__name__ for c in SHIPPED}
    assert {"DPMSolverPPScheduler", "DPMSolverV3Scheduler"} <= names


@pytest.mark.parametrize("cls", SHIPPED, ids=lambda c: c.__name__)
def test_every_scheduler_signature_agrees_with_the_table(cls):
    assert signature_mismatches(cls) == []


def test_the_check_catches_a_drifted_copy():
    """A scheduler that restates karras_rho = 5.0, forgets a common keyword and half-declares EDM."""

    class Drifted(FewstepScheduler):
        @register_to_config
        def __init__(self, num_train_timesteps: int = 1000, karras_rho: float = 5.0, sigma_min=None):
            pass

    problems = "\n".join(signature_mismatches(Drifted))
    assert "karras_rho=5.0, expected 7.0" in problems
    assert "lacks the common keyword 'beta_schedule'" in problems
    assert "EDM_CONFIG" in problems

    class BadOverride(DPMSolverPPScheduler):
        _config_overrides = {"round_timesteps": None}  # the signature says True

    assert any("round_timesteps" in p for p in signature_mismatches(BadOverride))


def test_tables_do_not_overlap_and_a_saved_config_carries_every_common_key():
    assert not (set(COMMON_CONFIG) & set(EDM_CONFIG)) and not (set(COMMON_CONFIG) & set(OPTIONAL_CONFIG))
    cfg = DPMSolverPPScheduler().config
    for key, default in COMMON_CONFIG.items():
        assert cfg[key] == default or (isinstance(default, float) and np.isinf(default) and cfg[key] == default)


@pytest.mark.parametrize("key, value", [("solver_order", 4), ("karras_rho", 0.0), ("timestep_power", -1.0),
                                        ("prediction_type", "noise"), ("timestep_spacing", "cosine"),
                                        ("variance_type", "large"), ("schedule_kind", "ve"), ("rho", 0.0)])
def test_check_config_names_the_key(key, value):
    cfg = dict(DPMSolverPPScheduler().config, **{key: value})
    with pytest.raises(ValueError, match=key):
        check_config(cfg)
