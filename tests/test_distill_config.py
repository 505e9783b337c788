"""Recipe validation and the ``fewstep distill`` command line: every bad key or value is refused
before anything heavy is loaded, with the key, the value and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewstep.distill.config import apply_overrides, config_differences, incompatible_changes, resolve_config
from fewstep.distill.methods import METHODS, get_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "distill"


def resolve(method: str, cfg: dict) -> dict:
    cls = get_method(method)
    return resolve_config(method, cfg, cls.options, cls.check)


def test_defaults_fill_every_section():
    cfg = resolve("cd", {})
    assert cfg["method"]["name"] == "cd" and cfg["method"]["boundary"] == "cm"
    assert cfg["train"]["batch_size"] == 64 and cfg["eval"]["steps"] == [1, 2, 4]
    assert resolve("lcm", {})["method"]["boundary"] == "lcm"


@pytest.mark.parametrize("cfg,match", [
    ({"trian": {}}, r"unknown key 'trian'; allowed: checkpoint, data, description"),
    ({"train": {"stpes": 3}}, r"unknown key 'train.stpes'; allowed in 'train': adam_betas"),
    ({"train": {"steps": 0}}, r"'train.steps' = 0 is invalid; allowed: an integer >= 1"),
    ({"train": {"steps": 2.5}}, r"'train.steps' = 2.5 is invalid"),
    ({"train": {"lr": "fast"}}, r"'train.lr' = 'fast' is invalid; allowed: a number > 0"),
    ({"train": {"ema_decay": 1.0}}, r"'train.ema_decay' = 1.0 is invalid; allowed: a number >= 0 and < 1"),
    ({"train": {"mixed_precision": "fp8"}}, r"'train.mixed_precision' = 'fp8' is invalid; allowed: one of 'no'"),
    ({"train": {"adam_betas": [0.9]}}, r"'train.adam_betas' = \[0.9\] is invalid \(needs 2 entries\)"),
    ({"train": {"batch_size": 6, "grad_accum": 4}}, r"'train.batch_size' = 6 must be a multiple of train.grad_accum"),
    ({"eval": {"num_samples": 55}}, r"'eval.num_samples' = 55 is invalid \(must be a multiple of 10\)"),
    ({"eval": {"steps": []}}, r"'eval.steps' = \[\] is invalid \(must not be empty\)"),
    ({"method": {"solver": "rk4"}}, r"'method.solver' = 'rk4' is invalid; allowed: one of 'ddim', 'euler', 'heun'"),
    ({"method": {"skip": 60}}, r"'method.skip' = 60 must be <= method.grid_steps = 50"),
    ({"method": {"solver": "scheduler"}}, r"'method.solver_scheduler' is required"),
    ({"method": {"solver": "scheduler", "solver_scheduler": "Nope"}}, r"'Nope' is not a scheduler class"),
    ({"method": {"solver_scheduler": "DPMSolverPPScheduler"}}, r"needs method.solver = 'scheduler'"),
    ({"method": {"guidance_range": [1, 2]}}, r"unknown key 'method.guidance_range'; allowed in 'method'"),
    ({"method": {"name": "lcm"}}, r"'method.name' = 'lcm' does not match the method 'cd'"),
    ({"model": {"source": "pipeline"}}, r"'model.path' is required"),
    ({"model": {"source": "pipeline", "path": "/nonexistent"}}, r"'model.path' = '/nonexistent' is not a diffusers"),
    ({"data": {"prompts": "p.txt"}}, r"belong to model.source = 'pipeline'"),
    ({"tracker": "wandb"}, r"'tracker' = 'wandb' is invalid; allowed: one of 'tensorboard', 'none'"),
    ({"train": {"use_8bit_adam": True}}, r"needs the bitsandbytes package"),
])
def test_bad_cd_configs(cfg, match):
    pytest.importorskip("tensorboard")
    if "bitsandbytes" in match:
        try:
            import bitsandbytes  # noqa: F401
            pytest.skip("bitsandbytes is installed")
        except ImportError:
            pass
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        resolve("cd", cfg)


def test_method_specific_checks():
    with pytest.raises(ValueError, match=r"'method.guidance_range' = \[3.0, 2.0\] is invalid \(needs low <= high\)"):
        resolve("lcm", {"method": {"guidance_range": [3.0, 2.0]}})
    with pytest.raises(ValueError, match="uniform grid"):
        resolve("lcm", {"method": {"grid_spacing": "logsnr"}})
    with pytest.raises(ValueError, match=r"'method.target_ema'"):
        resolve("lcm-lora", {"method": {"target_ema": 0.9}})  # LCM-LoRA has no target network
    with pytest.raises(ValueError, match=r"method 'dmd' is not supported; allowed: cd, (.*, )?lcm, lcm-lora"):
        get_method("dmd")


def test_overrides_and_resume_compatibility():
    cfg = apply_overrides({"train": {"lr": 1e-4}}, ["train.lr=2e-4", "method.solver=heun", "description=a b"])
    assert cfg == {"train": {"lr": 2e-4}, "method": {"solver": "heun"}, "description": "a b"}
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    a, b = resolve("cd", {}), resolve("cd", {"train": {"steps": 10}, "eval": {"every": 3}, "method": {"skip": 2}})
    assert config_differences(a, b) == ["eval.every", "method.skip", "train.steps"]
    assert incompatible_changes(a, b) == ["method.skip"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path, tmp_path):
    data = json.loads(path.read_text())
    method = path.name.split("_")[0]
    assert method in METHODS
    if data.get("model", {}).get("source") == "pipeline":  # placeholder paths: point them at stand-ins
        (tmp_path / "model_index.json").write_text("{}")
        (tmp_path / "p.txt").write_text("a prompt\n")
        data["model"]["path"], data["data"]["prompts"], data["data"]["images"] = (
            str(tmp_path), str(tmp_path / "p.txt"), str(tmp_path))
    resolve(method, data)


def test_cli_reports_bad_config_without_training(tmp_path, capsys):
    from fewstep.apps.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"batch_size": -1}}))
    assert main(["distill", "cd", "--config", str(bad), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "fewstep distill: error: config key 'train.batch_size' = -1 is invalid" in err
    assert not (tmp_path / "run").exists()
    assert main(["distill", "dmd", "--output", str(tmp_path / "run")]) == 2
    assert "method 'dmd' is not supported" in capsys.readouterr().err
    assert main(["distill", "cd", "--set", "train.lr=-1", "--output", str(tmp_path / "run")]) == 2
    assert "'train.lr' = -1" in capsys.readouterr().err
    assert main(["distill", "cd", "--config", str(tmp_path / "missing.json"), "--output", str(tmp_path / "r")]) == 2
