"""``fewstep lcsc --run RUN --nfe 1 --budget 400 --output merged/``: LCSC, the searched linear combination
of a run's saved checkpoints (Liu et al., ICLR 2025), merged into one loadable model.

The checkpoints (``--run``, repeatable: trainer runs, diffusers model folders, ``.safetensors`` files)
are combined with coefficients found by the evolutionary search of :mod:`fewstep.distill.lcsc`,
whose fitness is FD-digits (``--fitness fd``) or the distance to the teacher's 50-step solution
(``--fitness trajectory``) at ``--nfe`` steps on fixed noise. ``--alpha`` merges with given
coefficients instead. Writes ``search_log.json``, ``fitness.png``, ``lcsc.json`` and the merged model
into ``--output``; ``--resume`` continues an interrupted search. See docs/lcsc.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

from . import options


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None


def _check(args: argparse.Namespace) -> None:
    options.check_threads(args.threads)
    for key in ("nfe", "budget", "population", "offspring", "num_samples", "reference_steps"):
        v = getattr(args, key)
        if v < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {v}")
    if args.num_samples % 10:
        raise ValueError(f"--num-samples must be a multiple of 10 (balanced classes), got {args.num_samples}")
    if args.first_fraction is not None and not 0 < args.first_fraction <= 1:
        raise ValueError(f"--first-fraction must be in (0, 1], got {args.first_fraction}")


def _run(args: argparse.Namespace) -> int:
    _check(args)
    options.apply_threads(args.threads, tiny=True)
    from fewstep.device import resolve_device
    from fewstep.distill import lcsc

    device = resolve_device(args.device, "--device")
    refs = lcsc.checkpoint_refs(args.run, weights=args.weights, first_fraction=args.first_fraction)
    cfg = lcsc.SearchConfig(population=args.population, offspring=args.offspring, budget=args.budget,
                            mutation_std=args.mutation_std, crossover=args.crossover, max_l1=args.max_l1,
                            seed=args.seed)
    template = lcsc.load_template(args.template or args.run[0], device=device)
    name = args.name or f"{template.name}-lcsc"
    record = {"checkpoints": [{"name": r.name, "path": str(r.path), "step": r.step} for r in refs],
              "weights": args.weights or (refs[0].path.stem if refs[0].step is not None else None),
              "first_fraction": args.first_fraction}
    t0 = time.time()
    if args.alpha is not None:
        alpha = _floats(args.alpha, "--alpha")
        lcsc.merge(refs, alpha, out=template.model.state_dict())
        record.update(alpha=alpha, search=None)
    else:
        kw = dict(nfe=args.nfe, num_samples=args.num_samples, noise_seed=args.noise_seed)
        if args.fitness == "fd":
            fitness = lcsc.DigitsFDFitness(template.pipeline, **kw)
        else:
            ref = lcsc.TrajectoryFitness.teacher_reference(args.num_samples, args.noise_seed, args.reference_steps)
            fitness = lcsc.TrajectoryFitness(template.pipeline, ref, **kw)
        info = {"name": args.fitness, **fitness.describe(),
                **({"reference_steps": args.reference_steps} if args.fitness == "trajectory" else {})}
        accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=device.type == "cpu")
        res = lcsc.search(refs, template.model, fitness, cfg, log_dir=args.output, resume=args.resume,
                          progress=not args.no_progress, fitness_info=info, accelerator=accelerator)
        if accelerator is not None and not accelerator.is_main_process:
            return 0
        lcsc.plot_search(res.log, f"{args.output}/fitness.png")
        record.update(alpha=res.alpha, search={"fitness": info, "config": asdict(cfg),
                                               "best_fitness": res.fitness, "evaluations": res.evaluations,
                                               "evaluation_seconds": round(res.seconds, 1),
                                               "generations": len(res.generations) - 1})
    record["wall_seconds_this_session"] = round(time.time() - t0, 1)
    lcsc.save_merged(template, args.output, name, record)
    print(json.dumps({k: v for k, v in record.items() if k != "checkpoints"}, indent=2))
    return 0


def register(subparsers) -> None:
    """Add the ``lcsc`` subcommand."""
    p = options.add_parser(
        subparsers, "lcsc",
        help="LCSC: merge a run's saved checkpoints with searched coefficients",
        description="Combine the saved checkpoints of a training run linearly (Liu et al., ICLR 2025), with "
        "coefficients found by an evolutionary search on a fixed-noise fitness, and save the merged model. "
        "Multi-process fitness: accelerate launch -m fewstep.apps.cli lcsc ...")
    p.add_argument("--run", action="append", required=True, metavar="PATH",
                   help="checkpoints: a trainer run folder (all its checkpoints), a diffusers model folder or a "
                        ".safetensors file; repeatable, in order")
    p.add_argument("--weights", default=None, choices=("student", "student_ema", "target", "teacher", "teacher_ema"),
                   help="which weights of each run checkpoint to combine (default: the raw trained weights, "
                        "student of a distillation run, teacher of a train-teacher work dir)")
    p.add_argument("--first-fraction", type=float, default=None, metavar="F",
                   help="only checkpoints up to F x the last step (LCSC over the first part of the run)")
    p.add_argument("--template", default=None,
                   help="the model and sampler the weights go into (default: the first --run: a run's final/ "
                        "student, an exported digits student folder or a diffusers UNet2DModel folder)")
    p.add_argument("--output", required=True, help="folder for the merged model, search_log.json, fitness.png")
    p.add_argument("--name", default=None, help="name of the merged digits student (default: <template>-lcsc)")
    p.add_argument("--alpha", default=None, help="comma-separated coefficients (sum 1): merge only, no search")
    p.add_argument("--fitness", default="fd", choices=("fd", "trajectory"),
                   help="fd: FD-digits; trajectory: mean squared distance to the teacher's DDIM solution")
    p.add_argument("--nfe", type=int, default=1, help="sampling steps of the fitness")
    p.add_argument("--num-samples", type=int, default=500, help="samples per fitness evaluation (multiple of 10)")
    p.add_argument("--noise-seed", type=int, default=7, help="seed of the fixed search noise (report on others)")
    p.add_argument("--reference-steps", type=int, default=50, help="teacher DDIM steps of --fitness trajectory")
    p.add_argument("--budget", type=int, default=400, help="fitness evaluations in total")
    p.add_argument("--population", type=int, default=16, help="mu: candidates kept per generation")
    p.add_argument("--offspring", type=int, default=16, help="lambda: children per generation")
    p.add_argument("--mutation-std", type=float, default=0.05, help="sigma of the Gaussian mutation of alpha")
    p.add_argument("--crossover", type=float, default=0.5, help="probability of uniform crossover per child")
    p.add_argument("--max-l1", type=float, default=3.0, help="cap on ||alpha||_1")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's random draws")
    p.add_argument("--resume", action="store_true", help="continue the search logged in --output")
    options.add_device_option(p)
    options.add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
