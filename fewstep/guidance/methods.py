"""Guidance rules: CFG, guidance rescale, APG, CFG++ and Adaptive Guidance.

Scale conventions used throughout (the table in docs/guidance.md maps them to diffusers and ComfyUI):

* ``w`` ("diffusers / Imagen convention"): ``uncond + w (cond - uncond)``; ``w = 1`` is the
  conditional model alone. diffusers' ``guidance_scale`` and ComfyUI's ``cfg`` are this ``w``.
* Ho & Salimans' original ``cond + w' (cond - uncond)`` has ``w' = w - 1`` (diffusers'
  ``use_original_formulation=True``).
* CFG++ takes ``lambda`` (ComfyUI's ``cfg`` in the ``*_cfg_pp`` samplers; A1111's DDIM CFG++ uses
  ``lambda = w / 12.5``).
"""

from __future__ import annotations

import math

import torch

from .base import Guidance, GuidanceContext, check_number, check_space


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1)


def _bshape(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (ref.ndim - 1))


def _as_guidance(guidance, scale, name="guidance") -> Guidance:
    if guidance is None:
        if scale is None:
            raise ValueError(f"give either {name} (a Guidance) or scale")
        return CFG(scale)
    if not isinstance(guidance, Guidance):
        raise ValueError(f"{name} must be a fewstep.guidance.Guidance, got {type(guidance).__name__}")
    if scale is not None:
        raise ValueError(f"give either {name} or scale, not both")
    return guidance


class _WrappedGuidance(Guidance):
    """Base of the rules that wrap an inner rule (GuidanceRescale, AdaptiveGuidance, LinearAG):
    holds ``inner``, resets it with the wrapper, reports its ``scale`` (diffusers
    ``guidance_scale`` convention) and, unless ``allow_renoise``, refuses CFG++ inside."""

    def __init__(self, inner: Guidance, allow_renoise: bool = True):
        super().__init__()
        self.inner = inner
        if not allow_renoise and inner.needs_renoise:
            raise ValueError(f"guidance: {type(self).__name__} cannot wrap CFG++ (it renoises with the "
                             "unconditional prediction at every step)")

    @property
    def scale(self):
        return getattr(self.inner, "scale", None)

    def reset(self):
        super().reset()
        self.inner.reset()


