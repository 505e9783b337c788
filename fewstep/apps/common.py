"""Deprecated: ``fewstep.apps.common`` was split along its seams.

* options, labels and cheap checks -> :mod:`fewstep.apps.options`
* device, dtype and model loading -> :mod:`fewstep.apps.loading`
* :func:`generate` -> :mod:`fewstep.apps.generate`
* image tiling -> :mod:`fewstep.apps.images`
* the guidance-spec parser -> :mod:`fewstep.guidance.spec`
* the scheduler short names -> :mod:`fewstep.samplers.registry`

The old names still import from here, with a ``DeprecationWarning``.
"""

from .._imports import moved_names


def _at(module: str, *names: str) -> dict[str, str]:
    return {name: f"{module}:{name}" for name in names}


__getattr__ = moved_names(__name__, {
    **_at("fewstep.apps.options", "DIGITS", "MAX_STEPS", "check_steps", "check_seed", "parse_labels"),
    **_at("fewstep.apps.loading", "DTYPES", "resolve_device", "resolve_dtype", "LoadedModel", "load_model",
          "digits_ems_for"),
    **_at("fewstep.apps.generate", "GenerationResult", "build_scheduler", "generate"),
    **_at("fewstep.apps.images", "make_grid", "auto_upscale"),
    **_at("fewstep.guidance.spec", "GuidanceSpec", "parse_guidance", "guidance_names", "guidance_parameters"),
    "GUIDANCE_ALIASES": "fewstep.guidance.spec:ALIASES",
    **_at("fewstep.samplers.registry", "get_entry", "make_scheduler", "parse_overrides"),
    "parse_value": "fewstep._parse:parse_value",
})
