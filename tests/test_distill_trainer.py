"""The shared distillation trainer on the digits teacher: bit-exact resume, gradient accumulation,
checkpoint listing for LCSC, evaluation, plots, trackers, memory knobs, export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fewstep.distill import EMA, DataOrder, Trainer, list_checkpoints, load_weights, read_log
from fewstep.distill.checkpoints import latest_resumable


def tiny(**over) -> dict:
    """A tiny CD recipe: batch 8, 6 steps, checkpoints every 2, no evaluation, no tracker."""
    cfg = {"train": {"steps": 6, "batch_size": 8, "lr": 2e-4, "num_threads": 1, "log_every": 2, "device": "cpu"},
           "checkpoint": {"every": 2, "keep_last": 2},
           "eval": {"every": 0},
           "tracker": "none",
           "method": {"grid_steps": 20}}
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            cfg.setdefault(section, {})[name] = value
        else:
            cfg[section] = value
    return cfg


def losses(run) -> list[float]:
    return [r["loss/student"] for r in read_log(run) if r["kind"] == "train"]


class Stop(Exception):
    pass


def _stop_at(step):
    def hook(trainer, done, row):
        if done == step:
            raise Stop

    return hook


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    summary = Trainer("cd", tiny(), run, progress=False).train()
    return run, summary


def test_resume_after_interrupt_is_bit_exact(full_run, tmp_path):
    run_a, _ = full_run
    run_b = tmp_path / "b"
    with pytest.raises(Stop):
        Trainer("cd", tiny(), run_b, progress=False, hooks=[_stop_at(3)]).train()
    assert latest_resumable(run_b).step == 2
    Trainer("cd", tiny(), run_b, resume=True, progress=False).train()
    for name in ("student", "student_ema", "target"):
        a = load_weights(list_checkpoints(run_a)[-1], name)
        b = load_weights(list_checkpoints(run_b)[-1], name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert losses(run_a) == losses(run_b)  # the interrupted step 3 was redone, not logged twice
    assert [r["step"] for r in read_log(run_b)] == list(range(1, 7))


def test_checkpoints_are_listed_and_loadable_one_at_a_time(full_run):
    run, _ = full_run
    cps = list_checkpoints(run)
    assert [c.step for c in cps] == [2, 4, 6]
    assert [c.resumable for c in cps] == [False, True, True]  # keep_last = 2 training states
    assert all({"student", "student_ema", "target"} <= set(c.models) for c in cps)
    first, last = load_weights(cps[0], "student_ema"), load_weights(cps[-1], "student_ema")
    assert any(not torch.equal(first[k], last[k]) for k in first)
    from fewstep.models.pipeline import load_digits_teacher_unet

    unet = load_digits_teacher_unet()
    unet.load_state_dict(first)  # a full state dict of the student's architecture
    assert cps[0].meta["step"] == 2
    with pytest.raises(FileNotFoundError, match="holds no weights 'fake'"):
        load_weights(cps[0], "fake")


def test_gradient_accumulation_gives_the_same_losses(full_run, tmp_path):
    """The global batch is drawn once and split: 2 accumulation micro-batches of 4 = 1 batch of 8."""
    run_a, _ = full_run
    run_b = tmp_path / "accum"
    Trainer("cd", tiny(train__grad_accum=2), run_b, progress=False).train()
    torch.testing.assert_close(torch.tensor(losses(run_b)), torch.tensor(losses(run_a)), rtol=2e-5, atol=1e-7)


def test_existing_run_needs_resume_and_a_compatible_config(full_run, tmp_path):
    run, _ = full_run
    with pytest.raises(ValueError, match="--resume"):
        Trainer("cd", tiny(), run, progress=False)
    with pytest.raises(ValueError, match="method.skip"):
        Trainer("cd", tiny(method={"grid_steps": 20, "skip": 2}), run, resume=True, progress=False)
    cosine = tmp_path / "cosine"
    Trainer("cd", tiny(train__steps=2, train__lr_schedule="cosine"), cosine, progress=False).train()
    with pytest.raises(ValueError, match="LR schedule depends on it"):
        Trainer("cd", tiny(train__steps=4, train__lr_schedule="cosine"), cosine, resume=True, progress=False)
    # more steps with a constant LR is fine: the run continues from step 6
    longer = tmp_path / "longer"
    import shutil

    shutil.copytree(run, longer)
    Trainer("cd", tiny(train__steps=8), longer, resume=True, progress=False).train()
    assert [c.step for c in list_checkpoints(longer)] == [2, 4, 6, 8]


@pytest.mark.filterwarnings("ignore:only 20 generated images")
def test_evaluation_plot_summary_and_tensorboard(tmp_path):
    run = tmp_path / "eval"
    summary = Trainer("cd", tiny(train__steps=4, eval={"every": 2, "num_samples": 20, "steps": [1, 2],
                                                      "teacher_reference": True},
                                 tracker="tensorboard"), run, progress=False).train()
    rows = read_log(run)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(math.isfinite(r["fd/1"]) and 0 <= r["acc/2"] <= 1 for r in evals)
    assert [r for r in rows if r["kind"] == "teacher"][0]["teacher_ddim50/fd"] > 0
    assert (run / "plots" / "curves.png").stat().st_size > 10_000
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    assert summary["last_eval"] == {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
    assert summary["memory"]["cpu_max_rss_mb"] > 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_export_is_a_digits_student_pipeline(full_run):
    """final/ holds the EMA student in the shipped-student format; its pipeline generates like the
    teacher's and its 1-step output is the consistency function of the EMA weights."""
    from fewstep.models.students import load_digits_student_pipeline

    run, _ = full_run
    pipe = load_digits_student_pipeline("cd", weights_dir=run / "final")
    out = pipe(class_labels=[0, 1, 2], num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (3, 8, 8, 1) and out.nfe == 2
    assert 0 <= out.images.min() and out.images.max() <= 1
    ema = load_weights(list_checkpoints(run)[-1], "student_ema")
    assert all(torch.equal(pipe.unet.state_dict()[k], ema[k]) for k in ema)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(class_labels=[0], guidance_scale=2.0)


def test_gradient_checkpointing_changes_nothing_but_memory(full_run, tmp_path):
    run_a, _ = full_run
    run_b = tmp_path / "gc"
    Trainer("cd", tiny(train__steps=2, train__gradient_checkpointing=True), run_b, progress=False).train()
    torch.testing.assert_close(torch.tensor(losses(run_b)), torch.tensor(losses(run_a)[:2]), rtol=1e-6, atol=0)


def test_bf16_mixed_precision_and_half_teacher_run(tmp_path):
    run = tmp_path / "bf16"
    Trainer("cd", tiny(train__steps=2, train__mixed_precision="bf16", model={"teacher_dtype": "bf16"}), run,
            progress=False).train()
    assert all(math.isfinite(v) for v in losses(run))


@pytest.mark.parametrize("method,extra", [
    ("lcm", {"guidance_range": [1.0, 2.0], "w_embedding_dim": 16}),
    ("lcm-lora", {"lora_rank": 4, "guidance_range": [1.5, 1.5]}),
    ("cd", {"solver": "heun", "skip": 2, "loss": "l2", "target_ema": 0.0}),
])
def test_methods_train_and_export(method, extra, tmp_path):
    from fewstep.models.students import GuidanceUNet2DModel, load_digits_student_pipeline

    run = tmp_path / method
    cfg = tiny(train__steps=2, checkpoint={"every": 2}, method={"grid_steps": 20, **extra})
    summary = Trainer(method, cfg, run, progress=False).train()
    assert all(math.isfinite(v) for v in losses(run))
    name = method.replace("-", "_")
    pipe = load_digits_student_pipeline(name, weights_dir=run / "final")
    info = json.loads((run / "final" / f"digits_{name}.json").read_text())
    if method == "lcm":
        assert isinstance(pipe.unet, GuidanceUNet2DModel) and pipe.guidance_range == (1.0, 2.0)
        pipe(class_labels=[3], num_inference_steps=1, guidance_scale=1.5)
        with pytest.raises(ValueError, match="outside the range"):
            pipe(class_labels=[3], guidance_scale=3.0)
    if method == "lcm-lora":
        # adapters only are trained; the export merges them into a plain UNet (no guidance input)
        trained = summary["trainable_parameters"]["student"]
        assert 0 < trained < summary["num_parameters"]["student"] / 5
        assert pipe.guidance_range is None and info["training"]["trained_guidance_range"] == [1.5, 1.5]
        assert not any("lora" in k for k in pipe.unet.state_dict())
    assert pipe(class_labels=[1, 2], num_inference_steps=2, output_type="pt").images.shape == (2, 1, 8, 8)


def test_lora_checkpoints_hold_adapters_only(tmp_path):
    run = tmp_path / "lora"
    Trainer("lcm-lora", tiny(train__steps=2, checkpoint={"every": 2}, method={"grid_steps": 20, "lora_rank": 2}),
            run, progress=False).train()
    sd = load_weights(list_checkpoints(run)[-1], "student")
    assert sd and all("lora_" in k for k in sd)


def test_data_order_resumes_and_covers_each_epoch():
    a = DataOrder(10, seed=3)
    first = a.take(7)
    state = a.state_dict()
    rest = a.take(13)
    b = DataOrder(10, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b.take(13), rest)
    assert sorted(torch.cat([first, rest[:3]]).tolist()) == list(range(10))  # epoch 0 is a permutation
    with pytest.raises(ValueError, match="items"):
        DataOrder(11, 3).load_state_dict(state)


def test_ema_rate_update_and_exact_swap():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=True)
    assert ema.rate() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], before["weight"] + 0.9)
    current = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        torch.testing.assert_close(model.weight, ema.shadow["weight"])
    assert all(torch.equal(model.state_dict()[k], current[k]) for k in current)


def test_saved_files_are_complete(full_run):
    run, summary = full_run
    last = list_checkpoints(run)[-1]
    for f in ("training_state.pt", "rng-rank0.pt", "meta.json", "student.safetensors"):
        assert (last.path / f).is_file()
    assert not list((run / "checkpoints").glob(".tmp-*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["method"]["name"] == "cd" and "torch" in cfg["versions"]
    assert load_file(str(run / "final" / "digits_cd_unet.safetensors"))
    assert summary["world_size"] == 1


def test_damaged_checkpoint_names_the_file_and_the_fix(full_run, tmp_path):
    """A truncated checkpoint file (a disk filled up, a copy cut short) is a ValueError that names the
    file and says to delete that checkpoint folder; after that, --resume continues from the previous one."""
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(full_run[0], run)
    last = latest_resumable(run)
    f = last.path / "student.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"student\.safetensors.*unreadable.*rm -r .*--resume"):
        Trainer("cd", tiny(train__steps=8), run, resume=True, progress=False).train()
    shutil.rmtree(last.path)
    Trainer("cd", tiny(train__steps=8), run, resume=True, progress=False).train()
    assert [c.step for c in list_checkpoints(run)][-1] == 8
