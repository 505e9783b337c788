"""``fewstep sample``: generate images with a named scheduler and guidance, write PNGs, a grid
and a JSON record (see ``docs/cli.md``).

Arguments are checked before torch, diffusers or the model load (a few hundred ms instead of
seconds); only the value ranges of guidance parameters need the guidance classes.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from .._io import atomic_path, atomic_write_json, check_output_dir
from .options import (
    MAX_STEPS,
    add_model_options,
    add_parser,
    add_threads_option,
    apply_threads,
    check_model_path,
    check_positive,
    check_seed,
    check_steps,
    check_threads,
    default_guidance,
    default_scheduler,
    is_digits_model,
    parse_labels,
)

DESCRIPTION = """\
Generate images with the bundled digits teacher or any diffusers pipeline, a scheduler by short
name and a guidance method. Writes DIR/000000.png ..., DIR/grid.png and DIR/record.json (settings,
NFE per image, wall time, file names).

example:
  fewstep sample --out samples/ --scheduler dpmpp-2m --steps 8 --guidance cfg:2.0 --labels 0-9 --n 64
"""


def _check(args: argparse.Namespace):
    """Every check that needs no torch; returns the parsed guidance spec."""
    from ..guidance.spec import parse_guidance
    from ..samplers.registry import get_entry, parse_overrides

    if args.out is None:
        raise ValueError("--out DIR is required (where the PNGs, grid.png and record.json go)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    check_model_path(args.model)
    args.scheduler = args.scheduler or default_scheduler(args.model)
    args.guidance = args.guidance or default_guidance(args.model)
    get_entry(args.scheduler)
    args.scheduler_overrides = parse_overrides(args.scheduler_config)
    gspec = parse_guidance(args.guidance, name="--guidance", validate=False)
    check_steps(args.steps, 1, MAX_STEPS)
    check_seed(args.seed)
    check_positive("--n", args.n)
    check_positive("--batch-size", args.batch_size, allow_none=True)
    check_positive("--upscale", args.upscale, allow_none=True)
    check_threads(args.threads)
    if is_digits_model(args.model):
        parse_labels(args.labels)
        if args.prompt:
            raise ValueError(f"model {args.model!r} is class-conditional: use --labels, not --prompt")
    check_output_dir(out, "--out", create=False)  # created once the images exist
    return gspec


def _run(args: argparse.Namespace) -> int:
    if args.list_schedulers:
        from ..samplers.registry import describe

        print(describe())
        return 0
    if args.list_guidance:
        from ..guidance.spec import describe_guidance

        print(describe_guidance())
        return 0
    gspec = _check(args)
    apply_threads(args.threads, tiny=is_digits_model(args.model))
    gspec.build()  # the guidance class checks its value ranges (imports torch)
    from .generate import generate
    from .images import make_grid
    from .loading import load_model

    model = load_model(args.model, args.device, args.dtype, allow_download=args.allow_download, cache=False)
    result = generate(
        model, scheduler=args.scheduler, steps=args.steps, guidance=gspec, seed=args.seed, n=args.n,
        labels=args.labels, prompt=args.prompt, negative_prompt=args.negative_prompt,
        scheduler_config=args.scheduler_overrides, batch_size=args.batch_size, progress=not args.no_progress,
        upscale=args.upscale,
    )
    out = check_output_dir(args.out, "--out")
    files = []
    for i, img in enumerate(result.images):
        name = f"{i:06d}.png"
        with atomic_path(out / name) as tmp:
            img.save(tmp)
        files.append(name)
    with atomic_path(out / "grid.png") as tmp:
        make_grid(result.images).save(tmp)
    import diffusers
    import torch

    import fewstep

    record = {
        "command": "fewstep sample",
        "settings": result.settings,
        "nfe": result.nfe,
        "nfe_note": "model evaluations per image (a guided step with both branches counts 2)",
        "wall_time_s": round(result.wall_time, 4),
        "images": files,
        "grid": "grid.png",
        "captions": result.captions,
        "versions": {"fewstep": getattr(fewstep, "__version__", "?"), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "python": platform.python_version()},
    }
    atomic_write_json(out / "record.json", record)
    print(f"wrote {len(files)} images, grid.png and record.json to {out} "
          f"(NFE {result.nfe} per image, {result.wall_time:.2f} s)", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Add ``fewstep sample`` to ``subparsers``."""
    usage = "fewstep sample --out DIR [options]\n       fewstep sample --list-schedulers | --list-guidance"
    p = add_parser(subparsers, "sample", help="generate images with a named scheduler and guidance (PNGs, grid, JSON)",
                   description=DESCRIPTION, usage=usage)
    req = p.add_argument_group("required")
    req.add_argument("--out", metavar="DIR", default=None,
                     help="output folder (not needed with --list-schedulers / --list-guidance)")
    what = p.add_argument_group("sampling")
    what.add_argument("--scheduler", default=None, metavar="NAME",
                      help="scheduler short name (see --list-schedulers); default: dpmpp-2m, and consistency "
                           "for a distilled student (--model digits-cd)")
    what.add_argument("--scheduler-config", action="append", default=[], metavar="KEY=VALUE",
                      help="scheduler config override, repeatable, e.g. timestep_spacing=trailing or "
                           "lower_order_final=false")
    what.add_argument("--steps", type=int, default=8, help=f"inference steps, 1..{MAX_STEPS}")
    what.add_argument("--guidance", default=None, metavar="SPEC",
                      help="none | cfg:W | apg:scale=W,eta=0 | cfgpp:LAMBDA | ag:scale=W,threshold=0.99 | "
                           "rescale:phi=0.7,scale=W (see --list-guidance); default: cfg:2.0, and none for a "
                           "distilled student (digits-lcm takes cfg:W, W in [1, 3], as its guidance input)")
    what.add_argument("--labels", default=None,
                      help="class labels for class models, e.g. 0-9 or 3,7, cycled over --n (default: all classes)")
    what.add_argument("--prompt", default=None, metavar="TEXT", help="prompt for text-to-image pipelines")
    what.add_argument("--negative-prompt", default=None, metavar="TEXT",
                      help="negative prompt for text-to-image pipelines")
    what.add_argument("--n", type=int, default=16, help="number of images")
    what.add_argument("--batch-size", type=int, default=None, metavar="B",
                      help="images per pipeline call (default: all --n at once)")
    what.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of SDE noise)")
    what.add_argument("--upscale", type=int, default=None, metavar="F",
                      help="nearest-neighbour upscale factor of the saved images (default: small images to ~64 px)")
    run = p.add_argument_group("model and machine")
    add_model_options(run, "'digits' (bundled, offline), a shipped distilled student ('digits-cd', "
                           "'digits-lcm', ...), a local diffusers pipeline folder or a hub id "
                           "(local cache only unless --allow-download)")
    add_threads_option(run)
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    info = p.add_argument_group("listings")
    info.add_argument("--list-schedulers", action="store_true", help="print the scheduler names and exit")
    info.add_argument("--list-guidance", action="store_true",
                      help="print the guidance methods, their parameters and defaults, and exit")
    p.set_defaults(func=_run, resume_hint="rerun the same command to start again (the same seed gives the same "
                                          "images)")
