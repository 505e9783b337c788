"""``fewstep sample``: generate images with a named scheduler and guidance, write PNGs, a grid
and a JSON record.

    fewstep sample --model digits --scheduler dpmpp-2m --steps 8 --guidance cfg:2.0 \\
        --labels 0-9 --n 64 --seed 0 --out samples/

writes ``samples/000000.png ...``, ``samples/grid.png`` and ``samples/record.json`` (settings,
NFE per image, wall time, file names). ``--list-schedulers`` prints the scheduler names.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from .common import DIGITS, DTYPES, MAX_STEPS


def _run(args: argparse.Namespace) -> int:
    from . import common
    from .schedulers import describe, get_entry, parse_overrides

    if args.list_schedulers:
        print(describe())
        return 0
    if args.list_guidance:
        for name in common.guidance_names():
            params = common.guidance_parameters(name)
            print(f"{name:<8} " + ", ".join(f"{k}={v}" for k, v in params.items()))
        return 0
    if args.out is None:
        raise ValueError("--out DIR is required (where the PNGs, grid.png and record.json go)")
    # validate cheap arguments before loading a model
    get_entry(args.scheduler)
    overrides = parse_overrides(args.scheduler_config)
    gspec = common.parse_guidance(args.guidance)
    common.check_steps(args.steps, 1, MAX_STEPS)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.upscale is not None and args.upscale < 1:
        raise ValueError(f"--upscale must be >= 1, got {args.upscale}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")

    model = common.load_model(args.model, args.device, args.dtype, allow_download=args.allow_download, cache=False)
    result = common.generate(
        model, scheduler=args.scheduler, steps=args.steps, guidance=gspec, seed=args.seed, n=args.n,
        labels=args.labels, prompt=args.prompt, negative_prompt=args.negative_prompt,
        scheduler_config=overrides, batch_size=args.batch_size, progress=not args.no_progress,
        upscale=args.upscale,
    )
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(result.images):
        name = f"{i:06d}.png"
        img.save(out / name)
        files.append(name)
    common.make_grid(result.images).save(out / "grid.png")
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
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(files)} images, grid.png and record.json to {out} "
          f"(NFE {result.nfe} per image, {result.wall_time:.2f} s)", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Add ``fewstep sample`` to ``subparsers``."""
    p = subparsers.add_parser(
        "sample",
        help="generate images with a named scheduler and guidance (PNGs, grid, JSON record)",
        description="Generate images with the bundled digits teacher or any diffusers pipeline, a scheduler "
        "by short name and a guidance method; writes DIR/000000.png..., DIR/grid.png and DIR/record.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DIGITS,
                   help="'digits' (bundled, offline), a local diffusers pipeline folder or a hub id (local cache "
                        "only unless --allow-download)")
    p.add_argument("--allow-download", action="store_true",
                   help="allow fetching a hub id from the Hugging Face Hub (off: local files only)")
    p.add_argument("--scheduler", default="dpmpp-2m", help="scheduler short name (see --list-schedulers)")
    p.add_argument("--scheduler-config", action="append", default=[], metavar="KEY=VALUE",
                   help="scheduler config override, repeatable (e.g. timestep_spacing=logsnr, lower_order_final=false)")
    p.add_argument("--list-schedulers", action="store_true", help="print the scheduler names and exit")
    p.add_argument("--list-guidance", action="store_true", help="print the guidance methods and parameters and exit")
    p.add_argument("--steps", type=int, default=8, help=f"inference steps (1..{MAX_STEPS})")
    p.add_argument("--guidance", default="cfg:2.0",
                   help="none | cfg:W | apg:scale=W,eta=0 | cfgpp:LAMBDA | ag:scale=W,threshold=0.99 | "
                        "rescale:phi=0.7,scale=W (see --list-guidance)")
    p.add_argument("--labels", default=None, help="class labels for class models, e.g. 0-9 or 3,7 (cycled over --n)")
    p.add_argument("--prompt", default=None, help="prompt for text-to-image pipelines")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for text-to-image pipelines")
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: all at once)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and SDE noise)")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--upscale", type=int, default=None,
                   help="nearest-neighbour upscale factor of the saved images (default: small images to ~64 px)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="auto: float32 on CPU and for digits, float16 on GPU")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run)
