"""Few-step ODE solver accuracy on the exact Gaussian-mixture diffusion model, and step() overhead.

Accuracy: every solver samples the same class-conditional Gaussian mixture (``dim`` 64, 6
components, 3 classes, ``fewstep.testing.make_gaussian_mixture(seed=0)``) under Stable Diffusion's
VP schedule (``scaled_linear`` betas 0.00085..0.012, 1000 training steps, epsilon prediction), from
the same float64 start noise at ``t = 999``, through ``fewstep.sample`` with the exact model. The
error is the relative RMSE ``||x - x_ref|| / ||x_ref||`` over the batch against the exact ODE
endpoint at ``sigma = 0`` (``fewstep.testing.reference_solve``, DOP853, rtol = atol = 1e-10).

Rows are fewstep's ``DPMSolverPPScheduler`` configurations and diffusers' schedulers, all built from
the same config. Noise and model outputs are float64; fewstep solves in float64, diffusers
schedulers keep float32 schedule tables (and some upcast states to float32), which is far below
the errors measured here. Every grid starts at ``t = 999``: time-uniform rows use ``linspace`` or
``trailing`` spacing (SD's shipped ``leading`` spacing would start each NFE at a different noise
level). SDE solvers are not listed (their endpoint is random, not the ODE endpoint).

Timing: median wall time of one ``step()`` on a (1, 4, 64, 64) float32 latent, single thread.

Run: ``python benchmarks/solvers.py`` (about 1-3 minutes on 2 cores). Writes
``benchmarks/results/solvers.json`` and, when matplotlib is installed, ``solvers.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

import fewstep
from fewstep import NoiseSchedule, sample
from fewstep.samplers import DPMSolverPPScheduler
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture, reference_solve

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}
NFES = (3, 4, 5, 6, 8, 10, 15, 20)
RESULTS = Path(__file__).resolve().parent / "results"


def solver_rows() -> list[tuple[str, type, dict]]:
    """(row name, scheduler class, keyword overrides on :data:`SD_CONFIG`) for every solver listed.

    fewstep rows: multistep order 1/2/3 on four grids (logSNR and Karras with exact float model
    times, ``round_timesteps=False``; one Karras row rounded like diffusers), midpoint vs heun where
    the update differs (2M, 2S, 3S), singlestep DPM-Solver-fast 2S/3S on logSNR and time-uniform
    grids. diffusers rows: DDIM, DPM-Solver++ 2M/3M (plain, Karras, lu-lambdas), singlestep,
    UniPC bh2, DEIS, Euler.
    """
    fs = DPMSolverPPScheduler
    rows: list[tuple[str, type, dict]] = []
    for order in (1, 2, 3):
        for spacing in ("linspace", "trailing", "logsnr", "karras"):
            kw = {"solver_order": order, "timestep_spacing": spacing}
            if spacing in ("logsnr", "karras"):
                kw["round_timesteps"] = False
            rows.append((f"fewstep {order}M {spacing}", fs, kw))
    for spacing in ("logsnr", "karras"):  # 3M with the exact x0'' weight (diffusers/official halve it)
        rows.append((f"fewstep 3M exact {spacing}", fs, {"solver_order": 3, "timestep_spacing": spacing,
                                                         "round_timesteps": False, "exact_third_order": True}))
    rows.append(("fewstep 2M karras, rounded t", fs, {"solver_order": 2, "timestep_spacing": "karras"}))
    rows.append(("fewstep 2M heun linspace", fs, {"solver_order": 2, "solver_type": "heun"}))
    rows.append(("fewstep 2M heun logsnr", fs, {"solver_type": "heun", "timestep_spacing": "logsnr",
                                                "round_timesteps": False}))
    for order in (2, 3):
        for spacing in ("logsnr", "linspace"):
            for stype in ("midpoint", "heun"):
                if spacing == "linspace" and stype == "heun":
                    continue
                kw = {"method": "singlestep", "solver_order": order, "timestep_spacing": spacing,
                      "solver_type": stype, "round_timesteps": False}
                suffix = " heun" if stype == "heun" else ""
                rows.append((f"fewstep {order}S{suffix} {spacing}", fs, kw))
    rows += [
        ("diffusers DDIM (trailing)", DDIMScheduler, {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
        ("diffusers Euler", EulerDiscreteScheduler, {"timestep_spacing": "linspace"}),
        ("diffusers DPM++ 2M", DPMSolverMultistepScheduler, {"solver_order": 2}),
        ("diffusers DPM++ 3M", DPMSolverMultistepScheduler, {"solver_order": 3}),
        ("diffusers DPM++ 2M Karras", DPMSolverMultistepScheduler, {"solver_order": 2, "use_karras_sigmas": True}),
        ("diffusers DPM++ 3M Karras", DPMSolverMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True}),
        ("diffusers DPM++ 2M lu-lambdas", DPMSolverMultistepScheduler, {"solver_order": 2, "use_lu_lambdas": True}),
        ("diffusers DPM++ 2S singlestep", DPMSolverSinglestepScheduler, {"solver_order": 2}),
        ("diffusers DPM++ 3S singlestep", DPMSolverSinglestepScheduler, {"solver_order": 3}),
        ("diffusers UniPC bh2 order 2", UniPCMultistepScheduler, {"solver_type": "bh2", "solver_order": 2}),
        ("diffusers UniPC bh2 order 3", UniPCMultistepScheduler, {"solver_type": "bh2", "solver_order": 3}),
        ("diffusers DEIS order 2", DEISMultistepScheduler, {"solver_order": 2}),
        ("diffusers DEIS order 3", DEISMultistepScheduler, {"solver_order": 3}),
    ]
    return rows


KEY_LINES = (
    "fewstep 2M linspace",
    "fewstep 3M logsnr",
    "fewstep 3S logsnr",
    "diffusers DDIM (trailing)",
    "diffusers DPM++ 2M",
    "diffusers DPM++ 2M Karras",
    "diffusers UniPC bh2 order 3",
    "diffusers DEIS order 3",
)


def _make_scheduler(cls, overrides: dict):
    base = DPMSolverMultistepScheduler(**SD_CONFIG)  # the one shared config, as a diffusers config
    return cls.from_config(base.config, **overrides)


def _final_sigma_ve(sched) -> float:
    """The VE noise level ``sigma/alpha`` a scheduler's last step ends at (0 = fully denoised)."""
    if isinstance(sched, DDIMScheduler):
        # DDIM steps to t - N // n, which is >= 0 (a noisy end) when n does not divide N evenly
        prev = int(sched.timesteps[-1]) - sched.config.num_train_timesteps // sched.num_inference_steps
        if prev < 0 and sched.config.set_alpha_to_one:
            return 0.0
        ac = float(sched.alphas_cumprod[max(prev, 0)])
        return ((1 - ac) / ac) ** 0.5
    return float(sched.sigmas[-1])


