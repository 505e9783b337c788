"""fewstep: few-step diffusion sampling, guidance, distillation and evaluation.

``fewstep.sample`` is the functional sampling loop (:func:`fewstep.sample.sample`); schedulers
live in :mod:`fewstep.samplers`, guidance in :mod:`fewstep.guidance`, metrics in
:mod:`fewstep.eval`, the bundled digits teacher in :mod:`fewstep.models`.

``import fewstep`` imports neither torch nor diffusers (the ``fewstep`` command line starts from
it); the schedule names below load on first use.
"""

__version__ = "0.1.0"

from .sample import sample  # noqa: E402  (the function shadows the submodule name on purpose)

_SCHEDULE_EXPORTS = ("NoiseSchedule", "make_grid", "to_x0_eps", "from_x0_eps")

__all__ = ["sample", "NoiseSchedule", "make_grid", "to_x0_eps", "from_x0_eps", "__version__"]


def __getattr__(name: str):
    if name in _SCHEDULE_EXPORTS:
        from . import schedule

        return getattr(schedule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
