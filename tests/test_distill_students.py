"""Digits students: the guidance-embedding UNet, the student pipeline, and the shipped CD / LCM students
loaded with ``load_digits_pipeline(student=...)``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler
from PIL import Image

from fewstep.distill.consistency import ConsistencyScheduler
from fewstep.models import load_digits_pipeline
from fewstep.models.pipeline import load_digits_scheduler_config, load_digits_teacher_unet
from fewstep.models.students import (
    DigitsStudentPipeline,
    GuidanceUNet2DModel,
    guidance_scale_embedding,
    student_files,
)
from fewstep.testing import one_thread

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([0, 19, 500, 999])
Y = torch.tensor([1, 2, 3, 10])


def test_guidance_unet_starts_as_the_teacher_and_uses_w_once_trained(tmp_path):
    teacher = load_digits_teacher_unet()
    student = GuidanceUNet2DModel.from_teacher(teacher, time_cond_proj_dim=16)
    ref = teacher(X, T, class_labels=Y).sample
    for w in (0.0, 1.0, 3.0):
        emb = guidance_scale_embedding(torch.full((4,), w), 16)
        torch.testing.assert_close(student(X, T, class_labels=Y, timestep_cond=emb).sample, ref, rtol=0, atol=0)
    torch.testing.assert_close(student(X, T, class_labels=Y).sample, ref, rtol=0, atol=0)
    with torch.no_grad():
        student.unet.time_embedding.cond_proj.weight.normal_()
    a = student(X, T, class_labels=Y, timestep_cond=guidance_scale_embedding(torch.zeros(4), 16)).sample
    b = student(X, T, class_labels=Y, timestep_cond=guidance_scale_embedding(torch.ones(4), 16)).sample
    assert (a - b).abs().max() > 1e-3 and (a - ref).abs().max() > 1e-3
    student.save_pretrained(str(tmp_path / "s"))
    back = GuidanceUNet2DModel.from_pretrained(str(tmp_path / "s"))
    torch.testing.assert_close(back(X, T, class_labels=Y, timestep_cond=guidance_scale_embedding(torch.ones(4), 16))
                               .sample, b)
    assert back.config.sample_size == 8 and back.config.in_channels == 1
    back.enable_gradient_checkpointing()  # the memory knob is supported


def test_student_pipeline_lcm_scheduler_equals_consistency_scheduler():
    """A guidance-embedding student with LCM scalings samples the same through diffusers' LCMScheduler and
    fewstep's ConsistencyScheduler (same generator: same re-noising draws)."""
    config = load_digits_scheduler_config()
    unet = GuidanceUNet2DModel.from_teacher(load_digits_teacher_unet(), 16)
    out = []
    with one_thread():
        for sched in (LCMScheduler.from_config(config),
                      ConsistencyScheduler.from_config({**config, "boundary": "lcm"})):
            pipe = DigitsStudentPipeline(unet, sched, guidance_range=(1.0, 3.0))
            res = pipe([1, 5, 7], num_inference_steps=4, guidance_scale=2.0,
                       generator=torch.Generator().manual_seed(3), output_type="pt")
            assert res.nfe == 4
            out.append(res.images)
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_bad_student_names_and_schedulers():
    with pytest.raises(ValueError, match="student='nope' is not a shipped digits student; allowed: cd, lcm"):
        load_digits_pipeline(student="nope")
    if student_files("cd")[0].exists():
        from diffusers import DDIMScheduler

        with pytest.raises(ValueError, match="samples with ConsistencyScheduler"):
            load_digits_pipeline(student="cd", scheduler=DDIMScheduler)
        with pytest.raises(ValueError, match="LCMScheduler only fits"):
            load_digits_pipeline(student="cd", scheduler=LCMScheduler)


@pytest.mark.parametrize("name", ["cd", "lcm"])
def test_shipped_students_generate_like_the_teacher(name):
    from fewstep.eval.fd_digits import load_classifier

    pipe = load_digits_pipeline(student=name)
    labels = list(range(10)) * 3
    clf = load_classifier()
    with one_thread():
        for steps in (1, 2, 4):
            out = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=1.0,
                       generator=torch.Generator().manual_seed(0), output_type="np")
            assert out.images.shape == (30, 8, 8, 1) and out.nfe == steps
            assert 0.0 <= out.images.min() and out.images.max() <= 1.0
            x = torch.from_numpy(out.images).permute(0, 3, 1, 2) * 2 - 1
            acc = (clf(x).argmax(1) == torch.tensor(labels)).float().mean()
            assert acc >= 0.9, (steps, acc)  # the student draws the digits it is asked for
    pil = pipe(class_labels=3, num_inference_steps=1, generator=torch.Generator().manual_seed(0), upscale=8).images
    assert pil[0].size == (64, 64)


