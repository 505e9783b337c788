"""Benchmark of the distilled digits students against the teacher (issue 14; shared by the later
distillation issues: a new student is one entry of :data:`STUDENTS`, a new run one entry of ``--runs``).

Protocol: for every seed, ``N`` labels balanced over the ten classes and fresh start noise drawn from
seed ``10_000 + seed`` (never the training runs' evaluation noise, seed 1234). Every student and
every teacher setting samples from the same noise of a seed. Scores: FD-digits
(``fewstep.eval.fd_digits``, against the 360 held-out test digits) and class accuracy, reported as
the mean and the standard deviation over seeds.

* Students (:data:`STUDENTS`): their own pipeline (``load_digits_pipeline(student=...)``) at 1, 2, 4
  steps, ``guidance_scale = 1`` (one model call per step, NFE = steps).
* Teacher: every sampler of :data:`TEACHER_SAMPLERS` at NFE 1, 2, 4, 8 (unguided, one call per step)
  and DDIM at 50 steps (the reference of the targets); "best teacher" at an NFE is the sampler with
  the lowest mean FD there (chosen on the same seeds: a choice in the teacher's favour).
* Floor: ``N`` real training digits (balanced, drawn per seed) against the same test digits.
* Training: FD-vs-step curves of the runs (``--runs``; the fixed-noise evaluation of the trainer)
  on one figure, wall time and peak memory from each run's ``summary.json``; sampling time per row.

Targets (issue 14): CD 1-step FD <= 1.5x the teacher's 50-step DDIM FD; CD and LCM 4-step <= 1.15x;
every student below the best teacher sampler at equal NFE for NFE 1, 2, 4.

Usage::

    python benchmarks/distill.py                       # N=1000, seeds 0 1 2, all parts (~20 min, 1 thread)
    python benchmarks/distill.py --parts students curves   # re-use the stored teacher and floor rows
    python benchmarks/distill.py --n 100 --seeds 0 --out /tmp/d.json --parts teacher --nfe 1 2   # dry run

Prints markdown tables and the target verdicts, writes ``benchmarks/results/distill.json`` and
``benchmarks/results/distill_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
STUDENT_STEPS = (1, 2, 4)
TEACHER_NFE = (1, 2, 4, 8)
REFERENCE = ("DDIM", 50)
GUIDED_REFERENCE = 2.0  # also the teacher's DDIM-50 at this guidance scale, for the guided LCM rows


def _student(name: str, scheduler=None):
    def load():
        from fewstep.models import load_digits_pipeline

        return load_digits_pipeline(student=name, scheduler=scheduler)

    return load


def _run_student(final_dir: str, name: str):
    """A student exported by a training run (``RUN/final``) that is not shipped."""
    def load():
        from fewstep.models.students import load_digits_student_pipeline

        return load_digits_student_pipeline(name, weights_dir=final_dir)

    return load


def _lcm_scheduler():
    from diffusers import LCMScheduler

    return _student("lcm", LCMScheduler)()


#: name -> (loader of a pipeline called like the teacher's, sampling steps to score, guidance scale)
STUDENTS: dict[str, tuple[Callable, tuple[int, ...], float]] = {
    "CD": (_student("cd"), STUDENT_STEPS, 1.0),
    "LCM": (_student("lcm"), STUDENT_STEPS, 1.0),
    "LCM (diffusers LCMScheduler)": (_lcm_scheduler, STUDENT_STEPS, 1.0),
    "LCM, guidance 2": (_student("lcm"), STUDENT_STEPS, 2.0),
    "LCM-LoRA r16 (run, not shipped)": (_run_student("out/runs/lcm_lora_digits/final", "lcm_lora"), STUDENT_STEPS, 1.0),
}

#: student name -> the method whose targets apply to it
TARGETS = {"CD": {"one_step_ratio": 1.5, "four_step_ratio": 1.15}, "LCM": {"four_step_ratio": 1.15}}


def _teacher_samplers(config: dict) -> dict[str, tuple[Callable, Callable | None]]:
    """name -> (scheduler factory, grid or None): ``grid(n)`` gives explicit model times (the tuned grids of
    benchmarks/dpm_v3_grid_search.py, snapped to the digits EMS, the best few-step settings found there)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
    from dpm_v3_grid_search import grid_fn

    from fewstep.samplers import EMS, DPMSolverPPScheduler, DPMSolverV3Scheduler
    from fewstep.samplers.ems import resolve_ems_path
    from fewstep.schedule import NoiseSchedule

    tuned = grid_fn(EMS.load(resolve_ems_path("digits")), NoiseSchedule.from_config(config), "logsnr", lo=-3.0, hi=2.5)
    return {
        "DDIM": (lambda: DDIMScheduler.from_config(config), None),
        "diffusers DPM++2M": (lambda: DPMSolverMultistepScheduler.from_config(config, solver_order=2), None),
        "diffusers UniPC bh2": (lambda: UniPCMultistepScheduler.from_config(config, solver_order=2,
                                                                            solver_type="bh2"), None),
        "fewstep DPM++2M power1.3": (lambda: DPMSolverPPScheduler.from_config(
            config, solver_order=2, timestep_spacing="time_power", timestep_power=1.3), None),
        "fewstep DPM++2M logsnr[-3,2.5]": (lambda: DPMSolverPPScheduler.from_config(
            config, solver_order=2, round_timesteps=False), tuned),
        "fewstep v3 o2 trailing (EMS)": (lambda: DPMSolverV3Scheduler.from_config(
            config, ems="digits", solver_order=2, timestep_spacing="trailing"), None),
        "fewstep v3 o2 logsnr[-3,2.5] (EMS)": (lambda: DPMSolverV3Scheduler.from_config(
            config, ems="digits", solver_order=2), tuned),
    }


