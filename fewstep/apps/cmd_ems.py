"""``fewstep ems``: compute DPM-Solver-v3 empirical model statistics (Zheng et al. 2023,
arXiv 2310.13268, Sec. 3.1 / App. C) for a model and save them as safetensors + JSON.

Models: ``digits`` (the bundled teacher; data = its training split, labels as conditions), a
local diffusers model folder (``unet/`` + ``scheduler/`` subfolders or a bare UNet folder with
``--scheduler-config``; data from ``--data`` .pt/.safetensors file holding clean samples/latents),
or ``module:callable`` returning ``(model, scheduler_config, data)``.

Several processes (``accelerate launch --num_processes N -m fewstep.apps.cli ems ...``) shard the
batches round-robin and reduce the sums; the result equals a single-process run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._imports import load_callable
from .._io import check_output_dir, check_writable, read_json
from .options import add_device_option, add_parser, add_threads_option, apply_threads, check_positive, check_threads

DESCRIPTION = """\
Compute DPM-Solver-v3's empirical model statistics (EMS; Zheng et al. 2023, Sec. 3.1) for a model
and save them as OUTPUT (.safetensors) plus a .json of the settings.

models:
  digits            the bundled teacher; data = its training split, labels as conditions
  FOLDER            a diffusers model folder (unet/ + scheduler/, or a bare UNet folder with
                    --scheduler-config); clean samples or latents from --data
  module:callable   a function returning (model, scheduler_config, data)

Several processes (accelerate launch --num_processes N -m fewstep.apps.cli ems ...) shard the
batches and reduce the sums; the result equals a single-process run.

Progress is checkpointed after every batch to OUTPUT's name with .checkpoint.pt (or --checkpoint);
rerunning the same command after an interruption resumes there. The checkpoint is removed once
OUTPUT is written.

example:
  fewstep ems --model digits --guidance-scale 2 --output my_ems.safetensors
"""


def default_checkpoint(output: str) -> Path:
    """The resume file ``fewstep ems`` uses without ``--checkpoint``: next to ``output``
    (``my_ems.safetensors`` -> ``my_ems.checkpoint.pt``)."""
    return Path(output).with_suffix(".checkpoint.pt")


def _checkpoint(args: argparse.Namespace) -> Path | None:
    if args.no_checkpoint:
        return None
    return Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.output)


def resume_hint(args: argparse.Namespace) -> str:
    """What ``fewstep ems`` prints when interrupted (Ctrl-C)."""
    ckpt = _checkpoint(args)
    if ckpt is None:
        return "progress was not saved (--no-checkpoint); rerun to start over"
    return f"progress is saved in {ckpt}; rerun the same command to resume"


def _load_data(path: str):
    import torch

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data file {path} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            t = load_file(str(p))
        except Exception as err:  # noqa: BLE001 - safetensors' own error types
            raise ValueError(f"--data {path}: not a readable safetensors file ({err})") from err
    else:
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle/zip errors of a damaged or foreign file
            raise ValueError(f"--data {path}: not a readable torch file of tensors ({type(err).__name__}: {err})") \
                from err
    return _data_of(t, path)


def _data_of(t, path: str):
    """The samples (and labels) in what ``--data`` holds: a tensor, a ``(samples, labels)`` pair,
    or a dict with ``x`` or ``samples`` (and optionally ``labels``)."""
    import torch

    if isinstance(t, torch.Tensor):
        return t
    if isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(v, torch.Tensor) for v in t):
        return tuple(t)
    if isinstance(t, dict):
        key = next((k for k in ("x", "samples") if k in t), None)
        if key is None and len(t) == 1:
            key = next(iter(t))
        if key is None or not isinstance(t[key], torch.Tensor):
            raise ValueError(f"--data {path} holds a dict with keys {sorted(map(str, t))}; it needs the samples under "
                             "'x' or 'samples' (and optionally 'labels'), or save the tensor itself")
        labels = t.get("labels")
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise ValueError(f"--data {path}: 'labels' must be a tensor, got {type(labels).__name__}")
        return t[key] if labels is None else (t[key], labels)
    raise ValueError(f"--data {path} holds a {type(t).__name__}; it needs a tensor of clean samples, a "
                     "(samples, labels) pair, or a dict with 'x'/'samples' and optionally 'labels'")


def _placement(args: argparse.Namespace, device) -> dict:
    """Keyword arguments of ``Module.to`` for the model: the run's device, float64 on request."""
    import torch

    return {"device": device or "cpu", "dtype": torch.float64 if getattr(args, "float64", False) else torch.float32}


def _resolve(args: argparse.Namespace, device=None):
    """-> (model(x, t, c), scheduler_config, data, cond, uncond, model_id); UNets are moved to ``device``."""
    from ..models.adapters import denoiser

    if args.model == "digits":
        import torch

        from ..models import load_digits_split
        from ..models.pipeline import NULL_CLASS, load_digits_scheduler_config, load_digits_teacher_unet

        model = denoiser(load_digits_teacher_unet().to(**_placement(args, device)), null_class=NULL_CLASS)
        x, y = load_digits_split("train")
        uncond = torch.full((1,), NULL_CLASS, dtype=torch.long) if args.guidance_scale not in (None, 1.0) else None
        # conditional EMS: per-sample labels; with --unconditional every sample gets the null label
        data = (x, model.null(y)) if args.unconditional else (x, y)
        return model, load_digits_scheduler_config(), data, None, uncond, "fewstep-digits-teacher"
    if ":" in args.model and not Path(args.model).exists():
        got = load_callable(args.model, "--model")()
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise ValueError(f"--model {args.model}: the callable must return (model, scheduler_config, data), "
                             f"got {type(got).__name__}")
        model, config, data = got
        return model, dict(config), data, None, None, args.model
    from diffusers import UNet2DModel

    folder = Path(args.model)
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    unet = UNet2DModel.from_pretrained(str(unet_dir)).eval().requires_grad_(False).to(**_placement(args, device))
    return denoiser(unet), _scheduler_config(args), _load_data(args.data), None, None, str(folder)