# ------------------------------------------------------------------------------------------------
def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on raw outputs (Ho & Salimans 2022, Eq. 6, diffusers' convention):
    ``uncond + w (cond - uncond)`` with ``w = scale`` (``w = 1`` is the conditional model). Linear,
    so it is the same in eps, x0, v or flow-velocity space. The one place fewstep writes this formula."""
    return uncond + scale * (cond - uncond)


# ------------------------------------------------------------------------------------------------
class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Eq. 6).

    ``out = uncond + w (cond - uncond)`` on the raw model output. The rule is linear, so it is the
    same in eps, x0, v or flow-velocity space.

    Scale: ``scale = w`` in the diffusers/Imagen convention (``w = 1``: no guidance). It equals
    diffusers' ``guidance_scale`` and ComfyUI's ``cfg``; the paper's ``w_paper = w - 1``.
    """

    def __init__(self, scale: float = 7.5):
        super().__init__()
        self.scale = check_number("scale", scale)

    def make_context(self, x, t, scheduler, step_index: int, num_steps: int | None) -> GuidanceContext:
        """CFG is linear in the raw output, so its step needs no noise level: the context carries
        ``alpha = sigma = nan`` and reads nothing from the scheduler (``fewstep.sample(guidance=w)``
        works with any scheduler, as a pipeline's own CFG does)."""
        return GuidanceContext(x, t, math.nan, math.nan, step_index=step_index, num_steps=num_steps,
                               scheduler=scheduler)

    def needs_uncond(self, ctx):
        """At ``scale == 1`` the guided output is the conditional one: skip the unconditional pass
        (exact; the same one evaluation per step as ``fewstep.sample(guidance=1.0)``)."""
        want = self.scale != 1.0
        return torch.full((ctx.x.shape[0],), want, dtype=torch.bool, device=ctx.x.device)

    def guide(self, cond, uncond, ctx):
        """``uncond + w (cond - uncond)``, computed in the outputs' dtype."""
        return cfg_combine(cond, uncond, self.scale)

    def _repr_args(self):
        return {"scale": self.scale}


# ------------------------------------------------------------------------------------------------
class GuidanceRescale(_WrappedGuidance):
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Sec. 3.4, Eq. 15-16) wrapped around any other guidance.

    With ``g`` the inner guided prediction and ``c`` the conditional one, both in ``space``:
    ``g_r = g * std(c) / std(g)`` (std per sample over all non-batch dims, unbiased, as diffusers'
    ``rescale_noise_cfg``) and ``out = phi g_r + (1 - phi) g``. ``phi = 0`` is the inner guidance
    exactly.

    Args:
        phi: rescale strength in [0, 1] (diffusers' ``guidance_rescale``; the paper and ComfyUI's
            ``RescaleCFG`` use 0.7).
        guidance: the inner rule (any :class:`Guidance` without renoising), or None with ``scale``
            for ``CFG(scale)``.
        scale: shorthand for ``guidance=CFG(scale)`` (diffusers ``guidance_scale``).
        space: ``"output"`` (diffusers: the raw model output, eps for SD/SDXL), ``"v"`` (ComfyUI's
            ``RescaleCFG``, which rescales v), ``"eps"`` or ``"x0"``.
    """

    def __init__(self, phi: float = 0.7, guidance: Guidance | None = None, scale: float | None = None,
                 space: str = "output"):
        self.phi = check_number("phi", phi, 0.0, 1.0)
        super().__init__(_as_guidance(guidance, scale))
        self.space = check_space(space)
        self.needs_renoise = self.inner.needs_renoise

    def needs_uncond(self, ctx):
        return self.inner.needs_uncond(ctx)

    def guide(self, cond, uncond, ctx):
        """Rescale the inner rule's output toward the conditional output's std (Eq. 15-16)."""
        g = self.inner.guide(cond, uncond, ctx)
        if self.phi == 0.0:
            return g
        gs, cs = ctx.to_space(g, self.space), ctx.to_space(cond, self.space)
        dims = list(range(1, gs.ndim))
        std_c = cs.std(dim=dims, keepdim=True)
        std_g = gs.std(dim=dims, keepdim=True)
        rescaled = gs * (std_c / std_g)
        out = self.phi * rescaled + (1.0 - self.phi) * gs
        return ctx.from_space(out, self.space)

    def renoise(self, cond, uncond, ctx):
        return self.inner.renoise(cond, uncond, ctx)

    def _repr_args(self):
        return {"phi": self.phi, "guidance": self.inner, "space": self.space}


# ------------------------------------------------------------------------------------------------
def apg_update(cond: torch.Tensor, uncond: torch.Tensor, scale: float, eta: float = 0.0,
               norm_threshold: float = 0.0, buffer: torch.Tensor | None = None, momentum: float = 0.0):
    """One step of Adaptive Projected Guidance (Sadat, Hilliges & Weber 2025, "Eliminating
    Oversaturation and Artifacts of High Guidance Scales in Diffusion Models", Algorithm 1,
    Eq. 9-13), in whatever space ``cond``/``uncond`` are given.

    ``d = cond - uncond``; with momentum ``beta``: ``b <- d + beta b``, ``d = b`` (Eq. 13);
    with ``norm_threshold r > 0``: ``d <- d min(1, r / ||d||)`` (Eq. 12, per-sample L2 norm over
    all non-batch dims); ``d_par`` is the projection of ``d`` on ``cond`` and ``d_orth = d - d_par``
    (Eq. 9-10, computed in float64); ``out = cond + (w - 1)(d_orth + eta d_par)`` (Eq. 11).
    With ``eta = 1``, ``r = 0`` and ``beta = 0`` this is CFG ``uncond + w (cond - uncond)``.

    Returns ``(out, new_buffer)`` (``new_buffer`` is None when ``buffer`` is None and
    ``momentum == 0``).
    """
    diff = cond - uncond
    new_buf = None
    if momentum != 0.0 or buffer is not None:
        new_buf = diff if buffer is None else diff + momentum * buffer
        diff = new_buf
    if norm_threshold > 0:
        norm = _flat(diff).double().norm(dim=1)
        factor = torch.clamp(norm_threshold / norm.clamp_min(1e-30), max=1.0).to(diff.dtype)
        diff = diff * _bshape(factor, diff)
    d64, c64 = _flat(diff).double(), _flat(cond).double()
    unit = c64 / c64.norm(dim=1, keepdim=True).clamp_min(1e-30)
    par = (d64 * unit).sum(dim=1, keepdim=True) * unit
    orth = d64 - par
    update = (orth + eta * par).to(cond.dtype).reshape(cond.shape)
    return cond + (scale - 1.0) * update, new_buf


class APG(Guidance):
    """Adaptive Projected Guidance (Sadat, Hilliges & Weber, ICLR 2025, arXiv 2410.02416,
    Algorithm 1; see :func:`apg_update` for the equations).

    Works in ``space="x0"`` by default, the denoised prediction the paper applies it to (ComfyUI's
    ``APG`` node does too; diffusers' ``AdaptiveProjectedGuidance`` guider works on the raw output,
    ``space="output"``). ``norm_threshold`` is a norm in that space, so it depends on the space and
    on the data size.

    The momentum buffer is per sample and reset at every generation (:meth:`reset`).

    Scale: ``scale = w`` in the diffusers convention and the paper's
    ``pred = cond + (w - 1) update`` (with ``eta = 1``, ``norm_threshold = 0``, ``momentum = 0``
    it is exactly ``CFG(w)``). diffusers' guider at ``guidance_scale = w`` with
    ``use_original_formulation=True`` needs ``guidance_scale = w - 1``; ComfyUI's ``APG`` node
    at ``apg_scale = s`` is this class at ``scale = s + 1``.

    Args:
        scale: ``w`` (>= 0).
        eta: weight of the parallel component (paper: 0).
        norm_threshold: ``r`` for the norm clipping; 0 disables it.
        momentum: ``beta`` of the running sum (paper recommends negative, e.g. -0.5); 0 disables.
        space: ``"x0"`` (default), ``"eps"``, ``"v"`` or ``"output"``.
    """

    def __init__(self, scale: float = 7.5, eta: float = 0.0, norm_threshold: float = 0.0, momentum: float = 0.0,
                 space: str = "x0"):
        super().__init__()
        self.scale = check_number("scale", scale, 0.0)
        self.eta = check_number("eta", eta)
        self.norm_threshold = check_number("norm_threshold", norm_threshold, 0.0)
        self.momentum = check_number("momentum", momentum, -10.0, 1.0)
        self.space = check_space(space)
        self._buffer = None

    def reset(self):
        super().reset()
        self._buffer = None

    def guide(self, cond, uncond, ctx: GuidanceContext):
        """APG in ``self.space`` (see :func:`apg_update`)."""
        c, u = ctx.to_space(cond, self.space), ctx.to_space(uncond, self.space)
        buf = None
        if self.momentum != 0.0:
            rows = torch.arange(c.shape[0], device=c.device) if ctx.rows is None else ctx.rows.to(c.device)
            need = int(rows.max()) + 1
            if self._buffer is None or self._buffer.shape[1:] != c.shape[1:]:
                self._buffer = torch.zeros((need,) + tuple(c.shape[1:]), dtype=c.dtype, device=c.device)
            elif self._buffer.shape[0] < need:
                pad = torch.zeros((need - self._buffer.shape[0],) + tuple(c.shape[1:]), dtype=self._buffer.dtype,
                                  device=c.device)
                self._buffer = torch.cat([self._buffer, pad])
            buf = self._buffer[rows].to(c.dtype)
        out, new_buf = apg_update(c, u, self.scale, self.eta, self.norm_threshold, buf, self.momentum)
        if new_buf is not None:
            self._buffer[rows] = new_buf.to(self._buffer.dtype)
        return ctx.from_space(out, self.space)

    def _repr_args(self):
        return {"scale": self.scale, "eta": self.eta, "norm_threshold": self.norm_threshold,
                "momentum": self.momentum, "space": self.space}


# ------------------------------------------------------------------------------------------------
class CFGPlusPlus(Guidance):
    """CFG++ (Chung, Kim, Park, Nam & Ye, ICLR 2025, arXiv 2406.08070, Eq. 9 / Algorithm 1).

    ``eps_lam = eps_u + lambda (eps_c - eps_u)`` gives the data prediction
    ``x0_lam = (x - sigma eps_lam) / alpha`` (Tweedie), and the sampler renoises with the
    *unconditional* noise: ``x_next = alpha_next x0_lam + sigma_next eps_u`` (DDIM). The guided
    raw output is handed to the scheduler, ``eps_u`` through fewstep's renoise protocol
    (``scheduler.step(..., renoise_eps=eps_u)``: the step restarts from
    ``alpha_s x0_lam + sigma_s eps_u``). Space: eps (the mix is linear, so it is the same mix of
    the raw output; the renoise noise is the unconditional *eps*, whatever the prediction type).

    With fewstep's DPM-Solver++ 2M the history keeps the guided ``x0_lam`` (the same data
    predictions as CFG) and only the restart point uses ``eps_u``; the first-order solver
    (``solver_order=1``) is exactly the paper's DDIM CFG++.

    Scale: ``scale = lambda`` in [0, 1] interpolates (values > 1 extrapolate); ``lambda = 1``
    still differs from the conditional model (the renoising is unconditional). This is ComfyUI's
    ``cfg`` in its ``*_cfg_pp`` samplers; A1111's DDIM CFG++ maps its CFG scale to
    ``lambda = cfg / 12.5``; the paper reports ``lambda in [0, 1]`` behaving like CFG ``w in
    [1, 12.5]``. There is no diffusers ``guidance_scale`` for it. Always needs the unconditional
    branch; raises ValueError with a scheduler that cannot renoise.
    """

    needs_renoise = True

    def __init__(self, scale: float = 0.6):
        super().__init__()
        self.scale = check_number("scale", scale, 0.0)

    def guide(self, cond, uncond, ctx):
        """``uncond + lambda (cond - uncond)`` on the raw output (= ``eps_lam`` in eps space)."""
        return cfg_combine(cond, uncond, self.scale)

    def renoise(self, cond, uncond, ctx):
        """The unconditional ``eps`` the scheduler renoises with."""
        return ctx.x0_eps(uncond)[1]

    def _repr_args(self):
        return {"scale": self.scale}


# ------------------------------------------------------------------------------------------------
def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample's flattened ``a`` and ``b`` (float64, shape (B,))."""
    a64, b64 = _flat(a).double(), _flat(b).double()
    return (a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1)).clamp_min(1e-30)


