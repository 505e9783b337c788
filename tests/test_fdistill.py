"""f-distill and DisBack on the shared trainer (digits teacher): the two-time-scale update, the
one-step generator and its export, DisBack's degradation path and backtracking schedule, recipes and
config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.distill import Trainer, resolve_config
from fewstep.distill.config import load_config_file
from fewstep.distill.methods import get_method
from fewstep.distill.methods.distribution import DisBack, DiscriminatorHead, FDistill
from fewstep.testing import one_thread

ROOT = Path(__file__).resolve().parents[1]


def _recipe(steps=2, **method) -> dict:
    return {"train": {"steps": steps, "batch_size": 8, "lr": 1e-4, "device": "cpu", "num_threads": 1,
                      "ema_decay": 0.9},
            "checkpoint": {"every": steps}, "eval": {"every": 0}, "tracker": "none",
            "method": {"critic_repeat": 2, **method}}


def test_fdistill_trains_critic_more_often_and_exports_a_one_step_student(tmp_path):
    """Each iteration runs critic_repeat critic updates and one generator update; the generator
    changes, the teacher does not; the export loads as a DigitsStudentPipeline whose 1-step output is
    the EMA generator's G(z)."""
    from fewstep.distill.sources import DigitsSource
    from fewstep.models.students import load_digits_student_pipeline

    calls = []
    run = tmp_path / "js"
    with one_thread():
        tr = Trainer("fdistill", _recipe(f="js"), run, progress=False)
        orig = FDistill.loss

        def spy(self, phase, batch, step):
            calls.append((step, phase.name))
            return orig(self, phase, batch, step)

        FDistill.loss = spy
        try:
            tr.train()
        finally:
            FDistill.loss = orig
        assert calls == [(0, "critic"), (0, "critic"), (0, "generator"), (1, "critic"), (1, "critic"),
                         (1, "generator")]
        teacher = DigitsSource("cpu").teacher
        assert all(torch.equal(a, b) for a, b in zip(tr.source.teacher.state_dict().values(),
                                                     teacher.state_dict().values()))
        gen = tr.raw["generator"]
        assert any(not torch.equal(a, b) for a, b in zip(gen.state_dict().values(), teacher.state_dict().values()))
        assert tr.raw["critic"].head is not None
        pipe = load_digits_student_pipeline("fdistill", weights_dir=run / "final")
        info = json.loads((run / "final" / "digits_fdistill.json").read_text())
        assert info["training"]["f"] == "js" and info["scheduler"]["step_timesteps"] == {"1": [999]}
        labels = torch.tensor([3, 7])
        z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
        out = pipe(labels, num_inference_steps=1, latents=z.clone(), output_type="pt").images
        with tr.ema.applied(gen), torch.no_grad():
            ref = tr.method.generate(gen.eval(), z, {"class_labels": labels})
        torch.testing.assert_close(out, ((ref.clamp(-1, 1) + 1) / 2), atol=1e-5, rtol=1e-5)


def test_generator_starts_as_the_teachers_one_step_denoiser():
    """G(z) = f(z, t_gen) with CM scalings is, at initialisation, the teacher's x0 prediction at t_gen
    (to within c_skip ~ alpha^2 / sigma_ve^2 ~ 1e-9 at t = 999)."""
    from fewstep.distill.sources import DigitsSource
    from fewstep.schedule import to_x0_eps

    with one_thread():
        src = DigitsSource("cpu")
        cfg = resolve_config("fdistill", {"tracker": "none"}, FDistill.options, FDistill.check)

        class Acc:
            device = torch.device("cpu")
            num_processes = 1

            def autocast(self):
                import contextlib

                return contextlib.nullcontext()

        m = FDistill(cfg, src, Acc())
        models = m.build()
        z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        cond = {"class_labels": torch.arange(4)}
        with torch.no_grad():
            x = m.generate(models["generator"], z, cond)
            raw = src.call(src.teacher, z, torch.full((4,), 999.0), cond)
            a, s = float(src.schedule.alpha(999.0)), float(src.schedule.sigma(999.0))
            x0 = to_x0_eps(raw, z, a, s, src.prediction_type)[0]
        torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)
        assert m.uses_discriminator()  # js reads the ratio
        assert isinstance(models["critic"].head, DiscriminatorHead)