def _scheduler_config(args: argparse.Namespace) -> dict:
    folder = Path(args.model)
    path = Path(args.scheduler_config) if args.scheduler_config else folder / "scheduler" / "scheduler_config.json"
    if not path.exists():
        raise FileNotFoundError(f"scheduler config {path} not found; pass --scheduler-config")
    config = read_json(path, "scheduler config")
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config {path} must hold a JSON object, got {type(config).__name__}")
    return config


def _check(args: argparse.Namespace) -> None:
    """The checks that need no torch."""
    for name in ("num_grid", "batch_size", "pairs_per_call"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    check_positive("--num-samples", args.num_samples, allow_none=True)
    check_threads(args.threads)
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ValueError(f"--output must end with .safetensors, got {args.output!r}")
    check_output_dir(out.parent, "--output")
    check_writable(out, "--output")
    ckpt = _checkpoint(args)
    if ckpt is not None:
        check_writable(ckpt, "--checkpoint")
    if args.model == "digits":
        return
    if ":" in args.model and not Path(args.model).exists():
        load_callable(args.model, "--model")  # module missing vs attribute missing, before any work
        return
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model!r} is neither 'digits', a folder, nor module:callable")
    _scheduler_config(args)
    if args.data is None:
        raise ValueError("--data (a .pt or .safetensors file of clean samples) is required for a model folder")
    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data file {args.data} does not exist")


def _run(args: argparse.Namespace) -> int:
    _check(args)
    apply_threads(args.threads, tiny=args.model == "digits")
    import torch

    from ..device import launched_processes
    from ..samplers import compute_ems

    with launched_processes(args.device, name="--device") as (device, acc):
        model, config, data, cond, uncond, model_id = _resolve(args, device)
        ems = compute_ems(
            model, config, data, num_grid=args.num_grid, num_samples=args.num_samples, batch_size=args.batch_size,
            t_range=tuple(args.t_range) if args.t_range else None, cond=cond, uncond=uncond,
            guidance_scale=args.guidance_scale, pairs_per_call=args.pairs_per_call, seed=args.seed,
            checkpoint=_checkpoint(args), model_id=model_id, progress=not args.quiet, device=device,
            dtype=torch.float64 if args.float64 else torch.float32, accelerator=acc,
        )
        if acc is None or acc.is_main_process:
            path = ems.save(args.output)
            _remove_checkpoint(args, 1 if acc is None else acc.num_processes)
            print(json.dumps({"output": str(path), "world_size": 1 if acc is None else acc.num_processes,
                              **{k: ems.metadata.get(k) for k in
                                 ("num_grid", "num_samples", "guidance_scale", "t_range", "seconds")}}, indent=2))
    return 0


def _remove_checkpoint(args: argparse.Namespace, world: int) -> None:
    """The default checkpoint (and its per-rank files) is spent once the output is written."""
    if args.checkpoint or args.no_checkpoint:
        return
    ckpt = default_checkpoint(args.output)
    for p in [ckpt] + [ckpt.with_name(f"{ckpt.name}.rank{r}") for r in range(world)]:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            print(f"fewstep ems: could not remove the spent checkpoint {p}: {err}", file=sys.stderr)


def register(subparsers) -> None:
    """Add the ``ems`` subcommand."""
    p = add_parser(subparsers, "ems", help="compute DPM-Solver-v3 EMS for a model", description=DESCRIPTION)
    p.add_argument("--model", default="digits", help="'digits', a diffusers model folder, or module:callable")
    p.add_argument("--output", required=True, metavar="PATH",
                   help="output .safetensors path (a .json of the settings is written next to it)")
    p.add_argument("--scheduler-config", default=None, metavar="JSON", help="scheduler_config.json (model folders)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help=".pt/.safetensors file of clean samples (model folders)")
    p.add_argument("--num-grid", type=int, default=200, help="lambda intervals N (paper: 120-1200)")
    p.add_argument("--num-samples", type=int, default=None, help="K samples (default: all data)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    p.add_argument("--pairs-per-call", type=int, default=4096, help="(sample, grid point) pairs per model call")
    p.add_argument("--t-range", type=float, nargs=2, default=None, metavar=("T_MIN", "T_MAX"),
                   help="model-time range of the grid (default: the whole schedule)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale w the EMS are computed at")
    p.add_argument("--unconditional", action="store_true", help="digits: use the null label for every sample")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="resume file, written after every batch (default: OUTPUT with .checkpoint.pt, removed "
                        "when OUTPUT is written)")
    p.add_argument("--no-checkpoint", action="store_true", help="do not save progress (no resume after a kill)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    add_device_option(p)
    p.add_argument("--float64", action="store_true", help="run the model in float64 (exact-model studies)")
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run, resume_hint=resume_hint)
