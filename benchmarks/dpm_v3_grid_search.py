"""Grid search for DPM-Solver-v3 on the digits teacher (issue 5): which step grid, fixed for all NFE.

benchmarks/dpm_v3_digits.py showed that on the cosine-schedule digits teacher the grid, not the EMS,
decides the error at NFE 5-10. This script searches three grid families, declared here before the
search and recorded point by point in the JSON:

* ``logsnr(lo, hi)``: ``n`` points uniform in lambda from ``lo`` to ``hi`` (the sample starts from
  pure noise at ``t(lo)``; the last model evaluation is at ``t(hi)``, then the step to sigma = 0).
  ``lo`` in {-9.918 (= lambda(999), no clipping), -6, -5.1, -4, -3, -2}, ``hi`` in
  {1, 1.5, 2, 2.5, 3, 4, 5.047 (= lambda(0))}.
* ``power(p)``: ``t_i = 1000 (1 - i/n)^p - 1``, ``i = 0 .. n-1`` (make_grid's ``time_power``
  spacing, ``timestep_power=p`` in fewstep schedulers): ``p = 1`` is ``trailing`` (up to diffusers'
  integer rounding), ``p = 2`` the discrete form of DPM-Solver's ``time_quadratic``. ``p`` in
  {0.7, 0.85, 1, 1.15, 1.3, 1.5, 1.75, 2, 2.5, 3}.
* ``karras(smax, rho)``: Karras et al. 2022 Eq. 5 in VE sigma ``sigma/alpha`` from ``smax`` down
  to the schedule's smallest ``sigma_min = sigma/alpha(t=0)``. ``log smax`` in {9.918 (t=999), 6,
  log 80 (EDM), 3, 2}, ``rho`` in {1, 2, 3, 5, 7, 10}.

Every grid is snapped to the lambda grid of the shipped digits EMS (120 intervals; ``digits`` and
``digits-cfg2`` share it) before any solver sees it, so all solvers run on the same points (v3
would snap them anyway). Solvers: fewstep ``DPMSolverV3Scheduler`` order 2 with the ``digits`` EMS
(the CLI's ``dpm-v3``), and diffusers' ``UniPCMultistepScheduler`` bh2 order 2 -- the best
diffusers configuration of dpm_v3_digits.py -- on the same grid (injected, see
``dpm_v3_digits.install_grid``), so the baseline gets its own best grid as well. Also run as
anchors: both solvers on their own ``trailing`` grid.

SEARCH set: seed 1, N = 100 (balanced classes), w = 1 (disjoint from the evaluation set of
dpm_v3_digits.py: seed 0, N = 200), RMSE to its own 1000-step reference made by
``dpm_v3_digits.reference``. Score: mean RMSE over NFE 5, 6, 8, 10; per family and solver the
setting with the lowest score (one setting for all NFE).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dpm_v3_grid_search.py      # ~5 min on 1 CPU thread
    python benchmarks/dpm_v3_grid_search.py --n 20 --ref-steps 100 --out /tmp/g.json   # dry run

Prints a table per family and writes ``benchmarks/results/dpm_v3_grid_search.json``.
``--extra-nfe 15 20 30`` afterwards runs the stored winners (of v3 o2) and the trailing anchors at
more steps on the same search set and adds them to the JSON (``extra_nfe``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from dpm_v3_digits import TARGET_NFES, load_teacher, reference, rmse_to, solve, start_noise
from grid_families import FAMILIES, LAMBDA_T0, LAMBDA_T999, grid_fn

RESULTS = Path(__file__).resolve().parent / "results" / "dpm_v3_grid_search.json"


def settings(family: str) -> list[dict]:
    keys = list(FAMILIES[family])
    out = [{}]
    for k in keys:
        out = [{**o, k: v} for o in out for v in FAMILIES[family][k]]
    return out


def label(family: str, par: dict) -> str:
    return f"{family}(" + ", ".join(f"{k}={v:g}" for k, v in par.items()) + ")"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nfe", type=int, nargs="+", default=list(TARGET_NFES))
    ap.add_argument("--ref-steps", type=int, default=1000)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--extra-nfe", type=int, nargs="+", default=None,
                    help="instead of searching: run the stored per-family winners of v3 o2 and the trailing "
                         "anchors at these NFE on the same search set (do the clipped grids level off?)")
    args = ap.parse_args(argv)
    if args.seed == 0:
        raise ValueError("seed 0 is the evaluation set of dpm_v3_digits.py; search on another seed")
    torch.set_num_threads(args.threads)

    import diffusers
    from diffusers import UniPCMultistepScheduler

    from fewstep.samplers import EMS, DPMSolverV3Scheduler
    from fewstep.samplers.ems import resolve_ems_path
    from fewstep.schedule import NoiseSchedule

    model, config = load_teacher()
    schedule = NoiseSchedule.from_config(config)
    assert abs(float(schedule.lambda_(999.0)) - LAMBDA_T999) < 1e-3
    assert abs(float(schedule.lambda_(0.0)) - LAMBDA_T0) < 1e-3
    ems = EMS.load(resolve_ems_path("digits"))
    noise, labels, null = start_noise(args.n, args.seed)
    w = 1.0

    t0 = time.perf_counter()
    ref = reference(model, config, w, noise, labels, null, args.ref_steps)
    ref_s = time.perf_counter() - t0
    print(f"search set: seed {args.seed}, N={args.n}, w=1; reference ({args.ref_steps} steps) {ref_s:.0f} s",
          flush=True)

    solvers = {
        "v3 o2": lambda: DPMSolverV3Scheduler.from_config(config, ems=ems, solver_order=2),
        "UniPC bh2 o2": lambda: UniPCMultistepScheduler.from_config(config, solver_order=2, solver_type="bh2"),
    }

    def evaluate(make, grid, nfes=args.nfe) -> dict:
        rec = {"rmse": []}
        for n in nfes:
            try:
                x = solve(model, make(), n, w, noise, labels, null, grid=grid, schedule=schedule)
                if not torch.isfinite(x).all():
                    raise FloatingPointError("non-finite sample")
                rec["rmse"].append(rmse_to(x, ref))
            except Exception as err:  # noqa: BLE001 - a failing grid is a result
                rec.setdefault("errors", {})[str(n)] = f"{type(err).__name__}: {err}"
                rec["rmse"].append(float("nan"))
        vals = [r for n, r in zip(nfes, rec["rmse"]) if n in TARGET_NFES]
        rec["score"] = float(np.mean(vals)) if vals and not any(math.isnan(v) for v in vals) else float("inf")
        return rec

    if args.extra_nfe:
        out = Path(args.out)
        result = json.loads(out.read_text())
        if (result["n"], result["seed"]) != (args.n, args.seed):
            raise ValueError(f"{out} holds the search at N={result['n']}, seed={result['seed']}")
        extra = {"nfe": args.extra_nfe, "solver": "v3 o2", "rows": {}, "command": "python benchmarks/"
                 "dpm_v3_grid_search.py " + shlex.join(argv if argv is not None else sys.argv[1:])}
        for sname, make in solvers.items():
            extra["rows"][f"{sname} trailing"] = evaluate(make, None, args.extra_nfe)
        for fam, rec in result["best"]["v3 o2"].items():
            for sname, make in solvers.items():
                extra["rows"][f"{sname} {rec['label']}"] = evaluate(
                    make, grid_fn(ems, schedule, fam, **rec["params"]), args.extra_nfe)
        for name, rec in extra["rows"].items():
            rec.pop("score", None)
            print(f"{name:<40} " + " ".join(f"{r:.4f}" for r in rec["rmse"]), flush=True)
        result["extra_nfe"] = extra
        out.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
        print(f"wrote {out}")
        return result

    result = {
        "protocol": __doc__.split("\n\n")[1].replace("\n", " ") + " " + __doc__.split("\n\n")[4].replace("\n", " "),
        "families": FAMILIES, "n": args.n, "seed": args.seed, "guidance": w, "nfe": args.nfe,
        "score": f"mean RMSE over NFE {[n for n in args.nfe if n in TARGET_NFES]}",
        "reference": f"fewstep DPMSolverPPScheduler 2M, trailing grid, {args.ref_steps} steps",
        "reference_seconds": round(ref_s, 1), "threads": args.threads,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "command": "python benchmarks/dpm_v3_grid_search.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "anchors": {}, "search": {}, "best": {},
    }
    for sname, make in solvers.items():  # each solver on its own (unsnapped for UniPC) trailing grid
        result["anchors"][f"{sname} trailing"] = evaluate(make, None)
    for fam in args.families:
        result["search"][fam] = []
        t_f = time.perf_counter()
        for par in settings(fam):
            entry = {"params": par, "label": label(fam, par)}
            try:
                entry["timesteps_nfe5"] = [round(float(t), 3) for t in grid_fn(ems, schedule, fam, **par)(5)]
            except ValueError as err:
                entry["timesteps_nfe5"] = str(err)
            for sname, make in solvers.items():
                entry[sname] = evaluate(make, grid_fn(ems, schedule, fam, **par))
            result["search"][fam].append(entry)
            print(f"{entry['label']:<32} " + "  ".join(
                f"{s}: " + " ".join(f"{r:.4f}" for r in entry[s]["rmse"]) + f" | {entry[s]['score']:.4f}"
                for s in solvers), flush=True)
        for sname in solvers:
            best = min(result["search"][fam], key=lambda e: e[sname]["score"])
            result["best"].setdefault(sname, {})[fam] = {"label": best["label"], "params": best["params"],
                                                         **best[sname]}
        print(f"[{fam}: {time.perf_counter() - t_f:.0f} s]", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print_table(result, list(solvers))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    print(f"wrote {out}")
    return result


def print_table(result: dict, solvers: list[str]) -> None:
    nfe = result["nfe"]
    print(f"\n| best per family (search set: seed {result['seed']}, N={result['n']}, w=1; RMSE) | "
          + " | ".join(f"NFE {n}" for n in nfe) + " | mean |")
    print("|---|" + "---:|" * (len(nfe) + 1))
    for name, rec in result["anchors"].items():
        print(f"| {name} (anchor) | " + " | ".join(f"{r:.4f}" for r in rec["rmse"]) + f" | {rec['score']:.4f} |")
    for sname in solvers:
        for fam, rec in result["best"].get(sname, {}).items():
            print(f"| {sname} {rec['label']} | " + " | ".join(f"{r:.4f}" for r in rec["rmse"])
                  + f" | {rec['score']:.4f} |")
    for sname in solvers:
        print(f"\n{sname}: score (mean RMSE NFE 5-10) per setting, best 5 per family")
        for fam, entries in result["search"].items():
            ranked = sorted(entries, key=lambda e: e[sname]["score"])[:5]
            print(f"  {fam}: " + ", ".join(f"{e['label']} {e[sname]['score']:.4f}" for e in ranked))


if __name__ == "__main__":
    main()