def _teacher_generate(unet, factory, grid, labels, noise, steps, chunk=500, guidance=1.0):
    """Teacher samples with ``fewstep.sample`` (the loop a pipeline runs), on an explicit grid when given,
    classifier-free guided when ``guidance > 1`` (null class 10); images in [0, 1] as the pipeline returns
    them. Returns ``(images, nfe, seconds)``."""
    from fewstep.models.pipeline import NULL_CLASS
    from fewstep.sample import sample

    def model(x, t, c):
        return unet(x, torch.as_tensor(t).reshape(-1).expand(x.shape[0]), class_labels=c).sample

    out, nfe, t0 = [], 0, time.time()
    with torch.inference_mode():
        for i in range(0, len(labels), chunk):
            sched = factory()
            kw = {"timesteps": grid(steps)} if grid is not None else {"num_inference_steps": steps}
            y = labels[i:i + chunk]
            x, nfe = sample(model, noise[i:i + chunk], sched, cond=y, guidance=guidance if guidance > 1 else None,
                            uncond=torch.full_like(y, NULL_CLASS), **kw)
            out.append((x.float().clamp(-1, 1) + 1) / 2)
    return torch.cat(out), nfe, time.time() - t0


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(10_000 + seed))


def _generate(pipe, labels, noise, steps, guidance, seed, chunk=500) -> tuple[torch.Tensor, int, float]:
    gen = torch.Generator().manual_seed(20_000 + seed)  # re-noising draws of multistep consistency sampling
    out, nfe, t0 = [], 0, time.time()
    with torch.inference_mode():
        for i in range(0, len(labels), chunk):
            res = pipe(labels[i:i + chunk], num_inference_steps=steps, guidance_scale=guidance,
                       latents=noise[i:i + chunk], generator=gen, output_type="pt")
            out.append(res.images)
            nfe = res.nfe
    return torch.cat(out), nfe, time.time() - t0


def _agg(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _score(images, labels, extractor, reference) -> tuple[float, float]:
    from fewstep.eval.fd_digits import fd_digits

    r = fd_digits(images, labels=labels, extractor=extractor, reference=reference)
    return r["fd"], r["accuracy"]


def run_floor(n, seeds, extractor, reference) -> dict:
    from fewstep.models import load_digits_split

    x, y = load_digits_split("train")
    fds = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        per = n // 10
        idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per]]
                         for c in range(10)])
        if len(idx) < n:
            raise ValueError(f"--n {n} exceeds the balanced training set ({len(idx)})")
        fds.append(_score((x[idx] + 1) / 2, y[idx], extractor, reference)[0])
    return {"fd": _agg(fds)}


