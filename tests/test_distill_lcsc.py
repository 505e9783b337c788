"""LCSC (fewstep.distill.lcsc): streaming merges, the evolutionary search, resume, the CLI, the shipped student.

Runs are built here from tiny state dicts (the trainer's checkpoint layout, written with
fewstep.distill.checkpoints), so nothing depends on a training run on disk."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch

from fewstep.distill import checkpoints as ckpt
from fewstep.distill import lcsc


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g),
            "count": torch.tensor([seed], dtype=torch.long), "half": torch.randn(5, generator=g).half()}


def _run(tmp_path, k: int = 4, name: str = "run", state=_state) -> tuple:
    """A trainer-layout run with ``k`` checkpoints (steps 10, 20, ...), each holding ``student`` and ``student_ema``."""
    run = tmp_path / name
    states = []
    for i in range(k):
        step = 10 * (i + 1)
        d = ckpt.tmp_dir(run, step)
        d.mkdir(parents=True)
        s = state(i)
        ckpt.save_weights(d / "student.safetensors", s)
        ckpt.save_weights(d / "student_ema.safetensors", s)
        ckpt.commit(run, step, {"step": step})
        states.append(s)
    return run, states


def _empty_like(s):
    return {k: torch.full_like(v, 7) for k, v in s.items()}


# ------------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------------
def test_refs_of_runs_folders_and_files(tmp_path):
    run, _ = _run(tmp_path, 4)
    refs = lcsc.checkpoint_refs(run)
    assert [r.step for r in refs] == [10, 20, 30, 40]
    assert all(r.path.name == "student.safetensors" for r in refs)
    assert [r.step for r in lcsc.checkpoint_refs(run, first_fraction=0.5)] == [10, 20]
    assert lcsc.checkpoint_refs(run, weights="student_ema")[0].path.name == "student_ema.safetensors"
    # a diffusers model folder and a plain file, mixed with the run
    model = tmp_path / "model"
    model.mkdir()
    ckpt.save_weights(model / lcsc.DIFFUSERS_WEIGHTS, _state(9))
    f = tmp_path / "extra.safetensors"
    ckpt.save_weights(f, _state(8))
    refs = lcsc.checkpoint_refs([run, model, f])
    assert len(refs) == 6 and refs[4].name == "model" and refs[5].name == "extra"


@pytest.mark.parametrize("i", [0, 2, 3])
def test_one_hot_alpha_reproduces_the_checkpoint_exactly(tmp_path, i):
    run, states = _run(tmp_path, 4)
    refs = lcsc.checkpoint_refs(run)
    alpha = np.eye(4)[i]
    out = lcsc.merge(refs, alpha, out=_empty_like(states[0]))
    for k, v in states[i].items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


def test_merge_is_the_weighted_parameter_average(tmp_path):
    run, states = _run(tmp_path, 2)
    refs = lcsc.checkpoint_refs(run)
    for a in ([0.3, 0.7], [1.5, -0.5], [-2.0, 3.0]):
        out = lcsc.merge(refs, a, out=_empty_like(states[0]))
        for k in ("w", "b"):
            expect = a[0] * states[0][k].double() + a[1] * states[1][k].double()
            torch.testing.assert_close(out[k].double(), expect, rtol=0, atol=1e-6)
        # float16 tensors: accumulated in float32, rounded once
        expect = (a[0] * states[0]["half"].float() + a[1] * states[1]["half"].float()).half()
        assert torch.equal(out["half"], expect)
        # integer buffers: from the checkpoint with the largest |alpha|
        assert out["count"].item() == int(np.argmax(np.abs(a)))


def test_merge_into_a_model_writes_its_parameters_in_place(tmp_path):
    lin = torch.nn.Linear(3, 2)
    sds = [{k: torch.randn_like(v) for k, v in lin.state_dict().items()} for _ in range(3)]
    files = []
    for i, s in enumerate(sds):
        files.append(tmp_path / f"c{i}.safetensors")
        ckpt.save_weights(files[-1], s)
    refs = lcsc.checkpoint_refs(files)
    ptr = lin.weight.data_ptr()
    lcsc.merge(refs, [0.2, 0.3, 0.5], out=lin.state_dict())
    assert lin.weight.data_ptr() == ptr
    torch.testing.assert_close(lin.weight, 0.2 * sds[0]["weight"] + 0.3 * sds[1]["weight"] + 0.5 * sds[2]["weight"])


def test_streaming_holds_one_checkpoint_at_a_time(tmp_path):
    run, states = _run(tmp_path, 6)
    refs = lcsc.checkpoint_refs(run)
    alive: list[weakref.ref] = []
    loads = []

    def reader(ref):
        # every tensor of the previous checkpoints must be gone before the next one is read
        assert all(r() is None for r in alive), "a previous checkpoint is still in memory"
        sd = lcsc.read_state(ref)
        alive.extend(weakref.ref(v) for v in sd.values())
        loads.append(ref.step)
        return sd

    alpha = [0.1, 0.0, 0.2, 0.3, -0.1, 0.5]
    lcsc.merge(refs, alpha, out=_empty_like(states[0]), reader=reader)
    assert loads == [10, 30, 40, 50, 60]  # zero coefficients are not read


def test_bad_inputs_give_clear_errors(tmp_path):
    run, states = _run(tmp_path, 3)
    refs = lcsc.checkpoint_refs(run)
    out = _empty_like(states[0])
    with pytest.raises(ValueError, match="alpha has 2 coefficients, there are 3 checkpoints"):
        lcsc.merge(refs, [0.5, 0.5], out=out)
    with pytest.raises(ValueError, match="alpha must sum to 1"):
        lcsc.merge(refs, [0.5, 0.5, 0.5], out=out)
    with pytest.raises(ValueError, match="alpha must be finite"):
        lcsc.merge(refs, [float("nan"), 0.5, 0.5], out=out)
    with pytest.raises(ValueError, match="does not fit the model: missing keys"):
        lcsc.merge(refs, [0, 0, 1], out={**out, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"w has shape \(4, 3\), the model \(3, 4\)"):
        lcsc.merge(refs, [0, 0, 1], out={**out, "w": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="holds no weights 'target'"):
        lcsc.checkpoint_refs(run, weights="target")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lcsc.checkpoint_refs(tmp_path / "nope")
    (tmp_path / "x.pt").write_text("")
    with pytest.raises(ValueError, match="must be a .safetensors"):
        lcsc.checkpoint_refs(tmp_path / "x.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a trainer run"):
        lcsc.checkpoint_refs(tmp_path / "empty")
    with pytest.raises(ValueError, match="first_fraction = 0 must be in"):
        lcsc.checkpoint_refs(run, first_fraction=0)
    with pytest.raises(ValueError, match="listed twice"):
        lcsc.checkpoint_refs([run, run])
    for kw, msg in [({"population": 0}, "population = 0 must be an integer >= 1"),
                    ({"budget": 3, "population": 4}, "budget = 3 must be >= population = 4"),
                    ({"mutation_std": -1.0}, "mutation_std = -1.0 must be a number > 0"),
                    ({"crossover": 2.0}, r"crossover = 2.0 must be in \[0, 1\]"),
                    ({"max_l1": 0.5}, "max_l1 = 0.5 must be >= 1"),
                    ({"ema_gammas": (1.5,)}, r"ema_gammas = \[1.5\] must lie in \(0, 1\)")]:
        with pytest.raises(ValueError, match=msg):
            lcsc.SearchConfig(**kw)


# ------------------------------------------------------------------------------------------------
# the search, on a toy fitness with a known optimum
# ------------------------------------------------------------------------------------------------
def _toy(tmp_path, k=6):
    """k checkpoints of a linear layer and a fitness whose optimum is an off-seed combination
    (negative coefficients): ||theta - theta*||^2 with theta* = sum beta_i theta_i."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
    files = []
    thetas = []
    for i in range(k):
        w = torch.randn(8, 8)
        thetas.append(w)
        files.append(tmp_path / f"ck{i}.safetensors")
        ckpt.save_weights(files[-1], {"weight": w})
    beta = np.array([0.4, -0.3, 0.2, 0.0, 0.5, 0.2])[:k]
    beta = beta / beta.sum()
    target = sum(float(b) * t for b, t in zip(beta, thetas))

    def fitness(model):
        return float((model.weight - target).square().mean())

    return lcsc.checkpoint_refs(files), lin, fitness


