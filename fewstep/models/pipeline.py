"""``DigitsPipeline``: the bundled class-conditional digits teacher as a diffusers pipeline.

The teacher is a diffusers ``UNet2DModel`` (8x8, one channel, no attention, ``num_class_embeds=11``
where class 10 is the null label used for classifier-free guidance) trained with v-prediction
(Salimans & Ho 2022) on a cosine (``squaredcos_cap_v2``) 1000-step VP schedule; see
:mod:`fewstep.models.train`. Everything loads offline from package data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .._io import read_json
from .adapters import denoiser
from .digits import NUM_CLASSES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_WEIGHTS = WEIGHTS_DIR / "digits_unet.safetensors"
UNET_CONFIG = WEIGHTS_DIR / "digits_unet_config.json"
SCHEDULER_CONFIG = WEIGHTS_DIR / "digits_scheduler_config.json"
NULL_CLASS = NUM_CLASSES
OUTPUT_TYPES = ("pil", "pt", "np")


@dataclass
class DigitsPipelineOutput(BaseOutput):
    """Output of :class:`DigitsPipeline`.

    ``images``: list of PIL ``L`` images, a float tensor ``(B, 1, H, W)`` in [0, 1] (``"pt"``) or a
    float array ``(B, H, W, 1)`` in [0, 1] (``"np"``). ``nfe``: model evaluations per image
    (a conditional + unconditional pair counts as two).
    """

    images: Any
    nfe: int = 0


def _check_labels(class_labels) -> torch.Tensor:
    if isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
        class_labels = [int(class_labels)]
    if isinstance(class_labels, torch.Tensor):
        labels = class_labels.detach().cpu().reshape(-1)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers 0..9, got a {labels.dtype} tensor")
        labels = labels.long()
    else:
        try:
            seq = list(class_labels)
        except TypeError:
            raise ValueError(f"class_labels must be an int or a sequence of ints 0..9, got {class_labels!r}") from None
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in seq):
            raise ValueError(f"class_labels must be integers 0..9, got {seq!r}")
        labels = torch.tensor([int(c) for c in seq], dtype=torch.long)
    if labels.numel() == 0:
        raise ValueError("class_labels must not be empty")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.numel():
        raise ValueError(f"class_labels must be in 0..{NUM_CLASSES - 1}, got {bad.tolist()}")
    return labels


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional 8x8 digits sampler: ``pipe(class_labels=[3, 7], num_inference_steps=8)``.

    Components: ``unet`` (``UNet2DModel`` with 11 class embeddings, class 10 = null, predicting
    whatever ``scheduler.config.prediction_type`` says -- ``v_prediction`` for the shipped teacher)
    and ``scheduler`` (any diffusers scheduler for discrete-time VP models, e.g. DDPM, DDIM,
    DPMSolverMultistep, Euler, UniPC, or a fewstep scheduler). The pipeline only uses the public
    scheduler contract: ``set_timesteps``, ``timesteps``, ``init_noise_sigma``,
    ``scale_model_input`` and ``step`` (``generator`` is passed to ``step`` only when its signature
    accepts one, so ancestral/SDE schedulers are reproducible). The loop is :func:`fewstep.sample`
    over :func:`fewstep.models.adapters.denoiser` ``(unet, null_class=10)``.

    Guidance convention (diffusers' ``guidance_scale`` ``w``; Ho & Salimans 2022, "Classifier-Free
    Diffusion Guidance", eq. 6 written as ``uncond + w (cond - uncond)``): for ``w > 1`` the model
    output is :class:`fewstep.guidance.CFG` ``(w)``, combined on the raw (v) output, which is linear
    in ``x0`` and ``eps`` so it equals the same combination in x0 space; both branches run in one
    batched UNet call. For ``w <= 1`` only the conditional model is evaluated (no unconditional
    pass; ``w`` is then ignored). ``guidance=`` takes any :class:`fewstep.guidance.Guidance`
    (APG, CFG++, ...) instead.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @staticmethod
    def _guidance(guidance_scale: float, guidance=None):
        """The guidance rule of one call: ``guidance`` when given, else ``CFG(w)`` for ``w > 1``
        and None (conditional model only) for ``w <= 1``."""
        if guidance is not None:
            return guidance
        from fewstep.guidance.methods import CFG

        return CFG(guidance_scale) if guidance_scale > 1.0 else None

    def _sampling_model(self, guidance_scale: float, guidance=None):
        """``(model, guide)`` for one call: ``model(x, t, c)`` over the UNet and the guidance rule
        (None: one conditional pass per step). Subclasses with another conditioning (e.g. the
        distilled students' guidance embedding) override this one method."""
        return denoiser(self.unet, NULL_CLASS), self._guidance(guidance_scale, guidance)

    def _model_output(
        self, x: torch.Tensor, t, labels: torch.Tensor, guidance_scale: float
    ) -> tuple[torch.Tensor, int]:
        """Raw guided model output at ``(x, t)`` and the number of evaluations per image it took
        (one step of :meth:`__call__`)."""
        model, guide = self._sampling_model(guidance_scale)
        if guide is None:
            return model(x, t, labels), 1
        out, _, used = guide.predict(model, x, t, labels, model.null(labels))
        return out, used

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 8,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        upscale: int | None = None,
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
        guidance=None,
        **step_kwargs,
    ) -> DigitsPipelineOutput | tuple:
        """Generate one 8x8 digit per entry of ``class_labels`` (ints 0..9).

        Args:
            class_labels: an int or a sequence/1-D tensor of ints in 0..9, one image each.
            num_inference_steps: scheduler steps (>= 1); model evaluations are
                ``num_inference_steps * scheduler.order``-ish, doubled when guiding.
            guidance_scale: diffusers' CFG scale ``w`` (see class docstring); ``<= 1`` disables
                the unconditional pass.
            generator: ``torch.Generator`` (or one per image) for the initial noise and for
                stochastic scheduler steps.
            output_type: ``"pil"`` (list of greyscale PIL images), ``"pt"`` (tensor
                ``(B, 1, H, W)`` in [0, 1]) or ``"np"`` (array ``(B, H, W, 1)`` in [0, 1]).
            upscale: optional integer factor for nearest-neighbour upscaling for viewing
                (e.g. 8 gives 64x64); applied to every output type.
            latents: optional initial noise ``(B, 1, 8, 8)`` (standard normal; it is multiplied by
                ``scheduler.init_noise_sigma``).
            return_dict: return :class:`DigitsPipelineOutput` (default) or a tuple ``(images,)``.
            guidance: a :class:`fewstep.guidance.Guidance` (e.g. ``APG(3.0)``) used instead of
                ``guidance_scale``; a fresh generation resets its state.
            **step_kwargs: extra keyword arguments for ``scheduler.step`` (e.g. ``eta`` for DDIM).

        Returns: :class:`DigitsPipelineOutput` with ``images`` and ``nfe`` (model evaluations per
        image). Raises ``ValueError`` naming the bad argument, ``FloatingPointError`` (with the
        step index) if the sample becomes non-finite.
        """
        from fewstep.sample import sample

        labels = _check_labels(class_labels)
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        try:
            guidance_scale = float(guidance_scale)
        except (TypeError, ValueError):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}") from None
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad_type = isinstance(upscale, bool) or not isinstance(upscale, (int, np.integer))
        if upscale is not None and (bad_type or upscale < 1):
            raise ValueError(f"upscale must be None or an integer >= 1, got {upscale!r}")
        if guidance is not None and not hasattr(guidance, "predict"):
            raise ValueError(f"guidance must be None or a fewstep.guidance.Guidance, got {guidance!r}")

        device = self._execution_device
        dtype = self.unet.dtype
        labels = labels.to(device)
        b = labels.shape[0]
        size = self.unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        shape = (b, self.unet.config.in_channels, *size)
        if isinstance(generator, list) and len(generator) != b:
            raise ValueError(f"generator list must have one generator per image ({b}), got {len(generator)}")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)

        model, guide = self._sampling_model(guidance_scale, guidance)
        x, nfe = sample(model, latents, self.scheduler, int(num_inference_steps),
                        guidance=guide, cond=labels, uncond=None if guide is None else model.null(labels),
                        generator=generator, step_kwargs=step_kwargs,
                        progress=not getattr(self, "_progress_bar_config", {}).get("disable", False))

        images = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
        if upscale is not None and upscale > 1:
            images = images.repeat_interleave(int(upscale), dim=-2).repeat_interleave(int(upscale), dim=-1)
        if output_type == "pt":
            result = images
        else:
            arr = images.permute(0, 2, 3, 1).numpy()
            result = arr if output_type == "np" else self.numpy_to_pil(arr)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return DigitsPipelineOutput(images=result, nfe=nfe)


