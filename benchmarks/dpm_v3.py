"""Benchmark: DPM-Solver-v3 (Zheng et al. 2023, arXiv 2310.13268) with EMS from compute_ems on the
exact Gaussian-mixture model, against fewstep's DPMSolverPPScheduler and diffusers' best
configuration (DPMSolverMultistep 2M/3M with Karras or lu-lambdas, UniPC, DEIS) at NFE 4-15.

Error = RMSE of the final sample to the DOP853 reference solution of the probability-flow ODE
(float64). Prints a table and writes benchmarks/results/dpm_v3_gmm.json.

    python benchmarks/dpm_v3.py [--num-grid 200] [--num-samples 512]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from fewstep.sample import sample
from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler, compute_ems
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture, reference_solve

NFES = (4, 5, 6, 8, 10, 15)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-grid", type=int, default=200)
    ap.add_argument("--num-samples", type=int, default=512)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/dpm_v3_gmm.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = dict(beta_schedule="linear", prediction_type="epsilon")
    base = DPMSolverPPScheduler(**cfg)
    mix = make_gaussian_mixture(dim=args.dim, seed=0)
    model = GaussianMixtureModel(mix, base.schedule, "epsilon")
    x0 = mix.sample(args.num_samples, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    ems = compute_ems(model, base.config, x0, num_grid=args.num_grid, batch_size=256, dtype=torch.float64,
                      progress=False, model_id="gmm-dim16-seed0")
    ems_s = time.perf_counter() - t0
    noise = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s0 = math.exp(-float(base.schedule.lambda_(999.0)))
    ref = reference_solve(mix, noise * math.sqrt(1 + s0**2), s0, 0.0)

    def rmse(s, n):
        x, nfe = sample(model, noise, s, n)
        assert nfe == n
        return ((x - ref) ** 2).mean().sqrt().item()

    dcfg = dict(cfg)
    dpm, unipc = DPMSolverMultistepScheduler, UniPCMultistepScheduler
    diffusers_cfgs = {}
    for o in (2, 3):
        diffusers_cfgs[f"DPM++{o}M karras"] = lambda o=o: dpm(**dcfg, solver_order=o, use_karras_sigmas=True)
        diffusers_cfgs[f"DPM++{o}M lu"] = lambda o=o: dpm(**dcfg, solver_order=o, use_lu_lambdas=True)
        diffusers_cfgs[f"DPM++{o}M"] = lambda o=o: dpm(**dcfg, solver_order=o)
    for o in (2, 3):
        diffusers_cfgs[f"UniPC bh2 o{o}"] = lambda o=o: unipc(**dcfg, solver_order=o, solver_type="bh2")
        diffusers_cfgs[f"UniPC bh1 o{o}"] = lambda o=o: unipc(**dcfg, solver_order=o, solver_type="bh1")
        diffusers_cfgs[f"DEIS o{o}"] = lambda o=o: DEISMultistepScheduler(**dcfg, solver_order=o)
    fewstep_pp = {f"fewstep DPM++{o}M {sp}": (lambda o=o, sp=sp: DPMSolverPPScheduler(**cfg, solver_order=o,
                                                                                     timestep_spacing=sp))
                  for o in (2, 3) for sp in ("linspace", "logsnr")}
    v3 = {}
    for o in (2, 3):
        for sp in ("linspace", "logsnr"):
            for corr in (True, False):
                name = f"v3 o{o} {sp}{'' if corr else ' nocorr'}"
                v3[name] = lambda o=o, sp=sp, corr=corr: DPMSolverV3Scheduler(
                    **cfg, solver_order=o, timestep_spacing=sp, use_corrector=corr, ems=ems)
    for half_region in ("noisy", "clean"):
        v3[f"v3 o3 logsnr half-{half_region}"] = lambda hr=half_region: DPMSolverV3Scheduler(
            **cfg, solver_order=3, timestep_spacing="logsnr", half=True, half_region=hr, ems=ems)
    v3["v3 o3 logsnr pseudo"] = lambda: DPMSolverV3Scheduler(**cfg, solver_order=3, timestep_spacing="logsnr",
                                                              predictor_pseudo=True, ems=ems)
    rows = {}
    for group in (diffusers_cfgs, fewstep_pp, v3):
        for name, make in group.items():
            rows[name] = [rmse(make(), n) for n in NFES]
    best = lambda names: [min(rows[k][i] for k in names) for i in range(len(NFES))]  # noqa: E731
    summary = {
        "best diffusers": best(diffusers_cfgs),
        "best fewstep DPM++": best(fewstep_pp),
        "best v3": best(v3),
    }
    # per-step overhead: wall time of step() alone, v3 vs DPM++ (same batch)
    def step_time(s, n=10, reps=20):
        s.set_timesteps(n)
        x = noise.float()
        out = torch.randn_like(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            s.set_timesteps(n)
            for t in s.timesteps:
                s.step(out, t, x)
        return (time.perf_counter() - t0) / (reps * n) * 1e6

    overhead = {"DPM++ 3M us/step": step_time(DPMSolverPPScheduler(**cfg, solver_order=3)),
                "v3 o3 corrector us/step": step_time(DPMSolverV3Scheduler(**cfg, solver_order=3, ems=ems))}
    w = max(len(k) for k in list(rows) + list(summary))
    print(f"{'RMSE to reference (GMM dim 16)':<{w}} " + " ".join(f"{'NFE ' + str(n):>9}" for n in NFES))
    for k, v in list(rows.items()) + list(summary.items()):
        print(f"{k:<{w}} " + " ".join(f"{e:9.4f}" for e in v))
    ratio = [summary["best v3"][i] / summary["best diffusers"][i] for i in range(len(NFES))]
    print(f"{'v3 / best diffusers':<{w}} " + " ".join(f"{r:9.3f}" for r in ratio))
    print(f"EMS: N={args.num_grid}, K={args.num_samples}: {ems_s:.1f} s;  step overhead: {overhead}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"nfe": NFES, "rows": rows, "summary": summary, "ratio_v3_over_diffusers": ratio, "ems_seconds": ems_s,
              "num_grid": args.num_grid, "num_samples": args.num_samples, "step_overhead_us": overhead}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