def test_search_improves_on_its_seeds(tmp_path):
    refs, model, fitness = _toy(tmp_path)
    cfg = lcsc.SearchConfig(population=8, offspring=8, budget=240, mutation_std=0.1, seed=1)
    res = lcsc.search(refs, model, fitness, cfg, log_dir=tmp_path / "s", progress=False)
    best = [g["best"] for g in res.generations]
    assert all(b1 <= b0 for b0, b1 in zip(best, best[1:])), "elitist selection must never lose the best"
    rows = json.loads((tmp_path / "s" / lcsc.SEARCH_LOG).read_text())["candidates"]
    assert res.evaluations == 240 and len(rows) == 240
    assert res.fitness < 0.1 * best[0], (best[0], res.fitness)
    assert abs(sum(res.alpha) - 1) < 1e-9 and np.abs(res.alpha).sum() <= cfg.max_l1 + 1e-9
    assert fitness(model) == pytest.approx(res.fitness)  # the model holds the best candidate


def test_resume_equals_uninterrupted(tmp_path):
    refs, model, fitness = _toy(tmp_path)
    cfg = lcsc.SearchConfig(population=6, offspring=5, budget=40, seed=3)
    full = lcsc.search(refs, model, fitness, cfg, log_dir=tmp_path / "full", progress=False)

    calls = {"n": 0}

    def dying(m):
        calls["n"] += 1
        if calls["n"] == 23:
            raise KeyboardInterrupt  # like ctrl-C in the middle of generation 4
        return fitness(m)

    with pytest.raises(KeyboardInterrupt):
        lcsc.search(refs, model, dying, cfg, log_dir=tmp_path / "cut", progress=False)
    assert len(json.loads((tmp_path / "cut" / lcsc.SEARCH_LOG).read_text())["candidates"]) == 22
    with pytest.raises(ValueError, match="exists: pass resume=True"):
        lcsc.search(refs, model, fitness, cfg, log_dir=tmp_path / "cut", progress=False)
    with pytest.raises(ValueError, match="the config differ"):
        lcsc.search(refs, model, fitness, lcsc.SearchConfig(population=6, offspring=5, budget=40, seed=4),
                    log_dir=tmp_path / "cut", resume=True, progress=False)
    calls["n"] = 0
    resumed = lcsc.search(refs, model, dying, cfg, log_dir=tmp_path / "cut", resume=True, progress=False)
    assert calls["n"] == 40 - 22  # only the missing candidates are evaluated

    def strip(path):
        d = json.loads(path.read_text())
        for r in d["candidates"]:
            r.pop("seconds")
        return d

    assert strip(tmp_path / "full" / lcsc.SEARCH_LOG) == strip(tmp_path / "cut" / lcsc.SEARCH_LOG)
    assert resumed.alpha == full.alpha and resumed.fitness == full.fitness
    # a larger budget continues the finished search exactly like a longer uninterrupted one
    more = lcsc.SearchConfig(population=6, offspring=5, budget=52, seed=3)
    longer = lcsc.search(refs, model, fitness, more, log_dir=tmp_path / "cut", resume=True, progress=False)
    direct = lcsc.search(refs, model, fitness, more, log_dir=tmp_path / "long", progress=False)
    assert longer.alpha == direct.alpha and longer.evaluations == 52
    assert strip(tmp_path / "cut" / lcsc.SEARCH_LOG) == strip(tmp_path / "long" / lcsc.SEARCH_LOG)


