"""Rounded vs truncated model times on exponential and Beta grids (issue 11).

    python benchmarks/timestep_rounding.py [--seeds 8]

diffusers' ``DPMSolverMultistepScheduler`` truncates the model times of its exponential and Beta grids
to integers; fewstep rounds them (same noise levels, same solver). On the exact Gaussian mixture
(``fewstep.testing``) with SD's schedule this prints, per grid and step count, the spread over seeds of

* the largest absolute difference between fewstep's and diffusers' samples (each calls the model at
  its own times),
* each one's relative distance to a run that calls the model at the exact float times the solver
  assumes (``round_timesteps=False``), and
* each one's relative error against the probability-flow ODE solved to sigma = 0 (float64 DOP853).

Writes benchmarks/results/timestep_rounding.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler

from fewstep.samplers import DPMSolverPPScheduler
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture, one_thread, reference_solve

RESULTS = Path(__file__).parent / "results"
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def run(sched, model, z, n):
    sched.set_timesteps(n)
    x = z
    for t in sched.timesteps:
        x = sched.step(model(x, t, None), t, x).prev_sample
    return x.double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def spread(values):
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2], "max": v[-1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 10, 25])
    args = ap.parse_args()
    mix = make_gaussian_mixture(dim=64, seed=0)
    rows = []
    print("| grid | steps | max abs(fewstep - diffusers) | to exact times: fewstep / diffusers | "
          "ODE error: fewstep / diffusers |")
    print("|---|---|---|---|---|")
    for flag in ("use_exponential_sigmas", "use_beta_sigmas"):
        for n in args.steps:
            diff, to_exact, ode = [], [], []
            for seed in range(args.seeds):
                ours = DPMSolverPPScheduler(**SD, **{flag: True})
                model = GaussianMixtureModel(mix, ours.schedule)
                z = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
                a = run(ours, model, z, n)
                b = run(DPMSolverMultistepScheduler(**SD, **{flag: True}), model, z, n)
                exact = run(DPMSolverPPScheduler(**SD, round_timesteps=False, **{flag: True}), model, z, n)
                a0, s0 = ours.alpha_sigma(0)
                truth = reference_solve(mix, z.double() / a0, s0 / a0, 0.0)
                diff.append(float((a - b).abs().max()))
                to_exact.append((rel(a, exact), rel(b, exact)))
                ode.append((rel(a, truth), rel(b, truth)))
            row = {"grid": flag, "steps": n, "max_abs_diff": spread(diff),
                   "to_exact_times": {"fewstep": spread([t[0] for t in to_exact]),
                                      "diffusers": spread([t[1] for t in to_exact])},
                   "ode_error": {"fewstep": spread([e[0] for e in ode]), "diffusers": spread([e[1] for e in ode])}}
            rows.append(row)
            m = row["to_exact_times"]
            o = row["ode_error"]
            print(f"| {flag} | {n} | {row['max_abs_diff']['min']:.1e} - {row['max_abs_diff']['max']:.1e} | "
                  f"{m['fewstep']['median']:.1e} / {m['diffusers']['median']:.1e} | "
                  f"{o['fewstep']['median']:.4f} / {o['diffusers']['median']:.4f} |", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "timestep_rounding.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    with one_thread():
        main()
