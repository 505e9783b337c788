"""Benchmark: DPM-Solver-v3 with EMS on exact Gaussian mixtures (issue 10): consistency, EMS against
``degenerated=True`` on the same grid, and v3 against the best diffusers configuration.

Mixtures: :func:`fewstep.testing.make_gaussian_mixture` (6 components, unconditional) of several
seeds and dimensions (16-64) under Stable Diffusion's scaled-linear schedule (SD's scheduler config,
``timestep_spacing="leading"``, ``steps_offset=1``) and the DDPM linear schedule (``linspace``), with
an epsilon model. Error = relative RMSE ``||x - x_ref|| / ||x_ref||`` over ``--batch`` samples of the
final sample to the DOP853 float64 solve of the probability-flow ODE from the same noise
(``--final zero``: to sigma = 0, what users sample; ``--final sigma_min``: to the schedule's smallest
noise level, where the convergence order is visible because no solver makes the last jump).

EMS: :func:`fewstep.samplers.compute_ems` on ``K`` exact mixture samples with ``N`` lambda intervals
(``--ems N:K`` pairs, cached under ``out/dpm_v3_ems/``); ``--exact-ems`` adds EMS from the closed-form
Jacobian (:func:`fewstep.testing.mixture_ems`, ``--exact-size N:K``, default N = 400, K = 8192) as the
"best possible" row (no Hutchinson probes, no finite differences).

Rows: v3 with each EMS set (order 2/3, corrector on/off, grids: the config's own, ``logsnr``,
``linspace``, ``karras``, ``time_power``), v3 ``degenerated=True`` on the same grids, and diffusers
``DPMSolverMultistepScheduler`` 2M/3M (config grid, ``linspace``, ``trailing``, Karras, lu-lambdas),
``UniPCMultistepScheduler`` bh1/bh2 order 2/3 (config grid, ``trailing``, Karras) and
``DEISMultistepScheduler`` order 2/3 (config grid, ``trailing``). "v3 default" is
``DPMSolverV3Scheduler.from_config(config, ems=...)`` with nothing else given.

Prints per mixture a table (rows x NFE) and the checks of issue 10; writes
``benchmarks/results/dpm_v3_consistency.json`` (``--out``)::

    python benchmarks/dpm_v3_consistency.py                       # all mixtures, N=200 K=2048
    python benchmarks/dpm_v3_consistency.py --mixtures sd-d24-s0 --ems 200:2048 1200:2048 --exact-ems
    python benchmarks/dpm_v3_consistency.py --final sigma_min --nfe 10 20 40 80 160 --rows "v3 o3 logsnr"
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "dpm_v3_consistency.json"
CACHE = Path(__file__).resolve().parent.parent / "out" / "dpm_v3_ems"
NFES = (5, 6, 8, 10, 15, 20, 30)
TARGET_NFES = (5, 6, 8, 10)
TARGET_RATIO = 0.75

# Stable Diffusion v1's scheduler config (PNDMScheduler, as a pipeline's scheduler.config has it)
SD_CONFIG = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "leading",
             "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True, "trained_betas": None}
# a DDPM-style pixel model (linear betas, diffusers' default spacing)
LINEAR_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                 "beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "linspace",
                 "steps_offset": 0, "trained_betas": None}
CONFIGS = {"sd": SD_CONFIG, "linear": LINEAR_CONFIG}
MIXTURES = {  # name: (config, dim, seed)
    "sd-d24-s0": ("sd", 24, 0), "sd-d48-s1": ("sd", 48, 1), "sd-d16-s2": ("sd", 16, 2), "sd-d32-s3": ("sd", 32, 3),
    "lin-d32-s4": ("linear", 32, 4), "lin-d64-s5": ("linear", 64, 5), "lin-d16-s6": ("linear", 16, 6),
}


def mixture_setup(name: str, batch: int, final: str):
    """``(config, mixture, model, noise, reference, s_end)`` of a named mixture."""
    from fewstep.schedule import NoiseSchedule
    from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture, reference_solve

    kind, dim, seed = MIXTURES[name]
    config = dict(CONFIGS[kind])
    schedule = NoiseSchedule.from_config(config)
    mix = make_gaussian_mixture(dim=dim, seed=seed)
    model = GaussianMixtureModel(mix, schedule, "epsilon")
    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    s0 = math.exp(-float(schedule.lambda_(schedule.t_max)))
    s_end = 0.0 if final == "zero" else math.exp(-float(schedule.lambda_(schedule.t_min)))
    ref = reference_solve(mix, noise * math.sqrt(1 + s0**2), s0, s_end)
    return config, mix, model, noise, ref, s_end


def get_ems(name: str, model, mix, config, num_grid: int, k: int, exact: bool = False, cache: Path = CACHE,
            log=print, window: int | None = None):
    """EMS of a mixture from compute_ems (or testing.mixture_ems when ``exact``), cached on disk;
    returns ``(ems, seconds)`` (the compute time, also when read from the cache). ``window``: the
    ``smoothing_window`` of ``dl/dlambda`` (None: 5, the setting the cached sets without a ``_w`` tag
    were computed with)."""
    from fewstep.samplers import EMS, compute_ems
    from fewstep.testing import mixture_ems

    tag = f"{name}_{'exact' if exact else 'est'}_N{num_grid}_K{k}" + ("" if window is None else f"_w{window}")
    path = Path(cache) / f"{tag}.safetensors"
    if path.exists():
        ems = EMS.load(path)
        return ems, float(ems.metadata.get("seconds", float("nan")))
    t0 = time.perf_counter()
    if exact:
        ems = mixture_ems(mix, model.schedule, num_grid, k, seed=7)
        ems.metadata["seconds"] = round(time.perf_counter() - t0, 2)
    else:
        x0 = mix.sample(k, generator=torch.Generator().manual_seed(77))
        ems = compute_ems(model, config, x0, num_grid=num_grid, batch_size=256, progress=False, model_id=tag,
                          smoothing_window=5 if window is None else window)
    secs = time.perf_counter() - t0
    log(f"  EMS {tag}: {secs:.1f} s")
    ems.save(path)
    return ems, secs


def grid_kwargs(grid: str) -> dict:
    """Scheduler keywords of a grid name (``config`` = the config's own spacing)."""
    if grid == "config":
        return {}
    if grid == "karras":
        return {"use_karras_sigmas": True}
    if grid == "lu":
        return {"use_lu_lambdas": True}
    if grid.startswith("tpz"):
        return {"timestep_spacing": "time_power_zero", "timestep_power": float(grid[len("tpz"):] or 1.5)}
    if grid.startswith("time_power"):
        return {"timestep_spacing": "time_power", "timestep_power": float(grid[len("time_power"):] or 2.0)}
    return {"timestep_spacing": grid}


def make_rows(config: dict, ems_sets: dict, v3_grids, orders=(2, 3)) -> dict:
    """name -> (group, factory)."""
    from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from fewstep.samplers import DPMSolverV3Scheduler

    def v3(**kw):
        return lambda: DPMSolverV3Scheduler.from_config(config, **kw)

    rows = {}
    first = next(iter(ems_sets))
    rows["v3 default"] = ("v3 default", v3(ems=ems_sets[first]))
    for tag, ems in list(ems_sets.items())[1:]:
        rows[f"v3 default {tag}"] = ("v3 default", v3(ems=ems))
    rows["v3 default degenerated"] = ("v3 degenerated", v3(degenerated=True, round_timesteps=False))
    for grid in v3_grids:
        gk = grid_kwargs(grid) if grid != "v3-default" else {}
        for o in orders:
            for tag, ems in ems_sets.items():
                rows[f"v3 o{o} {grid} {tag}"] = ("v3", v3(ems=ems, solver_order=o, **gk))
                rows[f"v3 o{o} {grid} {tag} nocorr"] = ("v3", v3(ems=ems, solver_order=o, use_corrector=False, **gk))
            for corr in (True, False):
                rows[f"v3 o{o} {grid} degenerated{'' if corr else ' nocorr'}"] = (
                    "v3 degenerated", v3(degenerated=True, solver_order=o, use_corrector=corr, round_timesteps=False,
                                         **gk))
    for o in (2, 3):
        for grid in ("config", "linspace", "trailing", "karras", "lu"):
            rows[f"diffusers DPM++{o}M {grid}"] = ("diffusers", lambda o=o, g=grid:
                                                   DPMSolverMultistepScheduler.from_config(
                                                       config, solver_order=o, **grid_kwargs(g)))
        for st in ("bh1", "bh2"):
            for grid in ("config", "trailing", "karras"):
                rows[f"diffusers UniPC {st} o{o} {grid}"] = ("diffusers", lambda o=o, st=st, g=grid:
                                                             UniPCMultistepScheduler.from_config(
                                                                 config, solver_order=o, solver_type=st,
                                                                 **grid_kwargs(g)))
        for grid in ("config", "trailing"):
            rows[f"diffusers DEIS o{o} {grid}"] = ("diffusers", lambda o=o, g=grid: DEISMultistepScheduler.from_config(
                config, solver_order=o, **grid_kwargs(g)))
    return rows


FLIP = 0.1  # per-sample RMS error above which a sample counts as "flipped" (ended in another component)


def rel_error(model, noise, ref, sched, n: int, s_end: float) -> tuple[float, int, float]:
    """``(relative RMSE, flips, relative RMSE without the flipped samples)`` of ``n`` steps of
    ``sched`` to ``ref``. A sample near the boundary between two components that a solver sends
    into the other one (per-sample RMS error > ``FLIP``; the components are ~1 apart) adds ~0.5^2 / batch
    to the mean square: with 512 samples one flip is ~0.04 of relative RMSE, more than the whole
    error of the other samples from ~10 steps on. Both numbers are recorded."""
    from fewstep.sample import sample

    x, nfe = sample(model, noise, sched, n)
    assert nfe == n, (nfe, n)
    x = x.double()
    if s_end > 0:
        x = x * math.sqrt(1 + s_end**2)  # VP state at sigma_min -> VE coordinates of the reference
    per = ((x - ref) ** 2).mean(1)
    norm = (ref**2).mean().sqrt()
    kept = per.sqrt() <= FLIP
    return (float(per.mean().sqrt() / norm), int((~kept).sum()),
            float(per[kept].mean().sqrt() / norm) if bool(kept.any()) else float("nan"))


def summarize(rows: dict, nfes, ems_tags) -> dict:
    """Issue 10's checks per mixture."""
    s = {}
    diff = [k for k, r in rows.items() if r["group"] == "diffusers"]
    best = []
    for i in range(len(nfes)):
        vals = {k: rows[k]["err"][i] for k in diff if math.isfinite(rows[k]["err"][i])}
        k = min(vals, key=vals.get) if vals else None
        best.append((vals.get(k, float("nan")), k))
    s["best diffusers"] = [b[0] for b in best]
    s["best diffusers row"] = [b[1] for b in best]
    if "v3 default" in rows:
        d = rows["v3 default"]["err"]
        s["v3 default / best diffusers"] = [d[i] / best[i][0] for i in range(len(nfes))]
        s["target b met (v3 default <= 0.75 best diffusers, NFE 5-10)"] = all(
            s["v3 default / best diffusers"][i] <= TARGET_RATIO for i, n in enumerate(nfes) if n in TARGET_NFES)
        s["v3 default monotone"] = all(d[i + 1] <= d[i] for i in range(len(d) - 1))
        if "v3 default degenerated" in rows:
            dd = rows["v3 default degenerated"]["err"]
            s["v3 default / degenerated"] = [d[i] / dd[i] for i in range(len(nfes))]
            s["target a met (v3 default <= degenerated, NFE 5-30)"] = all(
                d[i] <= dd[i] for i, n in enumerate(nfes) if 5 <= n <= 30)
    # EMS vs degenerated on the same grid, order and corrector setting
    worst = {}
    for k, r in rows.items():
        if r["group"] != "v3":
            continue
        parts = k.split(" ")
        o, grid = parts[1], parts[2]
        dk = f"v3 {o} {grid} degenerated" + (" nocorr" if k.endswith("nocorr") else "")
        if dk not in rows:
            continue
        ratio = [r["err"][i] / rows[dk]["err"][i] for i in range(len(nfes))]
        worst[k] = max(ratio[i] for i, n in enumerate(nfes) if 5 <= n <= 30)
    s["max over NFE 5-30 of v3 EMS / degenerated (same grid, order)"] = worst
    return s


def plot(result: dict, path: Path) -> None:
    """Error vs NFE per mixture: v3's default (EMS), the same without EMS, the best diffusers row per NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(result["mixtures"])
    nfe = result["nfe"]
    cols = min(4, len(mixes))
    fig, axes = plt.subplots(math.ceil(len(mixes) / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(len(mixes) / cols)),
                             squeeze=False)
    for ax, m in zip(axes.flat, mixes):
        rec = result["mixtures"][m]
        for key, label in (("v3 default", "v3 default (EMS)"), ("v3 default degenerated", "v3 default, no EMS")):
            if key in rec["rows"]:
                ax.plot(nfe, rec["rows"][key]["err"], "o-", label=label)
        ax.plot(nfe, rec["summary"]["best diffusers"], "s--", label="best diffusers (per NFE)")
        ax.set(xscale="log", yscale="log", title=f"{m}", xlabel="NFE", ylabel="relative RMSE")
        ax.set_xticks(nfe, [str(n) for n in nfe])
    for ax in list(axes.flat)[len(mixes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_row(name, vals, w, f="{:.4f}"):
    return f"| {name:<{w}} | " + " | ".join(f.format(v) for v in vals) + " |"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixtures", nargs="+", default=list(MIXTURES), choices=list(MIXTURES))
    ap.add_argument("--ems", nargs="+", default=["200:2048"],
                    help="N:K or N:K:W for compute_ems (W = smoothing_window; without it 5, as the cached sets)")
    ap.add_argument("--exact-ems", action="store_true", help="add EMS from the closed-form Jacobian")
    ap.add_argument("--exact-size", default="400:8192", help="N:K of the --exact-ems set")
    ap.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    ap.add_argument("--batch", type=int, default=2048, help="samples per mixture")
    ap.add_argument("--final", choices=("zero", "sigma_min"), default="zero")
    ap.add_argument("--v3-grids", nargs="*", default=["tpz1.5", "logsnr", "karras", "time_power2", "trailing"],
                    help="grids of the v3 rows: config, logsnr, karras, trailing, time_powerP, tpzP (time_power_zero)")
    ap.add_argument("--orders", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rows", nargs="*", default=None, help="substrings of row names to run (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=str(CACHE), help="folder of the computed EMS (reused when present)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    command = "python benchmarks/dpm_v3_consistency.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.setdefault("mixtures", {})
    result.update({"nfe": args.nfe, "batch": args.batch, "final": args.final, "command": command,
                   "metric": "relative RMSE to the DOP853 float64 reference solve"})
    for mname in args.mixtures:
        t_m = time.perf_counter()
        config, mix, model, noise, ref, s_end = mixture_setup(mname, args.batch, args.final)
        print(f"\n=== {mname}: {config['beta_schedule']}, dim {mix.dim}, final {args.final} ===", flush=True)
        ems_sets, ems_secs = {}, {}
        for spec in args.ems:
            n_grid, k, *win = (int(v) for v in spec.split(":"))
            key = f"N{n_grid}K{k}" + (f"W{win[0]}" if win else "")
            ems_sets[key], ems_secs[key] = get_ems(mname, model, mix, config, n_grid, k, cache=args.cache,
                                                   window=win[0] if win else None)
        if args.exact_ems:
            n_ex, k_ex = (int(v) for v in args.exact_size.split(":"))
            ems_sets["exact"], ems_secs["exact"] = get_ems(
                mname, model, mix, config, n_ex, k_ex, exact=True, cache=args.cache)
        rows_def = make_rows(config, ems_sets, args.v3_grids, tuple(args.orders))
        if args.rows:
            rows_def = {k: v for k, v in rows_def.items() if any(s in k for s in args.rows)}
        rows = {}
        w = max(len(k) for k in rows_def) if rows_def else 10
        print(f"| {'relative RMSE':<{w}} | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |")
        for name, (group, make) in rows_def.items():
            rec = {"group": group, "err": [], "flips": [], "err_without_flips": []}
            for n in args.nfe:
                try:
                    e, nf, enf = rel_error(model, noise, ref, make(), n, s_end)
                except Exception as err:  # noqa: BLE001 - a failing configuration is a result
                    rec.setdefault("errors", {})[str(n)] = f"{type(err).__name__}: {err}"
                    e, nf, enf = float("nan"), -1, float("nan")
                rec["err"].append(e)
                rec["flips"].append(nf)
                rec["err_without_flips"].append(enf)
            rows[name] = rec
            print(fmt_row(name, rec["err"], w) + " flips " + " ".join(f"{v:d}" for v in rec["flips"])
                  + " | w/o flips " + " ".join(f"{v:.4f}" for v in rec["err_without_flips"]), flush=True)
        summ = summarize(rows, args.nfe, list(ems_sets))
        print(fmt_row("best diffusers", summ["best diffusers"], w))
        for key in ("v3 default / best diffusers", "v3 default / degenerated"):
            if key in summ:
                print(fmt_row(key, summ[key], w, "{:.3f}"))
        print("best diffusers rows: " + ", ".join(f"{n}: {r}" for n, r in zip(args.nfe, summ["best diffusers row"])))
        worst = summ["max over NFE 5-30 of v3 EMS / degenerated (same grid, order)"]
        if worst:
            print("worst v3 EMS / degenerated ratio over NFE 5-30: " + ", ".join(
                f"{k}: {v:.2f}" for k, v in sorted(worst.items(), key=lambda kv: -kv[1])[:6]))
        result["mixtures"][mname] = {
            "config": config["beta_schedule"], "dim": mix.dim, "rows": rows, "summary": summ,
            "ems_seconds": ems_secs, "seconds": round(time.perf_counter() - t_m, 1), "command": command,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
        tmp.replace(out_path)
    if result["mixtures"]:
        plot(result, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