def test_non_finite_fitness_is_never_selected(tmp_path):
    refs, model, fitness = _toy(tmp_path, 3)

    def fragile(m):
        if float(m.weight.abs().max()) > 2.5:
            raise FloatingPointError("non-finite sample")
        return fitness(m)

    res = lcsc.search(refs, model, fragile, lcsc.SearchConfig(population=4, offspring=4, budget=20),
                      log_dir=tmp_path / "s", progress=False)
    assert np.isfinite(res.fitness)
    rows = json.loads((tmp_path / "s" / lcsc.SEARCH_LOG).read_text())["candidates"]
    assert all(r["fitness"] is None or np.isfinite(r["fitness"]) for r in rows)


# ------------------------------------------------------------------------------------------------
# digits: the CLI end to end, the shipped student
# ------------------------------------------------------------------------------------------------
def _cd_state(i: int):
    from safetensors.torch import load_file

    from fewstep.models.students import student_files

    base = load_file(str(student_files("cd")[0]))
    g = torch.Generator().manual_seed(i)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}


def _digits_run(tmp_path):
    """A 3-checkpoint run of perturbed copies of the shipped cd student, with the cd export as final/."""
    import shutil

    from fewstep.models.students import student_files

    run, states = _run(tmp_path, 3, state=_cd_state)
    (run / "final").mkdir()
    for f in student_files("cd"):
        shutil.copy(f, run / "final" / f.name)
    return run, states