def accuracy(batch: int, dim: int, seed: int, nfes=NFES, quiet: bool = False) -> dict:
    """Relative RMSE per (row, NFE) against the exact ODE endpoint; see the module docstring."""
    # make_gaussian_mixture draws its weights from torch's *global* RNG (core bug, reported): seed it
    # here, without disturbing the caller's RNG, so the mixture is the same on every run
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mixture = make_gaussian_mixture(dim=dim, seed=seed)
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    model = GaussianMixtureModel(mixture, schedule, "epsilon")
    labels = torch.arange(batch) % mixture.num_classes
    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    t0 = 999.0
    alpha0, s_ve0 = float(schedule.alpha(t0)), float(schedule.sigma_ve(t0))
    tic = time.perf_counter()
    s_min = float(schedule.sigma_ve(0.0))  # t = 0, the last model time of most grids
    at_min = reference_solve(mixture, noise / alpha0, s_ve0, s_min, c=labels)
    ref = reference_solve(mixture, at_min, s_min, 0.0, c=labels)
    ref_seconds = time.perf_counter() - tic
    ref_norm = ref.norm().item()
    # the floor of every grid that ends with a first-order jump from t = 0 (sigma/alpha = 0.029) to
    # sigma = 0: even the exact state at t = 0, denoised exactly, misses the ODE endpoint by this much
    floor = (mixture.denoise_ve(at_min, s_min, labels) - ref).norm().item() / ref_norm

    table: dict[str, dict[int, float]] = {}
    median: dict[str, dict[int, float]] = {}
    notes: dict[str, dict] = {}
    for name, cls, overrides in solver_rows():
        table[name], median[name], finals = {}, {}, {}
        for n in nfes:
            sched = _make_scheduler(cls, overrides)
            x, nfe = sample(model, noise, sched, n, cond=labels)
            if nfe != n:
                raise RuntimeError(f"{name}: {nfe} model evaluations for NFE {n}")
            if abs(float(sched.timesteps[0]) - t0) > 1e-6:
                raise RuntimeError(f"{name}: grid starts at t={float(sched.timesteps[0])}, not {t0}")
            err = x.double() - ref
            table[name][n] = err.norm().item() / ref_norm
            median[name][n] = (err.norm(dim=1) / ref.norm(dim=1)).median().item()
            finals[n] = _final_sigma_ve(sched)
        notes[name] = {"class": cls.__name__, "overrides": overrides, "final_sigma_ve": dict(finals)}
        if not quiet:
            print(f"  {name:34s} " + " ".join(f"{table[name][n]:.2e}" for n in nfes), file=sys.stderr)
    return {
        "table": table,
        "median": median,
        "final_jump_floor": floor,
        "rows": notes,
        "reference_seconds": ref_seconds,
        "start": {"t": t0, "alpha": alpha0, "sigma_ve": s_ve0},
    }


