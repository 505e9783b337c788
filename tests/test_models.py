"""Tests of the bundled digits teacher: data split, pipeline, shipped classifier, training script."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from fewstep.models import DigitsPipeline, load_digits_classifier, load_digits_pipeline, load_digits_split
from fewstep.models.digits import split_indices

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_digits_pipeline()


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- data split

def test_split_is_deterministic_disjoint_and_stratified():
    x1, y1 = load_digits_split("train")
    x2, y2 = load_digits_split("train")
    xt, yt = load_digits_split("test")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8)
    assert x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert float(x1.min()) == -1.0 and float(x1.max()) == 1.0
    tr, te = split_indices("train"), split_indices("test")
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 1797
    # stratified: every class has ~20% of its images in the test split
    counts_tr, counts_te = torch.bincount(y1, minlength=10), torch.bincount(yt, minlength=10)
    frac = counts_te.float() / (counts_tr + counts_te).float()
    assert torch.all((frac - 0.2).abs() < 0.02)


def test_split_rejects_unknown_name():
    with pytest.raises(ValueError, match="split"):
        load_digits_split("validation")


# ---------------------------------------------------------------- shipped files

def test_shipped_teacher_files_are_small_and_v_prediction():
    from fewstep.models import pipeline as P

    assert P.UNET_WEIGHTS.stat().st_size < 8e6
    unet_cfg = json.loads(P.UNET_CONFIG.read_text())
    sched_cfg = json.loads(P.SCHEDULER_CONFIG.read_text())
    assert unet_cfg["num_class_embeds"] == 11 and unet_cfg["sample_size"] == 8
    assert not unet_cfg["add_attention"]
    assert not any("Attn" in b for b in unet_cfg["down_block_types"] + unet_cfg["up_block_types"])
    assert sched_cfg["prediction_type"] == "v_prediction"
    assert sched_cfg["num_train_timesteps"] == 1000


# ---------------------------------------------------------------- pipeline

def test_pipeline_loads_offline_and_outputs_images(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fresh = load_digits_pipeline()
    out = fresh(class_labels=[3, 7], num_inference_steps=4, generator=_gen(), output_type="pt")
    assert out.images.shape == (2, 1, 8, 8)
    assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0
    assert out.images.std() > 0.1  # not a constant image
    pil = fresh(class_labels=[3, 7], num_inference_steps=4, generator=_gen()).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "L"
    big = fresh(class_labels=5, num_inference_steps=4, generator=_gen(), upscale=8).images
    assert big[0].size == (64, 64)
    arr = fresh(class_labels=[1], num_inference_steps=4, generator=_gen(), output_type="np").images
    assert arr.shape == (1, 8, 8, 1)
    # pil and pt agree (up to uint8 rounding)
    np.testing.assert_allclose(np.asarray(pil[0]) / 255.0, out.images[0, 0].numpy(), atol=1 / 255 + 1e-6)


def test_same_generator_same_images(pipe):
    a = pipe([0, 1, 2], num_inference_steps=4, generator=_gen(3), output_type="pt").images
    b = pipe([0, 1, 2], num_inference_steps=4, generator=_gen(3), output_type="pt").images
    c = pipe([0, 1, 2], num_inference_steps=4, generator=_gen(4), output_type="pt").images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_save_pretrained_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DigitsPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    a = pipe([4, 9], num_inference_steps=6, guidance_scale=2.0, generator=_gen(1), output_type="pt").images
    b = loaded([4, 9], num_inference_steps=6, guidance_scale=2.0, generator=_gen(1), output_type="pt").images
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler]
)
def test_diffusers_schedulers_drop_in_and_give_right_digits(pipe, classifier, scheduler_cls):
    p = DigitsPipeline(unet=pipe.unet, scheduler=scheduler_cls.from_config(pipe.scheduler.config))
    p.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat(3)
    imgs = p(labels, num_inference_steps=10, guidance_scale=2.0, generator=_gen(), output_type="pt").images
    assert torch.isfinite(imgs).all()
    acc = (classifier(imgs * 2 - 1).argmax(1) == labels).float().mean().item()
    assert acc >= 0.9, f"{scheduler_cls.__name__}: class accuracy {acc:.2f} at 10 steps"


def test_fewstep_scheduler_drops_in(pipe, classifier):
    from fewstep.samplers import DPMSolverPPScheduler

    p = load_digits_pipeline(scheduler=DPMSolverPPScheduler)
    labels = torch.arange(10).repeat(2)
    imgs = p(labels, num_inference_steps=8, guidance_scale=2.0, generator=_gen(), output_type="pt").images
    acc = (classifier(imgs * 2 - 1).argmax(1) == labels).float().mean().item()
    assert acc >= 0.9


def test_ancestral_scheduler_is_reproducible_with_generator(pipe):
    from diffusers import DDPMScheduler

    p = DigitsPipeline(unet=pipe.unet, scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    p.set_progress_bar_config(disable=True)
    a = p([2, 8], num_inference_steps=10, generator=_gen(5), output_type="pt").images
    b = p([2, 8], num_inference_steps=10, generator=_gen(5), output_type="pt").images
    assert torch.equal(a, b)


@pytest.mark.parametrize("guidance_scale, per_step", [(1.0, 1), (0.5, 1), (2.0, 2), (1.5, 2)])
def test_guidance_scale_sets_model_evaluations(pipe, guidance_scale, per_step):
    p = DigitsPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    p.set_progress_bar_config(disable=True)
    calls = []

    def record(module, args, kwargs):
        calls.append((args[0].shape[0], kwargs["class_labels"].tolist()))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        steps, labels = 5, [1, 2, 3]
        out = p(labels, num_inference_steps=steps, guidance_scale=guidance_scale, generator=_gen())
    finally:
        handle.remove()
    assert out.nfe == per_step * steps
    assert len(calls) == steps
    for batch, y in calls:
        assert batch == per_step * len(labels)
        assert y[: len(labels)] == labels
        if per_step == 2:  # the second half is the null class 10
            assert y[len(labels):] == [10] * len(labels)


def test_guidance_combines_cond_and_uncond_linearly(pipe):
    """One DDIM step from pure noise: the guided output equals uncond + w (cond - uncond)."""
    x = torch.randn(2, 1, 8, 8, generator=_gen())
    t = torch.tensor(999)
    y = torch.tensor([6, 0])
    cond = pipe.unet(x, t.expand(2), class_labels=y).sample
    uncond = pipe.unet(x, t.expand(2), class_labels=torch.full_like(y, 10)).sample
    guided, n = pipe._model_output(x, t, y, 3.0)
    assert n == 2
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"class_labels": [3, 10]}, "class_labels"),
        ({"class_labels": [-1]}, "class_labels"),
        ({"class_labels": [2.5]}, "class_labels"),
        ({"class_labels": []}, "class_labels"),
        ({"class_labels": "3"}, "class_labels"),
        ({"class_labels": [1], "num_inference_steps": 0}, "num_inference_steps"),
        ({"class_labels": [1], "num_inference_steps": 2.0}, "num_inference_steps"),
        ({"class_labels": [1], "guidance_scale": float("nan")}, "guidance_scale"),
        ({"class_labels": [1], "output_type": "jpg"}, "output_type"),
        ({"class_labels": [1], "upscale": 0}, "upscale"),
        ({"class_labels": [1], "latents": torch.zeros(2, 1, 8, 8)}, "latents"),
    ],
)
def test_bad_inputs_raise_value_error_naming_argument(pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


def test_load_digits_pipeline_rejects_bad_scheduler():
    with pytest.raises(ValueError, match="scheduler"):
        load_digits_pipeline(scheduler="ddim")


# ---------------------------------------------------------------- classifier

def test_shipped_classifier_is_accurate_on_held_out_split(classifier):
    x, y = load_digits_split("test")
    assert not classifier.training
    logits = classifier(x)
    feats = classifier.features(x)
    assert logits.shape == (360, 10) and feats.shape[0] == 360 and feats.ndim == 2
    acc = (logits.argmax(1) == y).float().mean().item()
    assert acc > 0.97, f"held-out accuracy {acc:.3f}"
    assert torch.equal(feats, classifier.features(x))  # deterministic in eval mode
    meta = json.loads((__import__("fewstep.models.classifier", fromlist=["x"]).CLASSIFIER_CONFIG).read_text())
    assert abs(meta["test_accuracy"] - acc) < 1e-3  # the recorded number is the real one


def test_classifier_rejects_wrong_shape(classifier):
    with pytest.raises(ValueError, match="x must"):
        classifier.features(torch.zeros(2, 1, 16, 16))


# ---------------------------------------------------------------- training script

def test_train_teacher_resumes_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fewstep.models import train as T

    cfg = {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "lr_warmup_steps": 1}
    full = T.train_teacher(cfg, work_dir=tmp_path / "a", output_dir=tmp_path / "a_out", progress=False)
    real_lr = T._lr_at

    def interrupt(step, c):
        if step == 3:
            raise KeyboardInterrupt
        return real_lr(step, c)

    monkeypatch.setattr(T, "_lr_at", interrupt)
    with pytest.raises(KeyboardInterrupt):
        T.train_teacher(cfg, work_dir=tmp_path / "b", output_dir=tmp_path / "b_out", progress=False)
    monkeypatch.setattr(T, "_lr_at", real_lr)
    resumed = T.train_teacher(cfg, work_dir=tmp_path / "b", output_dir=tmp_path / "b_out", progress=False)
    wa = load_file(str(tmp_path / "a_out" / "digits_unet.safetensors"))
    wb = load_file(str(tmp_path / "b_out" / "digits_unet.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full["final_loss_last500"] == resumed["final_loss_last500"]
    with pytest.raises(ValueError, match="unknown key"):
        T.train_teacher({"stepz": 3}, work_dir=tmp_path / "c", progress=False)


def test_train_teacher_snapshots_keep_raw_and_ema_weights_without_changing_them(tmp_path):
    """The LCSC inputs of a teacher run: snapshots every N steps (raw + EMA), the final EMA as a
    diffusers folder; the trained weights are the same with and without snapshots."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from fewstep.distill.checkpoints import list_checkpoints
    from fewstep.models import train as T

    cfg = {"steps": 4, "batch_size": 8, "checkpoint_every": 4, "lr_warmup_steps": 1}
    T.train_teacher(cfg, work_dir=tmp_path / "a", output_dir=tmp_path / "a_out", progress=False, snapshot_every=0)
    T.train_teacher(cfg, work_dir=tmp_path / "b", output_dir=tmp_path / "b_out", progress=False, snapshot_every=3)
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "a" / "final").exists()
    wa = load_file(str(tmp_path / "a_out" / "digits_unet.safetensors"))
    wb = load_file(str(tmp_path / "b_out" / "digits_unet.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    infos = list_checkpoints(tmp_path / "b")
    assert [c.step for c in infos] == [3, 4]  # every 3 steps and the last one
    assert infos[-1].models == ["teacher", "teacher_ema"] and infos[-1].meta["kind"] == "digits-teacher"
    last_ema = load_file(str(infos[-1].path / "teacher_ema.safetensors"))
    assert all(torch.equal(last_ema[k], wb[k]) for k in wb)
    raw = [load_file(str(c.path / "teacher.safetensors")) for c in infos]
    assert not torch.equal(raw[0]["conv_in.weight"], raw[1]["conv_in.weight"])  # trained in between
    assert not torch.equal(raw[1]["conv_in.weight"], wb["conv_in.weight"])  # raw, not the EMA
    final = UNet2DModel.from_pretrained(str(tmp_path / "b" / "final")).state_dict()
    assert all(torch.equal(final[k], wb[k]) for k in wb)
    with pytest.raises(ValueError, match="snapshot_every"):
        T.train_teacher(cfg, work_dir=tmp_path / "c", progress=False, snapshot_every=-1)


def test_train_classifier_resumes_exactly_and_refuses_other_config(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fewstep.models import train as T

    cfg = {"epochs": 2, "batch_size": 256, "checkpoint_every": 1, "width": 8, "feature_dim": 16}
    T.train_classifier(cfg, work_dir=tmp_path / "a", output_dir=tmp_path / "a_out", progress=False)
    real_augment, calls = T._augment, []

    def interrupt(*a, **k):  # stop in the second epoch, after the first epoch's checkpoint
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_augment(*a, **k)

    monkeypatch.setattr(T, "_augment", interrupt)
    with pytest.raises(KeyboardInterrupt):
        T.train_classifier(cfg, work_dir=tmp_path / "b", output_dir=tmp_path / "b_out", progress=False)
    monkeypatch.setattr(T, "_augment", real_augment)
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    T.train_classifier(cfg, work_dir=tmp_path / "b", output_dir=tmp_path / "b_out", progress=False)
    wa = load_file(str(tmp_path / "a_out" / "digits_classifier.safetensors"))
    wb = load_file(str(tmp_path / "b_out" / "digits_classifier.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="different config"):
        T.train_classifier({**cfg, "lr": 1e-3}, work_dir=tmp_path / "b", progress=False)


def test_cli_registers_training_commands():
    from fewstep.apps.cli import build_parser

    args = build_parser().parse_args(["train-teacher", "--steps", "3", "--seed", "1"])
    assert args.steps == 3 and args.seed == 1 and callable(args.func)
    args = build_parser().parse_args(["train-classifier", "--epochs", "2"])
    assert args.epochs == 2