def test_rkl_without_gan_has_no_discriminator_and_bad_options_are_named(tmp_path):
    cfg = resolve_config("fdistill", {"tracker": "none", "method": {"f": "rkl", "gan_weight": 0}},
                         FDistill.options, FDistill.check)
    assert cfg["method"]["discriminator"] == "auto"
    with pytest.raises(ValueError, match="'method.discriminator' = 'off' needs method.f = 'rkl'"):
        resolve_config("fdistill", {"method": {"f": "js", "discriminator": "off"}}, FDistill.options,
                       FDistill.check)
    with pytest.raises(ValueError, match="'method.f' = 'tv' is invalid"):
        resolve_config("fdistill", {"method": {"f": "tv"}}, FDistill.options, FDistill.check)
    with pytest.raises(ValueError, match="'method.degradation_steps' = 30 must be a multiple"):
        resolve_config("disback", {"method": {"degradation_steps": 30, "degradation_every": 20}},
                       DisBack.options, DisBack.check)
    with pytest.raises(ValueError, match="leaves no stage-2 step"):
        resolve_config("disback", {"train": {"steps": 40}, "method": {"degradation_steps": 40,
                                                                      "degradation_every": 20}},
                       DisBack.options, DisBack.check)
    with one_thread():
        tr = Trainer("fdistill", _recipe(steps=1, f="rkl", gan_weight=0.0, critic_repeat=1), tmp_path / "r",
                     progress=False)
        tr.train()
    assert tr.raw["critic"].head is None


def test_disback_schedule_follows_the_paper_rule():
    """Stage 2 starts one checkpoint back from the most degraded s_N, moves one back every
    backtrack_every generator steps and stays on the teacher (index 0)."""
    cfg = resolve_config("disback", {"train": {"steps": 1000}, "method": {"degradation_steps": 300,
                                                                          "degradation_every": 100,
                                                                          "backtrack_every": 50}},
                         DisBack.options, DisBack.check)
    m = DisBack.__new__(DisBack)
    m.opts = cfg["method"]
    assert m.num_path == 3
    got = [m.target_index(s) for s in (300, 349, 350, 399, 400, 449, 450, 999)]
    assert got == [2, 2, 1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="stage 1"):
        m.target_index(299)


def test_disback_records_the_path_then_backtracks_to_the_teacher(tmp_path):
    """Stage 1 leaves the generator unchanged and writes s_1..s_N (the fake score at those steps);
    stage 2 starts with the fake score at s_N and the real score loaded from s_{N-1}, and the last
    generator steps use the teacher itself."""
    from safetensors.torch import load_file

    seen = []

    def hook(trainer, step, row):
        m = trainer.method
        if step > m.opts["degradation_steps"]:
            seen.append((step, m.target_index(step - 1), m.real_model(step - 1) is m.source.teacher))
        if step == m.opts["degradation_steps"]:
            seen.append(("gen_unchanged", all(torch.equal(a, b) for a, b in zip(
                trainer.raw["generator"].state_dict().values(), m.source.teacher.state_dict().values()))))
            last = load_file(str(m.path_file(m.num_path)))
            seen.append(("fake_is_sN", all(torch.equal(v, last[k]) for k, v in
                                           trainer.raw["critic"].fake.state_dict().items())))

    run = tmp_path / "db"
    with one_thread():
        tr = Trainer("disback", _recipe(steps=6, critic_repeat=1, degradation_steps=2, degradation_every=1,
                                        backtrack_every=2), run, progress=False, hooks=[hook])
        tr.train()
    assert sorted(p.name for p in (run / "degradation").iterdir()) == ["path-001.safetensors",
                                                                        "path-002.safetensors"]
    assert seen[:2] == [("gen_unchanged", True), ("fake_is_sN", True)]
    assert seen[2:] == [(3, 1, False), (4, 1, False), (5, 0, True), (6, 0, True)]
    p1 = load_file(str(run / "degradation" / "path-001.safetensors"))
    assert all(torch.equal(v, p1[k]) for k, v in tr.method.real.state_dict().items())
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [sorted(k for k in r if k.startswith("loss/")) for r in rows if r["kind"] == "train"][:3] == \
        [["loss/degrade"], ["loss/degrade"], ["loss/critic", "loss/generator"]]
    assert (run / "final" / "digits_disback.json").exists()