def test_cli_merge_with_given_alpha_is_loadable(tmp_path):
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from fewstep.apps.cli import main
    from fewstep.models.students import load_digits_student_pipeline

    run, states = _digits_run(tmp_path)
    out = tmp_path / "merged"
    assert main(["lcsc", "--run", str(run), "--alpha", "0,0,1", "--output", str(out)]) == 0
    merged = load_file(str(out / "digits_cd-lcsc_unet.safetensors"))
    assert all(torch.equal(merged[k], states[2][k]) for k in states[2])
    pipe = load_digits_student_pipeline("cd-lcsc", weights_dir=out)
    assert pipe([3, 4], num_inference_steps=1, output_type="pt").images.shape == (2, 1, 8, 8)
    unet = UNet2DModel.from_pretrained(str(out / "unet"))
    assert torch.equal(unet.state_dict()["conv_in.weight"], states[2]["conv_in.weight"])


def test_cli_search_of_a_digits_run(tmp_path):
    from fewstep.apps.cli import main

    run, _ = _digits_run(tmp_path)
    search = tmp_path / "search"
    args = ["lcsc", "--run", str(run), "--budget", "3", "--population", "2", "--offspring", "1",
            "--num-samples", "130", "--output", str(search), "--no-progress"]
    assert main(args) == 0
    rec = json.loads((search / "lcsc.json").read_text())
    assert rec["search"]["evaluations"] == 3 and abs(sum(rec["alpha"]) - 1) < 1e-9
    assert (search / "fitness.png").exists()
    assert main(args) == 2  # the log exists: needs --resume
    assert main([*args, "--resume"]) == 0
    assert main(["lcsc", "--run", str(run), "--num-samples", "55", "--output", str(tmp_path / "x")]) == 2


