"""f-distill and DisBack on a tiny text-conditioned SD pipeline built from a config: one training
step each (a DisBack run: one degradation step, one backtracking step), and the exported one-step
student loads back into the original pipeline class with a ConsistencyScheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from test_distill_sd import _recipe, sd_folder  # noqa: F401  (fixture)

from fewstep.distill import Trainer, list_checkpoints, load_weights
from fewstep.distill.consistency import ConsistencyScheduler
from fewstep.testing import one_thread


@pytest.mark.parametrize("method,extra,steps", [
    ("fdistill", {"f": "js", "gan_weight": 1e-3, "guidance": 1.5}, 1),
    ("disback", {"f": "kl", "degradation_steps": 1, "degradation_every": 1, "backtrack_every": 1}, 2),
])
def test_sd_one_step_student_loads_into_the_pipeline(sd_folder, tmp_path, method, extra, steps):  # noqa: F811
    pipe_dir, data = sd_folder
    cfg = _recipe(pipe_dir, data, critic_repeat=1, **extra)
    cfg["method"].pop("grid_steps")
    cfg["train"]["steps"] = steps
    cfg["checkpoint"]["every"] = steps
    run = tmp_path / method
    with one_thread():
        tr = Trainer(method, cfg, run, progress=False)
        tr.train()
        assert tr.raw["critic"].head is not None  # the ratio needs the discriminator
        unet = UNet2DConditionModel.from_pretrained(str(run / "final" / "unet"))
        sched = ConsistencyScheduler.from_pretrained(str(run / "final" / "scheduler"))
        assert sched.config.step_timesteps == {"1": [999]} and sched.config.boundary == "cm"
        ema = load_weights(list_checkpoints(run)[-1], "generator_ema")
        assert all(torch.equal(unet.state_dict()[k], ema[k]) for k in ema)
        pipe = DiffusionPipeline.from_pretrained(str(pipe_dir), unet=unet, scheduler=sched)
        out = pipe("a dot", num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0), height=32, width=32)
        assert torch.isfinite(out.images).all()
    if method == "disback":
        assert (run / "degradation" / "path-001.safetensors").exists()