@pytest.mark.slow
def test_fdistill_resume_is_bit_exact(tmp_path):
    """A run killed after step 2 and resumed gives the same weights as an uninterrupted one (ratio
    bins, critic and both optimizers included)."""
    import subprocess
    import sys

    cfg = _recipe(steps=4, f="kl", ratio_normalization=True, ratio_ema_rate=0.5)
    cfg["checkpoint"]["every"] = 2
    (tmp_path / "r.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "fewstep.apps.cli", "distill", "fdistill", "--config", str(tmp_path / "r.json"),
           "--no-progress"]
    env = {**__import__("os").environ, "FEWSTEP_DISTILL_CRASH_AT": "2", "OMP_NUM_THREADS": "1"}
    crashed = subprocess.run(cmd + ["--output", str(tmp_path / "a")], env=env, capture_output=True)
    assert crashed.returncode == 17
    env.pop("FEWSTEP_DISTILL_CRASH_AT")
    subprocess.run(cmd + ["--output", str(tmp_path / "a"), "--resume"], env=env, check=True, capture_output=True)
    subprocess.run(cmd + ["--output", str(tmp_path / "b")], env=env, check=True, capture_output=True)
    from fewstep.distill import list_checkpoints, load_weights

    for model in ("generator", "generator_ema", "critic", "ratio_bins"):
        a = load_weights(list_checkpoints(tmp_path / "a")[-1], model)
        b = load_weights(list_checkpoints(tmp_path / "b")[-1], model)
        assert all(torch.equal(a[k], b[k]) for k in a), model


@pytest.mark.parametrize("name", ["fdistill", "disback"])
def test_recipes_resolve(name):
    cfg = load_config_file(ROOT / "configs" / "distill" / f"{name}_digits.json")
    cls = get_method(name)
    out = resolve_config(name, cfg, cls.options, cls.check)
    assert out["export"]["name"] == name
    sd = load_config_file(ROOT / "configs" / "distill" / f"{name}_sd15.json")
    assert sd["model"]["source"] == "pipeline" and sd["method"]["guidance"] > 1


@pytest.mark.parametrize("name,method", [("fdistill", "fdistill"), ("disback", "disback")])
def test_shipped_one_step_students_draw_the_asked_digits(name, method):
    """The shipped students load offline by name, take one model call per image and draw the class
    they are asked for (the benchmark measures FD and diversity; this checks the files and wiring)."""
    from fewstep.eval.fd_digits import load_classifier
    from fewstep.models import load_digits_pipeline
    from fewstep.models.students import student_files

    pipe = load_digits_pipeline(student=name)
    info = json.loads(student_files(name)[1].read_text())
    assert info["training"]["method"] == method and info["scheduler"]["step_timesteps"] == {"1": [999]}
    labels = list(range(10)) * 3
    with one_thread():
        out = pipe(class_labels=labels, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                   output_type="np")
        assert out.nfe == 1 and out.images.shape == (30, 8, 8, 1)
        x = torch.from_numpy(out.images).permute(0, 3, 1, 2) * 2 - 1
        acc = (load_classifier()(x).argmax(1) == torch.tensor(labels)).float().mean()
    assert acc >= 0.9
