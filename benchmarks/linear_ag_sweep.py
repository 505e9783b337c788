"""LinearAG trade-off sweep on the digits teacher (issue 6 follow-up): estimation space x start step.

For each space (x0, eps, v, output) and first replaced step, fits LinearAG's per-step coefficients
(``fewstep.guidance.fit_linear_ag``) on 500 CFG trajectories of a FIT seed, then samples the
evaluation set (seed 0, the protocol of benchmarks/guidance.py: n balanced labels, DPM-Solver++ 2M,
20 steps, CFG w = 3) and reports passes, savings, RMSE to full CFG, FD-digits and accuracy.

    python benchmarks/linear_ag_sweep.py [--n 300] [--starts 10 12 14 16]

Prints a markdown table and writes benchmarks/results/linear_ag_sweep.json. ~15 s per row on one
CPU thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewstep.eval.fd_digits import fd_digits
from fewstep.guidance import LinearAG, fit_linear_ag
from fewstep.models import load_digits_pipeline
from fewstep.models.adapters import denoiser
from fewstep.models.pipeline import NULL_CLASS
from fewstep.sample import sample
from fewstep.samplers import DPMSolverPPScheduler

RESULTS = Path(__file__).parent / "results" / "linear_ag_sweep.json"


@torch.no_grad()
def main(argv=None) -> dict:
    """Run the sweep; returns (and saves) the result dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="evaluation samples (labels 0-9 balanced)")
    p.add_argument("--fit-samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--spaces", nargs="+", default=["x0", "eps", "v", "output"])
    p.add_argument("--starts", type=int, nargs="+", default=[10, 12, 14, 16])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    pipe = load_digits_pipeline()
    model = denoiser(pipe.unet.eval(), null_class=NULL_CLASS)

    def sched():
        return DPMSolverPPScheduler.from_config(pipe.scheduler.config, solver_order=2)

    n, steps, w = args.n, args.steps, args.scale
    labels = torch.arange(n) % 10
    null = model.null(labels)
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    m = args.fit_samples
    fit_noise = torch.randn(m, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    fit_labels = torch.arange(m) % 10
    fit_null = model.null(fit_labels)

    def metrics(x):
        r = fd_digits((x.clamp(-1, 1) + 1) / 2, labels=labels)
        return r["fd"], r["accuracy"]

    cfg, nfe_cfg = sample(model, noise, sched(), steps, guidance=w, cond=labels, uncond=null)
    fd_cfg, acc_cfg = metrics(cfg)
    rows = [{"space": "-", "start_step": None, "passes": nfe_cfg, "saved": 0.0, "rmse_vs_cfg": 0.0,
             "fd": fd_cfg, "accuracy": acc_cfg, "name": "CFG"}]
    print("| method | space | start | passes | saved | RMSE vs CFG | FD-digits | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| CFG | - | - | {nfe_cfg} | 0% | 0 | {fd_cfg:.3f} | {acc_cfg:.3f} |", flush=True)
    for space in args.spaces:
        for start in args.starts:
            coef = fit_linear_ag(model, sched(), fit_noise, fit_labels, fit_null, steps, w, start_step=start,
                                 space=space)
            x, nfe = sample(model, noise, sched(), steps, guidance=LinearAG(coef), cond=labels, uncond=null)
            fd, acc = metrics(x)
            rm = float(((x.double() - cfg.double()) ** 2).mean().sqrt())
            rows.append({"name": "LinearAG", "space": space, "start_step": start, "passes": nfe,
                         "saved": 1 - nfe / nfe_cfg, "rmse_vs_cfg": rm, "fd": fd, "accuracy": acc})
            print(f"| LinearAG | {space} | {start} | {nfe} | {1 - nfe / nfe_cfg:.0%} | {rm:.4f} | {fd:.3f} "
                  f"| {acc:.3f} |", flush=True)
    result = {
        "protocol": f"digits teacher, DPM-Solver++ 2M, {steps} steps, CFG w = {w}, eval n = {n} (seed 0), "
                    f"LinearAG fitted on {m} CFG trajectories (seed 7)",
        "rows": rows,
        "seconds": round(time.perf_counter() - t_all, 1),
        "command": "python benchmarks/linear_ag_sweep.py " + " ".join(argv if argv is not None else []),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