def test_shipped_cd_needs_unguided_and_lcm_takes_its_guidance_range():
    cd, lcm = load_digits_pipeline(student="cd"), load_digits_pipeline(student="lcm")
    with pytest.raises(ValueError, match="has no guidance input"):
        cd(class_labels=[1], guidance_scale=2.0)
    lo, hi = lcm.guidance_range
    with one_thread():
        a = lcm([4, 4], num_inference_steps=1, guidance_scale=lo, generator=torch.Generator().manual_seed(0),
                output_type="pt").images
        b = lcm([4, 4], num_inference_steps=1, guidance_scale=hi, generator=torch.Generator().manual_seed(0),
                output_type="pt").images
    assert (a - b).abs().max() > 1e-3  # the w-embedding is used
    with pytest.raises(ValueError, match="outside the range"):
        lcm(class_labels=[1], guidance_scale=hi + 1)


def test_shipped_lcm_samples_with_diffusers_lcm_scheduler_unchanged():
    own = load_digits_pipeline(student="lcm")
    lcm = load_digits_pipeline(student="lcm", scheduler=LCMScheduler)
    assert isinstance(lcm.scheduler, LCMScheduler)
    with one_thread():
        for steps in (1, 2, 4):
            kw = dict(class_labels=[0, 3, 8], num_inference_steps=steps, guidance_scale=1.5, output_type="pt")
            a = own(generator=torch.Generator().manual_seed(1), **kw).images
            b = lcm(generator=torch.Generator().manual_seed(1), **kw).images
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the students in `fewstep sample`
def test_cli_samples_a_student_in_one_step_with_its_own_scheduler(tmp_path):
    """``--model digits-cd`` picks the consistency sampler and no guidance by default; the images equal
    the Python student pipeline's on the same noise (the CLI adds nothing of its own)."""
    from fewstep.apps.cli import main

    out = tmp_path / "cd"
    with one_thread():
        assert main(["sample", "--model", "digits-cd", "--steps", "1", "--n", "4", "--labels", "3,7",
                     "--seed", "5", "--upscale", "1", "--out", str(out), "--no-progress"]) == 0
        record = json.loads((out / "record.json").read_text())
        assert record["nfe"] == 1
        assert record["settings"]["scheduler"] == "consistency" and record["settings"]["guidance"] == "none"
        pipe = load_digits_pipeline(student="cd")
        gen = torch.Generator().manual_seed(5)
        noise = torch.randn(4, 1, 8, 8, generator=gen)
        ref = pipe([3, 7, 3, 7], num_inference_steps=1, guidance_scale=1.0, latents=noise, generator=gen,
                   output_type="np").images
    got = np.stack([np.asarray(Image.open(out / f"{i:06d}.png"), dtype=np.float64) / 255 for i in range(4)])
    assert np.abs(got - np.round(ref[..., 0] * 255) / 255).max() <= 1 / 255 + 1e-9


@pytest.mark.parametrize("argv, message", [
    (["--model", "digits-nope"], "no shipped digits student 'nope'; allowed: digits-cd"),
    (["--model", "digits-cd", "--scheduler", "dpmpp-2m"], "use --scheduler consistency"),
    (["--model", "digits-cd", "--guidance", "apg:scale=3"], "has its guidance built in"),
    (["--model", "digits-cd", "--guidance", "cfg:2"], "has no guidance input"),
])
def test_cli_student_errors_name_the_fix(argv, message, tmp_path, capsys):
    from fewstep.apps.cli import main

    with one_thread():
        rc = main(["sample", *argv, "--steps", "1", "--n", "2", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_demo_generates_with_a_student():
    """The demo's model box takes a student name; its consistency sampler gives one evaluation per image."""
    pytest.importorskip("gradio")
    from fewstep.apps.demo import run_generate

    with one_thread():
        items, status = run_generate("digits-cd", "", "0-9", "consistency", 1, "none", "", "", 0, 4)
    assert len(items) == 4 and "NFE 1</b>" in status
