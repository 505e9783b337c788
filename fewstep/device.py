"""Device selection and multi-process launches, shared by the library (evaluation, EMS) and the
command line."""

from __future__ import annotations

import contextlib
import os

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto", name: str = "device") -> torch.device:
    """Turn a device spec into a ``torch.device``.

    ``"auto"`` (or ``None``) -> ``cuda`` when available, else ``mps`` when available, else ``cpu``;
    ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"`` are taken as given (case-insensitive) and a
    ``ValueError`` says so when that device is not available here; a ``torch.device`` passes
    through. ``name`` is how the argument is called in messages (``"--device"`` for the CLI).
    """
    if isinstance(spec, torch.device):
        return spec
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"{name} must be a str or torch.device, got {type(spec).__name__}")
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    base = spec.split(":")[0]
    if base not in DEVICES:
        raise ValueError(f"{name} {spec!r} is not supported; allowed: auto, cpu, cuda, cuda:N, mps")
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {spec!r}: CUDA is not available in this torch build/machine; use 'cpu' or 'auto'")
    if base == "mps" and not _mps_available():
        raise ValueError(f"{name} {spec!r}: MPS is not available; use 'cpu' or 'auto'")
    try:
        return torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"{name} {spec!r} is not a valid device: {err}") from None


@contextlib.contextmanager
def launched_processes(spec: str | torch.device | None = "auto", name: str = "device"):
    """Context manager yielding ``(device, accelerator)`` for a command that may run under a
    multi-process launch (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE`` > 1): there an
    ``accelerate.Accelerator`` (on the CPU when ``spec`` is ``"cpu"``) and its device, which set up
    the process group; otherwise ``(resolve_device(spec, name), None)``. On exit every rank waits
    for the others and the group is destroyed: a gloo/nccl group left alive at exit aborts the
    process ("terminate called without an active exception") and fails the launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield resolve_device(spec, name), None
        return
    from accelerate import Accelerator

    acc = Accelerator(cpu=str(spec).strip().lower() == "cpu")
    try:
        yield acc.device, acc
    finally:
        acc.wait_for_everyone()
        acc.end_training()
