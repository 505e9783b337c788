"""``fewstep search``: search a USF solver schedule (Liu et al., ICLR 2024) for a model at a fixed
number of model evaluations, and report it against every hand-set scheduler on held-out noise.

Models: ``digits`` (the bundled teacher), a local diffusers pipeline folder (text-to-image UNet
pipelines take ``--prompts FILE``, one prompt a line), or ``module:callable`` returning a
``fewstep.samplers.search_problem.SearchProblem`` or a dict (``model``, ``scheduler_config``,
``shape``, ...). The best schedule is written to ``--out`` (use it with
``USFScheduler.from_config(pipe.scheduler.config, schedule=PATH)``), every evaluated candidate to
the ``--log`` JSON, which ``--resume`` continues after an interrupt (same results as one run).

Several processes (``accelerate launch --num_processes N -m fewstep.apps.cli search ...``) score the
candidates of each generation in parallel. Guide: docs/usf.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .options import DIGITS, add_device_option, add_parser, add_threads_option, apply_threads, check_threads


def parse_budget(text) -> tuple[int | None, float | None]:
    """``"300"`` -> 300 evaluations; ``"20m"``/``"20min"`` -> 20 minutes; ``ValueError`` otherwise."""
    s = str(text).strip().lower()
    minutes = s.endswith(("m", "min"))
    try:
        value = float(s[: -3 if s.endswith("min") else -1] if minutes else s)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0) or (not minutes and value != int(value)):
        raise ValueError(f"--budget {text!r} must be a number of evaluations (300) or of minutes (20m)")
    return (None, value) if minutes else (int(value), None)


def _check_args(args: argparse.Namespace):
    """Every argument error before torch is imported; returns the parsed budget."""
    if not 2 <= args.nfe <= 20:
        raise ValueError(f"--nfe {args.nfe} is not allowed; allowed: 2..20 (the search targets 3..10)")
    budget = parse_budget(args.budget)
    check_threads(args.threads)
    for name in ("population", "batch", "reference_steps", "fd_samples", "pool", "validate_top"):
        if getattr(args, name) < (0 if name == "validate_top" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.holdout < 0:
        raise ValueError(f"--holdout must be >= 0, got {args.holdout}")
    if args.proxy == "fd" and args.model != "digits" and ":" not in args.model:
        raise ValueError("--proxy fd is FD-digits, for --model digits (or a module:callable with an fd_fn)")
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise FileNotFoundError(f"--prompts file {args.prompts!r} does not exist")
    if args.model not in ("digits",) and ":" not in args.model and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model!r} is neither 'digits', a pipeline folder nor module:callable")
    for path in args.seed_schedule or ():
        from fewstep.samplers.usf_schedule import resolve_schedule_path  # no torch: the format module only

        resolve_schedule_path(path)  # FileNotFoundError naming the file and the shipped names
    log = Path(args.log) if args.log else Path(str(args.out) + ".log.json")
    if log.exists() and not args.resume:
        raise ValueError(f"search log {log} exists: pass --resume to continue it, or remove it")
    return budget, log


def _problem(args, device):
    from fewstep.samplers import search_problem as sp

    ems = {"auto": "auto", "none": None}.get(args.ems, args.ems)
    if args.model == "digits":
        return sp.digits_problem(args.guidance_scale, device=device, ems=ems)
    if ":" in args.model and not Path(args.model).exists():
        return sp.callable_problem(args.model, args.guidance_scale, ems=None if ems == "auto" else ems)
    prompts = sp.read_prompts(args.prompts) if args.prompts else None
    return sp.pipeline_problem(args.model, prompts, args.guidance_scale, device=device,
                               ems=None if ems == "auto" else ems, negative_prompt=args.negative_prompt)


def _run(args: argparse.Namespace) -> int:
    (budget_evals, budget_minutes), log = _check_args(args)
    apply_threads(args.threads, tiny=args.model == DIGITS)  # before torch loads: OpenMP reads the variable once
    from fewstep.device import launched_processes
    from fewstep.samplers.search import SearchSettings, format_report, holdout_report, run_search

    settings = SearchSettings(nfe=args.nfe, population=args.population, batch=args.batch, seed=args.seed,
                              proxy=args.proxy, fd_samples=args.fd_samples, reference_steps=args.reference_steps,
                              predictor=args.predictor, pool=args.pool, v3=not args.no_v3, holdout=args.holdout,
                              validate_top=args.validate_top).check()
    from fewstep.samplers.usf_schedule import USFSchedule

    seeds = [(f"file:{path}", USFSchedule.load(path)) for path in args.seed_schedule or ()]
    with launched_processes(args.device, name="--device") as (device, acc):
        problem = _problem(args, device)
        main = acc is None or acc.is_main_process
        result = run_search(problem, settings, budget_evals=budget_evals, budget_minutes=budget_minutes,
                            log_path=log, out_path=args.out, resume=args.resume, progress=not args.quiet and main,
                            accelerator=acc, seeds=seeds)
        best = result.best
        report = None
        if args.holdout:
            report = holdout_report(problem, {"usf (searched)": best}, settings, accelerator=acc,
                                    with_fd=problem.fd_fn is not None)
            best.info["holdout"] = report
        if main:
            best.save(args.out)
            summary = {"out": str(args.out), "log": str(log), "nfe": best.nfe, "score": result.best_score,
                       "evaluations": result.evaluations, "generations": result.generations,
                       "minutes": round(result.seconds / 60.0, 2),
                       "world_size": 1 if acc is None else acc.num_processes}
            print(json.dumps(summary, indent=2))
            if report is not None:
                print(format_report(report))
    return 0


def register(subparsers) -> None:
    """Add the ``search`` subcommand."""
    p = add_parser(subparsers, "search", help="search a USF solver schedule for a model at a fixed NFE",
                   description=__doc__)
    p.add_argument("--model", default="digits", help="'digits', a diffusers pipeline folder, or module:callable")
    p.add_argument("--nfe", type=int, required=True, help="model evaluations per sample (3..10 is the target range)")
    p.add_argument("--out", required=True, help="where to write the best schedule (JSON)")
    p.add_argument("--log", default=None, help="JSON log of every candidate (default: OUT.log.json)")
    p.add_argument("--resume", action="store_true", help="continue the search of an existing --log")
    p.add_argument("--budget", default="300", help="evaluations (300) or minutes (20m) (default: 300)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance w (default: 1)")
    p.add_argument("--prompts", default=None, help="prompt file, one a line (text-to-image pipeline folders)")
    p.add_argument("--negative-prompt", default="", help="unconditional branch of text pipelines (default: '')")
    p.add_argument("--population", type=int, default=16, help="candidates per generation (default: 16)")
    p.add_argument("--batch", type=int, default=64, help="search batch size (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search batch and the proposals (default: 0)")
    p.add_argument("--proxy", choices=("rmse", "fd"), default="rmse",
                   help="rmse to the reference (default) or FD-digits on --fd-samples samples")
    p.add_argument("--fd-samples", type=int, default=300, help="samples per candidate of the FD proxy (default: 300)")
    p.add_argument("--reference-steps", type=int, default=1000,
                   help="steps of the DPM-Solver++ 2M reference solve (default: 1000)")
    p.add_argument("--validate-top", type=int, default=8,
                   help="re-score this many of the best on a second batch and keep the best there (default: 8)")
    p.add_argument("--seed-schedule", action="append", default=None, metavar="SCHEDULE",
                   help="an extra seed of the first generation: a schedule JSON or a shipped name (e.g. a previous "
                        "search's best, digits-nfe5); repeatable; it must have --nfe evaluations")
    p.add_argument("--predictor", action="store_true", help="rank proposals with a learned predictor (S^3)")
    p.add_argument("--pool", type=int, default=4, help="predictor: proposals per evaluation (default: 4)")
    p.add_argument("--ems", default="auto",
                   help="EMS for v3 steps: auto (digits: the shipped set of the guidance scale), none, a path or name")
    p.add_argument("--no-v3", action="store_true", help="no DPM-Solver-v3 steps in the search space")
    p.add_argument("--holdout", type=int, default=200, help="held-out report samples; 0: no report (default: 200)")
    add_device_option(p)
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