def run_teacher(n, seeds, nfes, extractor, reference, progress=print) -> dict:
    from fewstep.models.pipeline import load_digits_scheduler_config, load_digits_teacher_unet

    unet = load_digits_teacher_unet()
    samplers = _teacher_samplers(load_digits_scheduler_config())
    labels = torch.arange(10).repeat_interleave(n // 10)
    settings = [(name, k, 1.0) for name in samplers for k in nfes] + [(*REFERENCE, 1.0), (*REFERENCE, GUIDED_REFERENCE)]
    rows = {}
    for name, steps, w in settings:
        fds, accs, secs = [], [], []
        for seed in seeds:
            imgs, nfe, sec = _teacher_generate(unet, *samplers[name], labels, _noise(n, seed), steps, guidance=w)
            fd, acc = _score(imgs, labels, extractor, reference)
            fds.append(fd)
            accs.append(acc)
            secs.append(sec)
        key = f"{name}@{steps}" + (f" w={w:g}" if w != 1.0 else "")
        rows[key] = {"sampler": name, "steps": steps, "guidance": w, "nfe": nfe, "fd": _agg(fds), "acc": _agg(accs),
                     "seconds_per_1000": 1000 * statistics.fmean(secs) / n}
        progress(f"teacher {name:>30} w={w:g} NFE {nfe:3d}: FD {statistics.fmean(fds):7.3f} +- {_agg(fds)['std']:.3f}")
    return rows


def run_students(n, seeds, names, extractor, reference, progress=print) -> dict:
    labels = torch.arange(10).repeat_interleave(n // 10)
    rows = {}
    for name in names:
        loader, steps_list, guidance = STUDENTS[name]
        try:
            pipe = loader()
        except FileNotFoundError as err:
            progress(f"student {name}: skipped ({err})")
            continue
        for steps in steps_list:
            fds, accs, secs = [], [], []
            for seed in seeds:
                imgs, nfe, sec = _generate(pipe, labels, _noise(n, seed), steps, guidance, seed)
                fd, acc = _score(imgs, labels, extractor, reference)
                fds.append(fd)
                accs.append(acc)
                secs.append(sec)
            rows[f"{name}@{steps}"] = {"student": name, "steps": steps, "guidance": guidance, "nfe": nfe,
                                       "fd": _agg(fds), "acc": _agg(accs),
                                       "seconds_per_1000": 1000 * statistics.fmean(secs) / n}
            progress(f"student {name:>30} NFE {nfe:3d}: FD {statistics.fmean(fds):7.3f} +- {_agg(fds)['std']:.3f}")
    return rows


def run_curves(runs: list[str], out_png: Path) -> dict:
    """FD-vs-step of each run (its fixed-noise evaluation), plus wall time and memory from summary.json."""
    from fewstep.distill import read_log

    info = {}
    curves = {}
    for run in runs:
        p = Path(run)
        summ = json.loads((p / "summary.json").read_text()) if (p / "summary.json").exists() else {}
        cfg = json.loads((p / "config.json").read_text())["config"] if (p / "config.json").exists() else {}
        rows = read_log(p)
        evals = [r for r in rows if r["kind"] == "eval"]
        teacher = next((r for r in rows if r["kind"] == "teacher"), {})
        name = cfg.get("method", {}).get("name", p.name)
        curves[p.name] = {"method": name, "evals": evals, "teacher": teacher}
        info[p.name] = {"method": name, "steps": summ.get("steps"), "wall_time_s": summ.get("wall_time_s"),
                        "memory": summ.get("memory"), "batch_size": cfg.get("train", {}).get("batch_size"),
                        "eval_num_samples": cfg.get("eval", {}).get("num_samples"),
                        "trainable_parameters": summ.get("trainable_parameters")}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return info
    if curves:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
        for ax, steps in zip(axes, STUDENT_STEPS):
            for run, c in curves.items():
                pts = [(r["step"], r[f"fd/{steps}"]) for r in c["evals"] if f"fd/{steps}" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=f"{run} ({c['method']})")
            t = next((c["teacher"]["teacher_ddim50/fd"] for c in curves.values()
                      if "teacher_ddim50/fd" in c["teacher"]), None)
            if t:
                ax.axhline(t, color="k", ls="--", lw=0.8, label="teacher DDIM-50")
            ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_title(f"{steps}-step FD-digits (fixed eval noise)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=110)
        plt.close(fig)
    return info


def verdicts(result: dict) -> dict:
    """The targets of issue 14 from the stored rows (None when a row is missing)."""
    teacher, students = result.get("teacher", {}), result.get("students", {})
    ref = teacher.get(f"{REFERENCE[0]}@{REFERENCE[1]}")
    out = {}
    if ref is None:
        return out
    ref_fd = ref["fd"]["mean"]
    for name, t in TARGETS.items():
        for key, steps in (("one_step_ratio", 1), ("four_step_ratio", 4)):
            row = students.get(f"{name}@{steps}")
            if key in t and row is not None:
                ratio = row["fd"]["mean"] / ref_fd
                out[f"{name} {steps}-step FD / teacher DDIM-50 FD <= {t[key]}"] = {
                    "ratio": round(ratio, 3), "student_fd": row["fd"]["mean"], "teacher_fd": ref_fd,
                    "pass": ratio <= t[key]}
    for name in sorted({r["student"] for r in students.values() if r.get("guidance", 1.0) == 1.0}):
        for steps in STUDENT_STEPS:
            row = students.get(f"{name}@{steps}")
            cands = [r for r in teacher.values() if r["nfe"] == steps and r.get("guidance", 1.0) == 1.0]
            if row is None or not cands:
                continue
            best = min(cands, key=lambda r: r["fd"]["mean"])
            out[f"{name} beats the best teacher sampler at NFE {steps}"] = {
                "student_fd": row["fd"]["mean"], "teacher_best": best["sampler"], "teacher_fd": best["fd"]["mean"],
                "pass": row["fd"]["mean"] < best["fd"]["mean"]}
    return out


def print_tables(result: dict) -> None:
    def fmt(agg):
        return f"{agg['mean']:.3f} ± {agg['std']:.3f}"

    n = result["n"]
    print(f"\nFD-digits (N={n}, mean ± std over seeds {result['seeds']}), class accuracy, sampling time")
    print("| model | sampler | w | NFE | FD-digits | class acc | s / 1000 images |")
    print("|---|---|---:|---:|---:|---:|---:|")
    if "floor" in result:
        print(f"| real train digits (floor) | - | - | - | {fmt(result['floor']['fd'])} | - | - |")
    teacher_rows = sorted(result.get("teacher", {}).values(), key=lambda r: (r.get("guidance", 1), r["nfe"],
                                                                            r["fd"]["mean"]))
    for r in teacher_rows:
        print(f"| teacher | {r['sampler']} | {r.get('guidance', 1.0):g} | {r['nfe']} | {fmt(r['fd'])} | "
              f"{100 * r['acc']['mean']:.1f}% | {r['seconds_per_1000']:.2f} |")
    for r in sorted(result.get("students", {}).values(), key=lambda r: (r["student"], r["nfe"])):
        print(f"| {r['student']} | own | {r.get('guidance', 1.0):g} | {r['nfe']} | {fmt(r['fd'])} | "
              f"{100 * r['acc']['mean']:.1f}% | {r['seconds_per_1000']:.2f} |")
    if result.get("training"):
        print("\n| run | method | steps | batch | wall time (min) | peak RSS (MB) | trainable params |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for run, i in result["training"].items():
            wall = f"{i['wall_time_s'] / 60:.1f}" if i.get("wall_time_s") else "-"
            mem = (i.get("memory") or {}).get("cpu_max_rss_mb", "-")
            params = sum((i.get("trainable_parameters") or {}).values()) or "-"
            print(f"| {run} | {i['method']} | {i['steps']} | {i['batch_size']} | {wall} | {mem} | {params} |")
    print()
    for k, v in result.get("verdicts", {}).items():
        print(f"{'PASS' if v['pass'] else 'MISS'}  {k}: {json.dumps({a: b for a, b in v.items() if a != 'pass'})}")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict that is also written as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="samples per setting and seed (multiple of 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["floor", "teacher", "students", "curves"],
                        choices=["floor", "teacher", "students", "curves"])
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--nfe", type=int, nargs="+", default=list(TEACHER_NFE), help="teacher NFEs besides DDIM-50")
    parser.add_argument("--runs", nargs="*", default=["out/runs/cd_digits", "out/runs/lcm_digits"],
                        help="training run directories for the curves / wall time / memory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "distill.json"))
    args = parser.parse_args(argv)
    if args.n < 10 or args.n % 10:
        raise ValueError(f"--n must be a positive multiple of 10, got {args.n}")
    torch.set_num_threads(args.threads)

    import diffusers

    from fewstep.eval.fd_digits import DigitsFeatures, reference_stats

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if result and (result.get("n") != args.n or result.get("seeds") != args.seeds):
        if set(args.parts) != {"floor", "teacher", "students", "curves"}:
            raise ValueError(f"{out} holds N={result.get('n')}, seeds {result.get('seeds')}: run all parts to "
                             "replace it, or pass the same --n/--seeds")
        result = {}
    commands = result.get("commands", [])
    commands.append("python benchmarks/distill.py " + " ".join(map(shlex.quote, argv if argv is not None
                                                                   else sys.argv[1:])))
    result.update({"n": args.n, "seeds": args.seeds, "commands": commands, "torch": torch.__version__,
                   "diffusers": diffusers.__version__, "threads": args.threads,
                   "protocol": __doc__.split("Usage::")[0].strip()})
    extractor = DigitsFeatures()
    reference = reference_stats(extractor)

    def progress(msg):
        print(msg, flush=True)

    if "floor" in args.parts:
        result["floor"] = run_floor(args.n, args.seeds, extractor, reference)
        progress(f"floor: FD {result['floor']['fd']['mean']:.3f}")
    if "teacher" in args.parts:
        result["teacher"] = run_teacher(args.n, args.seeds, args.nfe, extractor, reference, progress)
    if "students" in args.parts:
        result.setdefault("students", {}).update(run_students(args.n, args.seeds, args.students, extractor,
                                                              reference, progress))
    if "curves" in args.parts:
        runs = [r for r in args.runs if Path(r).is_dir()]
        result["training"] = run_curves(runs, out.with_name(out.stem + "_curves.png"))
    result["verdicts"] = verdicts(result)
    print_tables(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
