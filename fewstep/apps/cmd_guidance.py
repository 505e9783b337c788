"""``fewstep fit-linear-ag``: fit LinearAG coefficients on recorded CFG trajectories.

Samples the bundled digits teacher with full CFG at ``--scale`` and ``--steps`` using fewstep's
DPM-Solver++ 2M, records conditional and unconditional predictions, fits the per-step
least-squares coefficients of :class:`fewstep.guidance.LinearAG`
(:func:`fewstep.guidance.fit_linear_ag`) and writes them to a JSON file (default
``configs/linear_ag_digits.json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._io import atomic_write_json, check_output_dir, check_writable
from .options import add_parser, check_positive


def _run(args: argparse.Namespace) -> int:
    check_positive("--num-samples", args.num_samples)
    out = Path(args.output)
    check_output_dir(out.parent, "--output")
    check_writable(out, "--output")  # before the trajectories are sampled
    import torch

    from ..guidance.linear_ag import fit_linear_ag
    from ..models.adapters import denoiser
    from ..models.pipeline import NULL_CLASS, load_digits_pipeline
    from ..samplers import DPMSolverPPScheduler

    pipe = load_digits_pipeline()
    model = denoiser(pipe.unet.eval(), null_class=NULL_CLASS)
    sched = DPMSolverPPScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.num_samples, 1, 8, 8, generator=g)
    cond = torch.arange(args.num_samples) % 10
    with torch.no_grad():
        fit = fit_linear_ag(model, sched, noise, cond, model.null(cond), args.steps, args.scale,
                            start_step=args.start_step, space=args.space)
    fit["model"] = "fewstep digits teacher"
    fit["seed"] = args.seed
    atomic_write_json(out, fit)
    print(f"wrote {out}: start_step={fit['start_step']}, max rel_error={max(fit['rel_error'] or [0]):.4f}")
    return 0


def register(subparsers) -> None:
    """Add the ``fit-linear-ag`` subcommand to ``subparsers``."""
    p = add_parser(subparsers, "fit-linear-ag", help="fit LinearAG coefficients on CFG trajectories of the digits "
                   "teacher", description="Record CFG trajectories of the bundled digits teacher and fit LinearAG's "
                   "per-step least-squares coefficients (Castillo et al. 2025); writes a JSON for "
                   "fewstep.guidance.LinearAG.")
    p.add_argument("--scale", type=float, default=3.0, help="CFG scale w (diffusers guidance_scale)")
    p.add_argument("--steps", type=int, default=20, help="number of sampling steps")
    p.add_argument("--start-step", type=int, default=None, help="first replaced step (default: steps // 2)")
    p.add_argument("--space", default="x0", choices=("x0", "eps", "v", "output"), help="space of the estimate")
    p.add_argument("--num-samples", type=int, default=500, help="trajectories to fit on")
    p.add_argument("--seed", type=int, default=0, help="seed of the start noise")
    p.add_argument("--output", default="configs/linear_ag_digits.json", help="JSON to write")
    p.set_defaults(func=_run)
