"""Benchmark of USF schedules and ``fewstep search`` (issue 13).

Parts (``--part``, several allowed):

* ``ship``: run the shipped searches on the digits teacher (w = 1 and CFG 2, NFE 3, 4, 5, 6, 8; batch
  64, 500-step reference, predictor on, ``--minutes`` at NFE 4-6 and ``--minutes-other`` at 3 and 8),
  resumable (logs in ``--cache``), and write the best schedules to
  ``configs/usf/digits[_cfg2]_nfe{n}.json`` and the identical package-data copies
  ``fewstep/models/weights/usf_digits[_cfg2]_nfe{n}.json``. Re-run it after the shipped EMS change.
* ``digits``: the shipped schedules on held-out noise (seeds ``--holdout-seeds``, never a search
  batch: those are 0, 5000, 10000), against a 1000-step reference (DPM-Solver++ 2M on every training
  time, then the data prediction), next to every hand-set fewstep scheduler (DPM-Solver++ 2M/3M on
  trailing, time_power 1.3/2, logsnr, logsnr clipped at -5.1, Karras; heun 2M, exact 3M, singlestep
  2S/3S; DPM-Solver-v3 with the shipped EMS), the grid-searched ``logsnr[-3,2.5]`` rows of
  benchmarks/dpm_v3_grid_search.py, momentum schedulers when ``fewstep.samplers.momentum`` exists,
  and diffusers' UniPC, DEIS and DPM-Solver++: RMSE, FD-digits and accuracy per seed.
* ``mixture``: searches on the exact 64-dimensional Gaussian mixture of benchmarks/solvers.py at
  NFE 4, 5, 6 (batch 1024, exact ODE reference) and the same held-out comparison.
* ``proxy``: how the RMSE proxy ranks candidates against FD-digits: candidates of the NFE-5 digits
  search log spread over its score range, scored on held-out noise (RMSE, FD-digits), Spearman rank
  correlations.
* ``predictor``: searches on the mixture with and without the S^3 predictor, three seeds each: best
  score after each evaluation count, evaluations to reach the no-predictor final best.
* ``reference``: FD-digits of the held-out 1000-step references themselves (what an exact solver
  reaches), to read the FD differences between accurate solvers against.
* ``plot``: ``benchmarks/results/usf_search.png`` (digits RMSE and FD-digits against NFE, the mixture,
  the predictor curves) and the target summary table, from the results JSON.

Targets (issue 13): at NFE 4, 5, 6 the searched schedule's RMSE to the reference is <= 0.6x the best
hand-set configuration and its FD-digits is lower; the same on the mixture; one search < 20 minutes.
Writes ``benchmarks/results/usf_search.json`` (parts merge) and prints markdown tables.

Usage::

    python benchmarks/usf_search.py --part ship                 # 10 searches x ~18 min, resumable
    python benchmarks/usf_search.py --part digits mixture proxy predictor
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "usf_search.json"
CONFIGS = ROOT / "configs" / "usf"
PACKAGE = ROOT / "fewstep" / "models" / "weights"
SHIP = [(w, n) for w in (1.0, 2.0) for n in (5, 4, 6, 3, 8)]
TARGET_NFES = (4, 5, 6)
TARGET_RATIO = 0.6


def ship_name(w: float, nfe: int) -> str:
    return f"digits{'' if w == 1 else f'_cfg{w:g}'}_nfe{nfe}"


def _save(data: dict, path: Path | None = None) -> None:
    path = path or RESULTS
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(old, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def _set_results(path: str) -> None:
    global RESULTS
    RESULTS = Path(path)


# ------------------------------------------------------------------------------------------------
# ship: the searches behind configs/usf
# ------------------------------------------------------------------------------------------------
def ship_settings(nfe: int, batch: int = 64):
    from fewstep.samplers.search import SearchSettings

    return SearchSettings(nfe=nfe, population=16, batch=batch, seed=0, reference_steps=500, validate_top=16,
                          holdout=0, predictor=True)


def part_ship(args) -> dict:
    from fewstep.samplers.search import run_search
    from fewstep.samplers.search_problem import digits_problem

    out = _load().get("ship", {})
    cache = Path(args.cache)
    for w, nfe in SHIP:
        if args.only_nfe and nfe not in args.only_nfe or args.only_w and w not in args.only_w:
            continue
        name = ship_name(w, nfe)
        problem = digits_problem(w)
        log = cache / f"{name}.log.json"
        minutes = args.minutes if nfe in TARGET_NFES else args.minutes_other
        print(f"--- search {name} ({minutes} min) ---", flush=True)
        seeds = grid_seeds(problem, nfe) if args.seed_grid else ()
        res = run_search(problem, ship_settings(nfe, args.ship_batch), budget_minutes=minutes, log_path=log,
                         resume=log.exists(), progress=not args.quiet, seeds=seeds)
        best = res.best
        best.info["command"] = ("python benchmarks/usf_search.py --part ship" + (" --seed-grid" if seeds else "")
                                + (f" --ship-batch {args.ship_batch}" if args.ship_batch != 64 else ""))
        path = best.save(CONFIGS / f"{name}.json")
        shutil.copyfile(path, PACKAGE / f"usf_{name}.json")
        seeds = [c for c in res.candidates if c["origin"].startswith("seed:") and c["score"] is not None]
        best_seed = min(seeds, key=lambda c: c["score"])
        out[name] = {"evaluations": res.evaluations, "generations": res.generations,
                     "minutes": round(res.seconds / 60, 2), "reference_seconds": res.log.get("reference_seconds"),
                     "validation_seconds": res.log.get("validation_seconds"), "search_score": res.best_score,
                     "validation_score": best.info["search"]["validation"],
                     "best_seed": best_seed["origin"], "best_seed_score": best_seed["score"],
                     "uses_v3": best.uses_v3, "afs": best.afs}
        print(json.dumps(out[name]), flush=True)
        _save({"ship": out})
    return out


def grid_seeds(problem, nfe: int) -> list:
    """``--seed-grid``: the grid-searched rows of :func:`extra_handset_rows` (v3 and DPM++ 2M on the
    logsnr[-3,2.5] grid of benchmarks/dpm_v3_grid_search.py, the best hand-set settings at NFE 5-6)
    exported as extra search seeds."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dpm_v3_grid_search import grid_fn

    from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler
    from fewstep.samplers.usf_schedule import schedule_from_scheduler
    from fewstep.schedule import NoiseSchedule

    cfg = dict(problem.scheduler_config)
    times = np.asarray(grid_fn(problem.ems, NoiseSchedule.from_config(cfg), "logsnr", lo=-3.0, hi=2.5)(nfe))
    scheds = {"v3-o2 logsnr[-3,2.5] (grid-searched)": DPMSolverV3Scheduler.from_config(cfg, ems=problem.ems,
                                                                                        solver_order=2),
              "dpmpp-2m logsnr[-3,2.5] (grid-searched)": DPMSolverPPScheduler.from_config(cfg, solver_order=2,
                                                                                          round_timesteps=False)}
    return [(name, schedule_from_scheduler(sc, ems_name=problem.ems_name, timesteps=times))
            for name, sc in scheds.items()]


