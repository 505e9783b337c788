"""Distillation of a local diffusers pipeline folder end to end, on tiny SD / SDXL pipelines built from
configs: CD, LCM and LCM-LoRA train a step or two from prompts + an image folder, and their exports
load back the way users load them (LoRA: ``pipe.load_lora_weights`` + ``LCMScheduler``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel
from PIL import Image
from tiny_pipelines import tiny_sd, tiny_sdxl

from fewstep.distill import Trainer, list_checkpoints, load_weights
from fewstep.distill.consistency import ConsistencyScheduler
from fewstep.testing import one_thread

PROMPTS = ["a red square", "a blue circle", "a green line", "a dot"]


def _folder(tmp_path, builder):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    pipe_dir = tmp_path / "pipe"
    builder(scheduler="ddim").save_pretrained(str(pipe_dir))
    return pipe_dir, root


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    with one_thread():
        return _folder(tmp_path_factory.mktemp("sd"), tiny_sd)


def _recipe(pipe_dir, data, **method) -> dict:
    return {"model": {"source": "pipeline", "path": str(pipe_dir)},
            "data": {"prompts": str(data / "prompts.txt"), "images": str(data / "images"), "resolution": 32},
            "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "device": "cpu", "num_threads": 1},
            "checkpoint": {"every": 2}, "eval": {"every": 0}, "tracker": "none",
            "method": {"grid_steps": 10, **method}}


def _latents(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_lcm_lora_loads_into_the_original_pipeline(sd_folder, tmp_path):
    """The exported LoRA, loaded with ``load_lora_weights``, reproduces the trained adapters exactly:
    the UNet output equals the training-time peft model's output; then LCMScheduler samples 2 steps."""
    pipe_dir, data = sd_folder
    run = tmp_path / "lora"
    with one_thread():
        Trainer("lcm-lora", _recipe(pipe_dir, data, lora_rank=4, guidance_range=[2.0, 4.0]), run,
                progress=False).train()
        final = run / "final"
        assert (final / "pytorch_lora_weights.safetensors").is_file()
        pipe = DiffusionPipeline.from_pretrained(str(pipe_dir))
        x, t = _latents(), torch.tensor([500])
        ehs = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
        base = pipe.unet(x, t, encoder_hidden_states=ehs).sample
        pipe.load_lora_weights(str(final))
        loaded = pipe.unet(x, t, encoder_hidden_states=ehs).sample

        from fewstep.distill.sources import PipelineSource

        src = PipelineSource(str(pipe_dir), "cpu", str(data / "prompts.txt"), str(data / "images"), 32)
        from fewstep.distill.sources import LCM_LORA_TARGETS

        trained = src.build_student("lora", lora={"rank": 4, "alpha": 4, "targets": LCM_LORA_TARGETS, "dropout": 0.0})
        trained.load_state_dict(load_weights(list_checkpoints(run)[-1], "student_ema"), strict=False)
        want = trained(x, t, encoder_hidden_states=ehs).sample
        assert (loaded - base).abs().max() > 1e-6  # the adapters changed the UNet
        torch.testing.assert_close(loaded, want, rtol=1e-4, atol=1e-5)

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        out = pipe("a red square", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                   generator=torch.Generator().manual_seed(0), height=32, width=32)
        assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_lcm_exports_a_complete_pipeline(sd_folder, tmp_path):
    pipe_dir, data = sd_folder
    run = tmp_path / "lcm"
    with one_thread():
        Trainer("lcm", _recipe(pipe_dir, data, w_embedding_dim=16, guidance_range=[2.0, 8.0]), run,
                progress=False).train()
        pipe = DiffusionPipeline.from_pretrained(str(run / "final"))
        assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 16
        assert pipe.scheduler.config.original_inference_steps == 10
        info = json.loads((run / "final" / "distill.json").read_text())
        assert info["guidance_range"] == [2.0, 8.0]
        out = pipe("a blue circle", num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0), height=32, width=32)
        assert torch.isfinite(out.images).all()


def test_cd_exports_unet_and_consistency_scheduler(sd_folder, tmp_path):
    pipe_dir, data = sd_folder
    run = tmp_path / "cd"
    with one_thread():
        Trainer("cd", _recipe(pipe_dir, data, solver="heun", guidance=3.0), run, progress=False).train()
        unet = UNet2DConditionModel.from_pretrained(str(run / "final" / "unet"))
        sched = ConsistencyScheduler.from_pretrained(str(run / "final" / "scheduler"))
        assert sched.config.boundary == "cm" and sched.config.prediction_type == "epsilon"
        pipe = DiffusionPipeline.from_pretrained(str(pipe_dir), unet=unet, scheduler=sched)
        out = pipe("a dot", num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0), height=32, width=32)
        assert torch.isfinite(out.images).all()
        ema = load_weights(list_checkpoints(run)[-1], "student_ema")
        assert all(torch.equal(unet.state_dict()[k], ema[k]) for k in ema)


def test_pipeline_data_errors(sd_folder, tmp_path):
    pipe_dir, data = sd_folder
    (tmp_path / "two.txt").write_text("a\nb\n")
    cfg = _recipe(pipe_dir, data)
    cfg["data"]["prompts"] = str(tmp_path / "two.txt")
    with one_thread(), pytest.raises(ValueError, match="2 lines for 4 images"):
        Trainer("cd", cfg, tmp_path / "r1", progress=False).train()
    cfg = _recipe(pipe_dir, data)
    cfg["data"]["images"] = None
    with one_thread(), pytest.raises(ValueError, match="set data.images"):
        Trainer("cd", cfg, tmp_path / "r2", progress=False).train()


@pytest.mark.slow
def test_sdxl_cd_and_lora(tmp_path):
    """SDXL's added conditioning (pooled text + time ids) reaches teacher and student; the LoRA export
    loads with the SDXL pipeline's load_lora_weights."""
    with one_thread():
        pipe_dir, data = _folder(tmp_path, tiny_sdxl)
        Trainer("cd", _recipe(pipe_dir, data, guidance=2.0), tmp_path / "cd", progress=False).train()
        run = tmp_path / "lora"
        Trainer("lcm-lora", _recipe(pipe_dir, data, lora_rank=2), run, progress=False).train()
        pipe = DiffusionPipeline.from_pretrained(str(pipe_dir))
        pipe.load_lora_weights(str(run / "final"))
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        out = pipe("a dot", num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0), height=32, width=32)
        assert torch.isfinite(out.images).all()