def load_digits_teacher_unet(device: str | torch.device = "cpu"):
    """The shipped teacher ``UNet2DModel`` (EMA weights, eval mode) from package data, offline."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    for f in (UNET_WEIGHTS, UNET_CONFIG):
        if not f.exists():
            raise FileNotFoundError(
                f"digits teacher file {f} is missing; reinstall fewstep or run `fewstep train-teacher`")
    unet = UNet2DModel.from_config(read_json(UNET_CONFIG, "digits UNet config"))
    unet.load_state_dict(load_file(str(UNET_WEIGHTS)))
    return unet.to(device).eval().requires_grad_(False)


def load_digits_scheduler_config() -> dict:
    """The shipped diffusers scheduler config of the teacher (a ``DDPMScheduler`` config:
    1000 steps, ``squaredcos_cap_v2``, ``v_prediction``, ``timestep_spacing="trailing"``)."""
    return read_json(SCHEDULER_CONFIG, "digits scheduler config")


def load_digits_pipeline(device: str | torch.device = "cpu", scheduler=None,
                         student: str | None = None) -> DigitsPipeline:
    """Load the shipped digits teacher as a :class:`DigitsPipeline`, offline.

    ``student``: ``None`` for the teacher, or the name of a shipped distilled student (``"cd"``,
    ``"lcm"``; the one-step ``"fdistill"``, ``"disback"``), returned as a
    :class:`fewstep.models.students.DigitsStudentPipeline` that is called the same way and samples
    with the student's own consistency sampler (see
    :func:`fewstep.models.students.load_digits_student_pipeline` for ``scheduler`` there).

    ``scheduler``: ``None`` (diffusers ``DPMSolverMultistepScheduler``, DPM-Solver++(2M), built from
    the shipped config -- a good deterministic few-step default), a scheduler class (instantiated
    with ``from_config`` on the shipped ``DDPMScheduler`` config) or a scheduler instance (used as
    is; it must have the teacher's noise schedule and ``prediction_type="v_prediction"``).
    The progress bar is disabled; re-enable with ``pipe.set_progress_bar_config(disable=False)``.
    """
    from diffusers import DPMSolverMultistepScheduler

    if student is not None:
        from .students import load_digits_student_pipeline

        return load_digits_student_pipeline(student, device=device, scheduler=scheduler)
    unet = load_digits_teacher_unet(device)
    config = load_digits_scheduler_config()
    if scheduler is None:
        scheduler = DPMSolverMultistepScheduler.from_config(config)
    elif isinstance(scheduler, type):
        if not hasattr(scheduler, "from_config"):
            raise ValueError(f"scheduler class {scheduler.__name__} has no from_config")
        scheduler = scheduler.from_config(config)
    elif not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")):
        raise ValueError(f"scheduler must be None, a scheduler class or a scheduler instance, got {scheduler!r}")
    pipe = DigitsPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