# ------------------------------------------------------------------------------------------------
# held-out comparison
# ------------------------------------------------------------------------------------------------
def extra_handset_rows(problem, nfe: int) -> list:
    """Rows beyond search.handset_schedulers: the grid-searched logsnr[-3,2.5] grid of
    benchmarks/dpm_v3_grid_search.py with v3 and DPM++ 2M, and momentum schedulers if present."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dpm_v3_digits import install_grid
    from dpm_v3_grid_search import grid_fn

    from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler
    from fewstep.schedule import NoiseSchedule

    cfg = dict(problem.scheduler_config)
    rows = []
    # singlestep DPM-Solver-fast on the grids the search's seeds leave out (they have trailing, logsnr-clip)
    grids = {"power1.3": {"timestep_spacing": "time_power", "timestep_power": 1.3},
             "power2": {"timestep_spacing": "time_power", "timestep_power": 2.0},
             "logsnr": {"timestep_spacing": "logsnr", "round_timesteps": False},
             "karras": {"timestep_spacing": "karras", "round_timesteps": False}}
    if "time_power" not in NoiseSchedule.from_config(cfg).spacings:
        grids = {k: v for k, v in grids.items() if not k.startswith("power")}
    for order in (2, 3):
        for gname, g in grids.items():
            rows.append((f"dpmpp-{order}s {gname}", lambda order=order, g=g: DPMSolverPPScheduler.from_config(
                cfg, solver_order=order, method="singlestep", **g)))
    if problem.ems is not None:
        schedule = NoiseSchedule.from_config(cfg)
        grid = grid_fn(problem.ems, schedule, "logsnr", lo=-3.0, hi=2.5)

        def on_grid(make):
            def factory():
                s = make()
                set_ts = s.set_timesteps

                def set_timesteps(*a, **k):
                    s.set_timesteps = set_ts
                    install_grid(s, grid(nfe), schedule)
                    s.set_timesteps = set_timesteps

                s.set_timesteps = set_timesteps
                return s
            return factory

        rows.append(("v3-o2 logsnr[-3,2.5] (grid-searched)", on_grid(
            lambda: DPMSolverV3Scheduler.from_config(cfg, ems=problem.ems, solver_order=2))))
        rows.append(("dpmpp-2m logsnr[-3,2.5] (grid-searched)", on_grid(
            lambda: DPMSolverPPScheduler.from_config(cfg, solver_order=2, round_timesteps=False))))
    try:
        import fewstep.samplers.momentum as momentum  # noqa: F401  (issue: momentum samplers, when merged)
    except ImportError:
        momentum = None
    if momentum is not None:
        cls = getattr(momentum, "MomentumScheduler", None)
        if cls is not None:
            # the class defaults: GHVB on the PLMS4 base with beta 0.8 (momentum number 3.8)
            rows.append(("momentum ghvb-3.8 trailing", lambda: cls.from_config(cfg, timestep_spacing="trailing")))
    return rows


def compare(problem, schedules: dict, nfe: int, seeds: list[int], n: int, ref_steps: int, cache: Path,
            with_fd: bool) -> dict:
    """Every row on every held-out seed: ``{row: {"group", "rmse": [...], "fd": [...], "acc": [...]}}``."""
    from fewstep.samplers.search import handset_schedulers, make_usf, rmse

    rows = {name: ("usf", s) for name, s in schedules.items()}
    rows.update({name: ("hand-set" if not name.startswith("diffusers") else "diffusers", f)
                 for name, f in handset_schedulers(problem, nfe) + extra_handset_rows(problem, nfe)})
    out = {name: {"group": g, "rmse": [], "fd": [], "acc": []} for name, (g, _) in rows.items()}
    for seed in seeds:
        batch = problem.make_batch(n, seed)
        ref = reference_cached(problem, batch, seed, ref_steps, cache)
        for name, (group, obj) in rows.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    x = problem.sample(make_usf(problem, obj), batch) if group == "usf" else \
                        problem.sample(obj(), batch, nfe)
                    err = rmse(x, ref)
                    fd, acc = fd_acc(x, batch) if with_fd else (math.nan, math.nan)
                except (ValueError, RuntimeError, FloatingPointError) as e:
                    print(f"  {name}: {type(e).__name__}: {e}", flush=True)
                    err = fd = acc = math.nan
            out[name]["rmse"].append(err)
            out[name]["fd"].append(fd)
            out[name]["acc"].append(acc)
    return out


_FD = {}


def fd_acc(x, batch) -> tuple[float, float]:
    from fewstep.eval.fd_digits import DigitsFeatures, fd_digits
    from fewstep.models import load_digits_split

    if not _FD:
        _FD["ext"], _FD["test"] = DigitsFeatures(), load_digits_split("test")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fd_digits((x.float().clamp(-1, 1) + 1) / 2, labels=batch.cond.cpu(), extractor=_FD["ext"],
                        reference=_FD["test"])
    return float(res["fd"]), float(res["accuracy"])


def reference_cached(problem, batch, seed: int, steps: int, cache: Path) -> torch.Tensor:
    path = cache / f"ref_{problem.name.replace('/', '_')}_w{problem.guidance_scale:g}_s{seed}_n{len(batch)}_{steps}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    ref = problem.reference(batch, steps)
    print(f"  reference seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    return ref


def summarize(rows: dict, with_fd: bool) -> dict:
    """Means over seeds, the best hand-set row by mean RMSE (and by mean FD), the USF ratios."""
    def mean(v):
        v = [x for x in v if not math.isnan(x)]
        return statistics.fmean(v) if v else math.nan

    hand = {k: r for k, r in rows.items() if r["group"] != "usf" and not math.isnan(mean(r["rmse"]))}
    best = min(hand, key=lambda k: mean(hand[k]["rmse"]))
    usf = next(k for k, r in rows.items() if r["group"] == "usf")
    ratios = [u / b for u, b in zip(rows[usf]["rmse"], hand[best]["rmse"])]
    out = {"usf": usf, "usf_rmse": mean(rows[usf]["rmse"]), "best_handset": best,
           "best_handset_rmse": mean(hand[best]["rmse"]), "ratio": mean(ratios), "ratio_per_seed": ratios,
           "ratio_target_met": all(r <= TARGET_RATIO for r in ratios)}
    if with_fd:
        best_fd = min(hand, key=lambda k: mean(hand[k]["fd"]))
        out.update({"usf_fd": mean(rows[usf]["fd"]), "best_handset_fd_row": best_fd,
                    "best_handset_fd": mean(hand[best_fd]["fd"]), "fd_of_best_rmse_row": mean(hand[best]["fd"]),
                    "fd_target_met": mean(rows[usf]["fd"]) < mean(hand[best_fd]["fd"])})
    return out


def print_table(title: str, rows: dict, summary: dict, with_fd: bool) -> None:
    def fmt(v):
        v = [x for x in v if not math.isnan(x)]
        if not v:
            return "failed"
        return f"{statistics.fmean(v):.4f} ± {statistics.pstdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"

    print(f"\n#### {title}\n")
    print("| schedule | group | RMSE (mean ± sd over seeds) |" + (" FD-digits | accuracy |" if with_fd else ""))
    print("|---|---|---|" + ("---|---|" if with_fd else ""))
    order = sorted(rows, key=lambda k: statistics.fmean([x for x in rows[k]["rmse"] if not math.isnan(x)] or [9e9]))
    for k in order:
        r = rows[k]
        line = f"| {k} | {r['group']} | {fmt(r['rmse'])} |"
        if with_fd:
            line += f" {fmt(r['fd'])} | {fmt(r['acc'])} |"
        print(line)
    print(f"\nUSF / best hand-set ({summary['best_handset']}): {summary['ratio']:.3f} "
          f"(per seed {', '.join(f'{r:.3f}' for r in summary['ratio_per_seed'])}); target <= {TARGET_RATIO}: "
          f"{'met' if summary['ratio_target_met'] else 'MISSED'}")
    if with_fd:
        print(f"FD-digits: USF {summary['usf_fd']:.3f} vs best hand-set FD {summary['best_handset_fd']:.3f} "
              f"({summary['best_handset_fd_row']}): {'lower' if summary['fd_target_met'] else 'NOT lower'}")


def part_digits(args) -> dict:
    from fewstep.samplers.search_problem import digits_problem
    from fewstep.samplers.usf_schedule import USFSchedule

    out = _load().get("digits", {})
    for w in args.guidance:
        problem = digits_problem(w)
        for nfe in args.nfe:
            name = ship_name(w, nfe)
            path = CONFIGS / f"{name}.json"
            if not path.exists():
                print(f"{path} missing: run --part ship first", flush=True)
                continue
            t0 = time.perf_counter()
            rows = compare(problem, {f"usf {name}": USFSchedule.load(path)}, nfe, args.holdout_seeds, args.n,
                           args.ref_steps, Path(args.cache), with_fd=True)
            summary = summarize(rows, True)
            out[name] = {"w": w, "nfe": nfe, "rows": rows, "summary": summary,
                         "seconds": round(time.perf_counter() - t0, 1)}
            print_table(f"digits w={w:g} NFE {nfe} (N={args.n}, seeds {args.holdout_seeds})", rows, summary, True)
            _save({"digits": out})
    return out


def part_mixture(args) -> dict:
    from fewstep.samplers.search import SearchSettings, run_search
    from fewstep.samplers.search_problem import mixture_problem

    out = _load().get("mixture", {})
    problem = mixture_problem(dim=64, seed=0)
    for nfe in args.nfe:
        if nfe not in TARGET_NFES and nfe not in args.mixture_nfe:
            continue
        settings = SearchSettings(nfe=nfe, population=16, batch=1024, seed=0, validate_top=16, holdout=0,
                                  predictor=True)
        log = Path(args.cache) / f"mixture_nfe{nfe}.log.json"
        t0 = time.perf_counter()
        res = run_search(problem, settings, budget_evals=args.mixture_budget, log_path=log, resume=log.exists(),
                         progress=not args.quiet)
        rows = compare(problem, {f"usf mixture nfe{nfe}": res.best}, nfe, args.holdout_seeds, 2048, 0,
                       Path(args.cache), with_fd=False)
        summary = summarize(rows, False)
        out[f"nfe{nfe}"] = {"nfe": nfe, "rows": rows, "summary": summary, "evaluations": res.evaluations,
                            "search_minutes": round(res.seconds / 60, 2), "schedule": res.best.to_dict(),
                            "seconds": round(time.perf_counter() - t0, 1)}
        print_table(f"mixture d64 NFE {nfe} (N=2048, seeds {args.holdout_seeds})", rows, summary, False)
        _save({"mixture": out})
    return out


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def part_proxy(args) -> dict:
    """Rank correlation of the RMSE proxy with FD-digits on held-out noise."""
    from fewstep.samplers.search import make_usf, rmse
    from fewstep.samplers.search_problem import digits_problem
    from fewstep.samplers.usf_schedule import USFSchedule

    out = _load().get("proxy", {})
    for w in args.guidance:
        name = ship_name(w, 5)
        log = Path(args.cache) / f"{name}.log.json"
        if not log.exists():
            print(f"{log} missing: run --part ship first", flush=True)
            continue
        cands = [c for c in json.loads(log.read_text())["candidates"] if c["score"] is not None]
        cands.sort(key=lambda c: c["score"])
        # spread over the score range: every k-th candidate by rank, plus the 10 best
        pick = sorted({*range(10), *np.linspace(0, len(cands) - 1, args.proxy_candidates - 10).round().astype(int)})
        problem = digits_problem(w)
        seed = args.holdout_seeds[0]
        batch = problem.make_batch(args.n, seed)
        ref = reference_cached(problem, batch, seed, args.ref_steps, Path(args.cache))
        search, held, fds = [], [], []
        for i in pick:
            c = cands[int(i)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = problem.sample(make_usf(problem, USFSchedule.from_dict(c["schedule"])), batch)
            search.append(c["score"])
            held.append(rmse(x, ref))
            fds.append(fd_acc(x, batch)[0])
        top = list(range(10))
        out[f"w{w:g}"] = {"candidates": len(pick), "n": args.n, "seed": seed,
                          "spearman_search_vs_heldout_rmse": spearman(search, held),
                          "spearman_heldout_rmse_vs_fd": spearman(held, fds),
                          "spearman_search_vs_fd": spearman(search, fds),
                          "spearman_top10_heldout_rmse_vs_fd": spearman([held[i] for i in top], [fds[i] for i in top]),
                          "search": search, "heldout_rmse": held, "fd": fds}
        r = out[f"w{w:g}"]
        print(f"\nproxy w={w:g}: {len(pick)} candidates of {name}: Spearman(search score, held-out RMSE) = "
              f"{r['spearman_search_vs_heldout_rmse']:.3f}; Spearman(held-out RMSE, FD-digits) = "
              f"{r['spearman_heldout_rmse_vs_fd']:.3f}; among the 10 best: "
              f"{r['spearman_top10_heldout_rmse_vs_fd']:.3f}", flush=True)
        _save({"proxy": out})
    return out


def part_predictor(args) -> dict:
    from fewstep.samplers.search import SearchSettings, run_search
    from fewstep.samplers.search_problem import mixture_problem

    problem = mixture_problem(dim=64, seed=0)
    checkpoints = [c for c in (50, 100, 150, 200, 300, 400) if c <= args.predictor_budget]
    runs = {}
    for predictor in (False, True):
        for seed in (1, 2, 3):
            settings = SearchSettings(nfe=5, population=16, batch=1024, seed=seed, predictor=predictor,
                                      validate_top=0, holdout=0)
            log = Path(args.cache) / f"predictor_{int(predictor)}_s{seed}.log.json"
            res = run_search(problem, settings, budget_evals=args.predictor_budget, log_path=log, resume=log.exists())
            scores = [c["score"] if c["score"] is not None else math.inf for c in res.candidates]
            best_so_far = np.minimum.accumulate(scores)
            runs[f"{'with' if predictor else 'without'} s{seed}"] = {
                "best_at": {str(c): float(best_so_far[c - 1]) for c in checkpoints},
                "best_so_far": best_so_far.tolist(), "minutes": round(res.seconds / 60, 2)}
    summary = {}
    for seed in (1, 2, 3):
        a, b = runs[f"without s{seed}"]["best_so_far"], runs[f"with s{seed}"]["best_so_far"]
        final = a[-1]
        reach = next((i + 1 for i, v in enumerate(b) if v <= final), None)
        summary[f"s{seed}"] = {"without_final": final, "with_final": b[-1], "with_evals_to_reach_without_final": reach,
                               "budget": len(a)}
    out = {"runs": runs, "summary": summary, "checkpoints": checkpoints}
    print("\n| seed | evals | best without | best with | with: evals to reach 'without' final |\n|---|---|---|---|---|")
    for seed in (1, 2, 3):
        s = summary[f"s{seed}"]
        print(f"| {seed} | {s['budget']} | {s['without_final']:.4f} | {s['with_final']:.4f} | "
              f"{s['with_evals_to_reach_without_final']} |")
    for c in checkpoints:
        w = [runs[f"without s{s}"]["best_at"][str(c)] for s in (1, 2, 3)]
        p = [runs[f"with s{s}"]["best_at"][str(c)] for s in (1, 2, 3)]
        print(f"after {c} evaluations: mean best without {statistics.fmean(w):.4f}, with {statistics.fmean(p):.4f}")
    _save({"predictor": out})
    return out


def part_reference(args) -> dict:
    """FD-digits and accuracy of the 1000-step reference solutions themselves (the held-out batches of
    ``digits``; references from the cache, computed when missing): the FD a solver reaches when it
    matches the ODE solution exactly, so the FD differences between accurate solvers can be read."""
    from fewstep.samplers.search_problem import digits_problem

    out = _load().get("reference", {})
    for w in args.guidance:
        problem = digits_problem(w)
        rows = {"fd": [], "acc": []}
        for seed in args.holdout_seeds:
            batch = problem.make_batch(args.n, seed)
            fd, acc = fd_acc(reference_cached(problem, batch, seed, args.ref_steps, Path(args.cache)), batch)
            rows["fd"].append(fd)
            rows["acc"].append(acc)
        out[f"w{w:g}"] = {**rows, "fd_mean": _mean(rows["fd"]), "seeds": args.holdout_seeds, "n": args.n,
                          "steps": args.ref_steps}
        print(f"reference ({args.ref_steps} steps) w={w:g}: FD-digits {', '.join(f'{x:.3f}' for x in rows['fd'])} "
              f"(mean {_mean(rows['fd']):.3f}), accuracy {_mean(rows['acc']):.4f}", flush=True)
    _save({"reference": out})
    return out


def _mean(v) -> float:
    v = [x for x in v if not math.isnan(x)]
    return statistics.fmean(v) if v else math.nan


def part_plot(args) -> dict:
    """benchmarks/results/usf_search.png from the results JSON: digits RMSE and FD-digits against NFE
    (the USF schedule, the best hand-set row per NFE, diffusers' schedulers), the mixture RMSE, the
    predictor's best-so-far curves and the proxy scatter; prints the target summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = _load()
    fig, grid = plt.subplots(2, 3, figsize=(17, 9))
    digits, mixture = res.get("digits", {}), res.get("mixture", {})
    summary = {}
    for key, label, with_fd in [(k, f"digits w={v['w']:g}", True) for k, v in sorted(digits.items())] + \
            [(k, "mixture d64", False) for k in sorted(mixture)]:
        entry = (digits if with_fd else mixture)[key]
        s = entry["summary"]
        summary[f"{label} nfe{entry['nfe']}"] = {k: s[k] for k in ("ratio", "ratio_target_met", "usf_rmse",
                                                                   "best_handset", "best_handset_rmse")}
        summary[f"{label} nfe{entry['nfe']}"]["per_seed"] = s["ratio_per_seed"]
        rows = entry["rows"]
        diff = min((k for k, r in rows.items() if r["group"] == "diffusers"), key=lambda k: _mean(rows[k]["rmse"]),
                   default=None)
        if diff is not None:  # the best of diffusers' schedulers alone, for the README question
            summary[f"{label} nfe{entry['nfe']}"].update({"best_diffusers": diff, "ratio_to_best_diffusers": _mean(
                rows[s["usf"]]["rmse"]) / _mean(rows[diff]["rmse"])})
        if with_fd:
            summary[f"{label} nfe{entry['nfe']}"].update({k: s[k] for k in ("usf_fd", "best_handset_fd",
                                                                            "best_handset_fd_row", "fd_target_met")})
    panels = [(grid[i][j], w, metric, f"digits w={w}: " + ("RMSE to 1000-step reference" if j == 0 else "FD-digits"))
              for i, w in enumerate((1, 2)) for j, metric in enumerate(("rmse", "fd"))]
    for ax, w, metric, title in panels:
        rows = {k: v for k, v in digits.items() if v["w"] == w}
        if not rows:
            continue
        nfes = sorted(v["nfe"] for v in rows.values())
        by_nfe = {v["nfe"]: v for v in rows.values()}

        def series(pick):
            return [_mean(pick(by_nfe[n])) for n in nfes]

        ax.plot(nfes, series(lambda e: e["rows"][e["summary"]["usf"]][metric]), "o-", lw=2, label="USF (searched)")
        best_key = "best_handset" if metric == "rmse" else "best_handset_fd_row"
        ax.plot(nfes, series(lambda e: e["rows"][e["summary"][best_key]][metric]), "s--",
                label="best hand-set or diffusers (per NFE)")
        for name in ("diffusers unipc", "diffusers deis", "diffusers dpmpp-2m"):
            got = [n for n in nfes if any(k.startswith(name) for k in by_nfe[n]["rows"])]
            if got:
                vals = [_mean(next(r for k, r in by_nfe[n]["rows"].items() if k.startswith(name))[metric]) for n in got]
                ax.plot(got, vals, ":", marker=".", label=name)
        ref = res.get("reference", {}).get(f"w{w}")
        if metric == "fd" and ref:
            ax.axhline(ref["fd_mean"], color="k", lw=0.8, label=f"{ref['steps']}-step reference itself")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(title)
        ax.legend(fontsize=7)
    ax = grid[0][2]
    for nfe_key, e in sorted(mixture.items()):
        ax.bar([f"{e['nfe']} usf", f"{e['nfe']} hand"], [e["summary"]["usf_rmse"], e["summary"]["best_handset_rmse"]])
    ax.set_yscale("log")
    ax.set_title("mixture d64: RMSE to the exact ODE solution")
    pred = res.get("predictor", {}).get("runs", {})
    ax = grid[1][2]
    for name, run in sorted(pred.items()):
        ax.plot(range(1, len(run["best_so_far"]) + 1), run["best_so_far"], "-" if name.startswith("with ") else "--",
                label=name)
    ax.set_yscale("log")
    ax.set_xlabel("evaluations")
    ax.set_title("mixture NFE 5: best score so far (S^3 predictor)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    print("\n| setting | USF RMSE | best hand-set (RMSE) | ratio (target <= 0.6) | per seed | USF / best diffusers "
          "| USF FD | best hand-set FD | FD lower |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, s in summary.items():
        fd = (f"{s['usf_fd']:.2f} | {s['best_handset_fd']:.2f} ({s['best_handset_fd_row']}) | "
              f"{'yes' if s['fd_target_met'] else 'no'}") if "usf_fd" in s else "- | - | -"
        diff = f"{s['ratio_to_best_diffusers']:.3f} ({s['best_diffusers']})" if "best_diffusers" in s else "-"
        print(f"| {k} | {s['usf_rmse']:.4f} | {s['best_handset']} ({s['best_handset_rmse']:.4f}) | {s['ratio']:.3f} "
              f"({'met' if s['ratio_target_met'] else 'missed'}) | {', '.join(f'{r:.3f}' for r in s['per_seed'])} | "
              f"{diff} | {fd} |")
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", nargs="+", default=["digits", "mixture", "proxy", "predictor"],
                    choices=["ship", "digits", "mixture", "proxy", "predictor", "reference", "plot"])
    ap.add_argument("--minutes", type=float, default=15.0, help="ship: search budget at NFE 4-6 (minutes)")
    ap.add_argument("--minutes-other", type=float, default=10.0, help="ship: search budget at NFE 3 and 8")
    ap.add_argument("--only-nfe", type=int, nargs="*", default=None, help="ship: only these NFE")
    ap.add_argument("--ship-batch", type=int, default=64, help="ship: search (and validation) batch size")
    ap.add_argument("--seed-grid", action="store_true",
                    help="ship: also seed the searches with the grid-searched logsnr[-3,2.5] v3 / 2M schedules")
    ap.add_argument("--only-w", type=float, nargs="*", default=None, help="ship: only these guidance scales")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6, 8])
    ap.add_argument("--mixture-nfe", type=int, nargs="*", default=[])
    ap.add_argument("--mixture-budget", type=int, default=600)
    ap.add_argument("--predictor-budget", type=int, default=300)
    ap.add_argument("--proxy-candidates", type=int, default=40)
    ap.add_argument("--holdout-seeds", type=int, nargs="+", default=[101, 102])
    ap.add_argument("--n", type=int, default=200, help="held-out samples per seed (digits)")
    ap.add_argument("--ref-steps", type=int, default=1000)
    ap.add_argument("--cache", default=str(ROOT / "out" / "usf_search"),
                    help="search logs and references (not committed; default out/usf_search)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (parts merge into it)")
    args = ap.parse_args(argv)
    _set_results(args.out)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/usf_search.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    parts = {"ship": part_ship, "digits": part_digits, "mixture": part_mixture, "proxy": part_proxy,
             "predictor": part_predictor, "reference": part_reference, "plot": part_plot}
    for part in args.part:
        t0 = time.perf_counter()
        parts[part](args)
        _save({f"{part}_command": command, f"{part}_seconds": round(time.perf_counter() - t0, 1),
               "torch": torch.__version__})


if __name__ == "__main__":
    main()