class AdaptiveGuidance(_WrappedGuidance):
    """Adaptive Guidance (Castillo et al., AAAI 2025, arXiv 2312.12487, Sec. 4: "AG").

    Runs the inner guidance (CFG by default) while the conditional and unconditional predictions
    disagree; at each guided step it measures ``gamma = cos(cond, uncond)`` per sample in
    ``space`` and, once ``gamma >= threshold``, stops evaluating the unconditional branch for that
    sample for the rest of the generation (conditional-only steps, 1 evaluation instead of 2).
    The step where the criterion is met is still guided; skipping starts at the next step. Before
    the switch the result is the inner guidance's, bit for bit.

    ``per_sample=True`` decides per sample (the unconditional branch then runs on the sub-batch
    still guided, when the conditions can be sliced; otherwise on the whole batch);
    ``per_sample=False`` switches the whole batch once every sample meets the criterion.

    Space: ``"x0"`` by default (the denoised predictions, as the reference ComfyUI node); in
    ``"eps"`` space the two branches agree almost perfectly at high noise (both are dominated by
    ``x / sigma``), so the threshold must be much closer to 1 and ``min_step`` matters.
    ``threshold >= 1`` never switches (exactly the inner guidance).

    Scale: ``scale = w`` of the inner ``CFG(w)`` (diffusers ``guidance_scale``, ComfyUI ``cfg``);
    or pass ``guidance=APG(...)`` etc. for compositions such as AG + APG (not CFG++: it needs the
    unconditional branch at every step).

    Args:
        scale: ``w`` of the inner CFG when ``guidance`` is None.
        threshold: ``gamma_bar``, in (-1, 1]; the paper's ablations use values close to 1.
        guidance: the inner rule.
        space: where the cosine is measured: ``"x0"``, ``"eps"``, ``"v"`` or ``"output"``.
        per_sample: decide per sample (True) or for the whole batch.
        min_step: never switch before this step index (an optional guard).
    """

    def __init__(self, scale: float | None = None, threshold: float = 0.99, guidance: Guidance | None = None,
                 space: str = "x0", per_sample: bool = True, min_step: int = 0):
        if guidance is None and scale is None:
            scale = 7.5
        super().__init__(_as_guidance(guidance, scale), allow_renoise=False)
        self.threshold = check_number("threshold", threshold, -1.0, None, low_open=True)
        self.space = check_space(space)
        if not isinstance(per_sample, bool):
            raise ValueError(f"per_sample must be a bool, got {per_sample!r}")
        self.per_sample = per_sample
        if isinstance(min_step, bool) or not isinstance(min_step, int) or min_step < 0:
            raise ValueError(f"min_step must be an int >= 0, got {min_step!r}")
        self.min_step = min_step
        self._off = None
        self.switch_steps: list = []

    def reset(self):
        super().reset()
        self._off = None
        self.switch_steps = []

    def needs_uncond(self, ctx):
        b = ctx.x.shape[0]
        if self._off is None or self._off.shape[0] != b:
            self._off = torch.zeros(b, dtype=torch.bool, device=ctx.x.device)
            self.switch_steps = [None] * b
        return ~self._off

    def guide(self, cond, uncond, ctx):
        return self.guide_masked(cond, uncond, torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device), ctx)

    def guide_masked(self, cond, uncond, mask, ctx):
        """Inner guidance on the still-guided samples, ``cond`` on the others; updates the switch."""
        if self._off is None or self._off.shape[0] != cond.shape[0]:
            self.needs_uncond(ctx)
        out = self.inner.guide_masked(cond, uncond, mask, ctx)
        if uncond is not None and bool(mask.any()) and self.threshold < 1.0 and ctx.step_index >= self.min_step:
            sub = ctx.subset(mask) if not bool(mask.all()) else ctx
            c_m = cond[mask] if not bool(mask.all()) else cond
            gamma = cosine_per_sample(sub.to_space(c_m, self.space), sub.to_space(uncond, self.space))
            hit = gamma >= self.threshold
            idx = mask.nonzero().reshape(-1)
            if self.per_sample:
                newly = idx[hit.to(idx.device)]
            else:
                newly = idx if bool(hit.all()) and bool(mask.all()) else idx[:0]
            for j in newly.tolist():
                self.switch_steps[j] = ctx.step_index
            self._off[newly] = True
        return out

    def _repr_args(self):
        return {"guidance": self.inner, "threshold": self.threshold, "space": self.space,
                "per_sample": self.per_sample}
