"""fewstep: few-step diffusion sampling, guidance, distillation and evaluation.

``fewstep.sample`` is the functional sampling loop (:func:`fewstep.sample.sample`); schedulers
live in :mod:`fewstep.samplers`, guidance in :mod:`fewstep.guidance`, metrics in
:mod:`fewstep.eval`, the bundled digits teacher in :mod:`fewstep.models`.
"""

__version__ = "0.1.0"

from .sample import sample  # noqa: E402  (the function shadows the submodule name on purpose)
from .schedule import NoiseSchedule, from_x0_eps, make_grid, to_x0_eps  # noqa: E402

__all__ = ["sample", "NoiseSchedule", "make_grid", "to_x0_eps", "from_x0_eps", "__version__"]