def time_steps(reps: int = 5, steps: int = 50) -> dict:
    """Median seconds of one ``step()`` on a (1, 4, 64, 64) float32 latent (single thread):
    fewstep DPMSolverPP 2M/3M vs diffusers DPMSolverMultistep 2M/3M, interleaved runs of ``steps``
    steps (the first run of each is warmup)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 64, 64, generator=g)
    outs = [torch.randn(1, 4, 64, 64, generator=g) for _ in range(steps)]
    makers = {
        ("fewstep", 2): lambda: DPMSolverPPScheduler(**SD_CONFIG, solver_order=2),
        ("diffusers", 2): lambda: DPMSolverMultistepScheduler(**SD_CONFIG, solver_order=2),
        ("fewstep", 3): lambda: DPMSolverPPScheduler(**SD_CONFIG, solver_order=3),
        ("diffusers", 3): lambda: DPMSolverMultistepScheduler(**SD_CONFIG, solver_order=3),
    }
    scheds = {k: make() for k, make in makers.items()}
    times: dict = {k: [] for k in makers}
    try:
        for rep in range(reps + 1):
            for key, sched in scheds.items():
                sched.set_timesteps(steps)
                x = x0
                for i, t in enumerate(sched.timesteps):
                    tic = time.perf_counter()
                    x = sched.step(outs[i], t, x, return_dict=False)[0]
                    dt = time.perf_counter() - tic
                    if rep > 0:
                        times[key].append(dt)
    finally:
        torch.set_num_threads(before)
    med = {f"{lib} {order}M": statistics.median(v) for (lib, order), v in times.items()}
    ratios = {f"{o}M": med[f"fewstep {o}M"] / med[f"diffusers {o}M"] for o in (2, 3)}
    return {"median_seconds": med, "ratio_fewstep_over_diffusers": ratios, "calls_per_median": reps * steps,
            "shape": [1, 4, 64, 64], "dtype": "float32", "threads": 1}


def markdown(table: dict[str, dict[int, float]], nfes) -> str:
    """A Markdown table: rows = solvers, columns = NFE, best (lowest) value per column in bold."""
    best = {n: min(row[n] for row in table.values() if math.isfinite(row[n])) for n in nfes}
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---:|" * len(nfes)]
    for name, row in table.items():
        cells = []
        for n in nfes:
            v = f"{row[n]:.2e}"
            cells.append(f"**{v}**" if row[n] == best[n] else v)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: dict, nfes, path: Path, floor: float | None = None) -> bool:
    """Log-log plot of error vs NFE for :data:`KEY_LINES`; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in KEY_LINES:
        style = "-" if name.startswith("fewstep") else "--"
        ax.plot(nfes, [table[name][n] for n in nfes], style, marker="o", ms=3, label=name)
    if floor is not None:
        ax.axhline(floor, color="k", lw=0.8, ls=":", label="floor: exact state at t=0, exact denoiser")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(nfes))
    ax.set_xticklabels([str(n) for n in nfes])
    ax.set_xlabel("NFE (model evaluations)")
    ax.set_ylabel("relative RMSE to exact ODE endpoint")
    ax.set_title("Gaussian mixture, SD VP schedule, epsilon prediction")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    """Run both benchmarks, print the tables, write JSON (and PNG); returns the JSON payload."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args(argv)
    tic = time.perf_counter()
    acc = accuracy(args.batch, args.dim, args.seed)
    nfes = list(NFES)
    print("## Relative RMSE to the exact ODE endpoint (lower is better; best per column in bold)\n")
    print(f"Gaussian mixture dim {args.dim}, batch {args.batch}, class-conditional (labels 0,1,2 cycled), "
          "SD scaled_linear VP schedule, epsilon prediction, float64, start t=999.\n")
    print(markdown(acc["table"], nfes))
    print(f"\nFloor of any grid whose last step jumps from t = 0 (sigma/alpha = 0.0292) to sigma = 0 with the "
          f"exact denoiser: {acc['final_jump_floor']:.2e}. Time-uniform grids jump from t ~ 1000/NFE, "
          "a far higher floor.")
    noisy = []
    for k, v in acc["rows"].items():
        at = [n for n, f in v["final_sigma_ve"].items() if f > 0]
        if at:
            level = max(v["final_sigma_ve"][n] for n in at)
            noisy.append(f"{k} at NFE {', '.join(map(str, at))} (sigma/alpha up to {level:.4f})")
    if noisy:
        print("Cells that end above sigma = 0 (the scheduler returns a state at that noise level): "
              + "; ".join(noisy) + ".")
    print("\n## Median over samples of the per-sample relative error (insensitive to the rare sample that "
          "lands in another mixture component, which dominates the RMSE of some cells)\n")
    print(markdown(acc["median"], nfes))
    timing = None
    if not args.no_timing:
        timing = time_steps()
        print("\n## step() time, (1, 4, 64, 64) float32, 1 thread, median\n")
        for k, v in timing["median_seconds"].items():
            print(f"- {k}: {v * 1e6:.1f} us")
        for k, v in timing["ratio_fewstep_over_diffusers"].items():
            print(f"- ratio fewstep / diffusers ({k}): {v:.2f}")
    payload = {
        "benchmark": "solvers",
        "command": "python benchmarks/solvers.py" + (" " + " ".join(argv) if argv else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "scheduler_config": SD_CONFIG,
            "mixture": {"dim": args.dim, "num_components": 6, "num_classes": 3, "seed": args.seed},
            "batch": args.batch,
            "conditioning": "class-conditional, labels arange(batch) % 3",
            "dtype": "float64 noise and model outputs",
            "metric": "||x - x_ref|| / ||x_ref||, x_ref = reference_solve(..., s_end=0), DOP853 rtol=atol=1e-10",
            "nfes": nfes,
            **acc["start"],
        },
        "versions": {
            "fewstep": fewstep.__version__,
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "rows": acc["rows"],
        "relative_rmse": {k: {str(n): v for n, v in row.items()} for k, row in acc["table"].items()},
        "median_relative_error": {k: {str(n): v for n, v in row.items()} for k, row in acc["median"].items()},
        "final_jump_floor": acc["final_jump_floor"],
        "best_per_nfe": {str(n): min(acc["table"], key=lambda k: acc["table"][k][n]) for n in nfes},
        "reference_seconds": acc["reference_seconds"],
        "step_timing": timing,
        "total_seconds": None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if plot(acc["table"], nfes, args.out / "solvers.png", acc["final_jump_floor"]):
        print(f"\nplot: {args.out / 'solvers.png'}")
    payload["total_seconds"] = round(time.perf_counter() - tic, 1)
    (args.out / "solvers.json").write_text(json.dumps(payload, indent=1))
    print(f"json: {args.out / 'solvers.json'}  ({payload['total_seconds']} s)")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