def test_cli_merges_the_snapshots_of_a_teacher_run(tmp_path):
    """`fewstep lcsc --run <train-teacher work dir>`: the raw teacher snapshots by default, the run's
    final/ EMA as the template (a digits teacher sampled with DPM-Solver++), a loadable merged UNet."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from fewstep.apps.cli import main
    from fewstep.models import train as T

    work = tmp_path / "train"
    T.train_teacher({"steps": 4, "batch_size": 8, "checkpoint_every": 4, "lr_warmup_steps": 1}, work_dir=work,
                    output_dir=tmp_path / "teacher", progress=False, snapshot_every=2)
    refs = lcsc.checkpoint_refs(work)
    assert [(r.step, r.path.name) for r in refs] == [(2, "teacher.safetensors"), (4, "teacher.safetensors")]
    assert [r.path.name for r in lcsc.checkpoint_refs(work, weights="teacher_ema")] == ["teacher_ema.safetensors"] * 2
    template = lcsc.load_template(work)
    assert template.kind == "digits-teacher"
    out = tmp_path / "merged"
    assert main(["lcsc", "--run", str(work), "--alpha", "1.5,-0.5", "--output", str(out)]) == 0
    a, b = (load_file(str(r.path)) for r in refs)
    merged = UNet2DModel.from_pretrained(str(out / "unet")).state_dict()
    for k in ("conv_in.weight", "conv_out.bias"):
        torch.testing.assert_close(merged[k], 1.5 * a[k] - 0.5 * b[k], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "lcsc.json").read_text())["weights"] == "teacher"
    with pytest.raises(ValueError, match="hold none of student, teacher"):
        lcsc.checkpoint_refs(_empty_run(tmp_path / "empty"))


def _empty_run(run):
    from fewstep.distill.checkpoints import commit, save_weights, tmp_dir

    tmp = tmp_dir(run, 1)
    tmp.mkdir(parents=True)
    save_weights(tmp / "other.safetensors", {"w": torch.zeros(1)})
    commit(run, 1, {"step": 1})
    return run


def test_shipped_cd_lcsc_student():
    from fewstep.models import load_digits_pipeline
    from fewstep.models.students import student_files

    weights, meta = student_files("cd-lcsc")
    if not weights.exists():
        pytest.skip("the cd-lcsc student is not shipped in this checkout")
    info = json.loads(meta.read_text())["training"]["lcsc"]
    assert abs(sum(info["alpha"]) - 1) < 1e-9 and len(info["alpha"]) == len(info["checkpoints"])
    pipe = load_digits_pipeline(student="cd-lcsc")
    g = torch.Generator().manual_seed(0)
    img = pipe(list(range(10)), num_inference_steps=1, generator=g, output_type="pt").images
    assert img.shape == (10, 1, 8, 8) and torch.isfinite(img).all()


@pytest.mark.slow  # three CLI subprocesses, two of them under accelerate launch
def test_two_processes_give_the_one_process_search(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    run, _ = _digits_run(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    args = ["-m", "fewstep.apps.cli", "lcsc", "--run", str(run), "--budget", "7", "--population", "3",
            "--offspring", "2", "--num-samples", "130", "--device", "cpu", "--no-progress"]
    one = subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=240, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(port), *args, "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]

    def strip(path):
        d = json.loads((path / lcsc.SEARCH_LOG).read_text())
        for r in d["candidates"]:
            r.pop("seconds")
        return d

    assert strip(tmp_path / "one") == strip(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "lcsc.json").read_text())["alpha"] == \
        json.loads((tmp_path / "one" / "lcsc.json").read_text())["alpha"]


def test_trajectory_fitness_measures_the_distance_to_the_reference_solution():
    from diffusers import DDIMScheduler

    from fewstep.models import load_digits_pipeline

    pipe = load_digits_pipeline(scheduler=DDIMScheduler)
    ref = lcsc.TrajectoryFitness.teacher_reference(20, noise_seed=3, steps=4)
    assert lcsc.TrajectoryFitness(pipe, ref, nfe=4, num_samples=20, noise_seed=3)() == 0.0  # the reference itself
    assert lcsc.TrajectoryFitness(pipe, ref, nfe=1, num_samples=20, noise_seed=3)() > 1e-3
    assert lcsc.TrajectoryFitness(pipe, ref, nfe=4, num_samples=20, noise_seed=4)() > 1e-3  # other noise
    with pytest.raises(ValueError, match=r"reference must have shape \(20, 1, 8, 8\)"):
        lcsc.TrajectoryFitness(pipe, ref[:10], nfe=4, num_samples=20, noise_seed=3)
    with pytest.raises(ValueError, match="num_samples must be a positive multiple of 10"):
        lcsc.TrajectoryFitness(pipe, ref, nfe=4, num_samples=25)
