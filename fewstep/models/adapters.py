"""The adapter from a diffusers UNet to fewstep's model call convention ``model(x, t, c) -> raw output``.

:func:`denoiser` wraps a class-conditional (or unconditional) ``UNet2DModel``-style network
``net(x, t, class_labels=c).sample`` so that :func:`fewstep.sample`, :func:`fewstep.samplers.compute_ems`,
:func:`fewstep.guidance.fit_linear_ag` and the digits pipeline all call it the same way. The null
(unconditional) class is named once, here, by the caller: ``denoiser(unet, null_class=10)``;
``den.null(labels)`` is the matching unconditional condition.

:meth:`Denoiser.evaluate_pair` runs the conditional and unconditional branches in one batched
network call (``torch.cat``), as diffusers pipelines do; :meth:`fewstep.guidance.Guidance.predict`
uses it whenever a step needs both branches for the whole batch. Batched and separate calls
agree only up to float round-off of a different batch size, so every fewstep sampling path on
the same network batches alike.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch


class Denoiser:
    """``model(x, t, c)`` over a network called as ``net(x, t, class_labels=c).sample``.

    ``x``: the scheduler's model input (cast to the network's dtype); ``t``: the scheduler's
    timestep (a number, a 0-d tensor or one per row), expanded to the batch; ``c``: an int (the
    same class for every row), a tensor of labels, or None for unconditional networks.
    """

    def __init__(self, net, null_class: int | None = None):
        if null_class is not None and (isinstance(null_class, bool) or not isinstance(null_class, numbers.Integral)):
            raise ValueError(f"null_class must be an int or None, got {null_class!r}")
        self.net = net
        self.null_class = None if null_class is None else int(null_class)

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    def _labels(self, c: Any, x: torch.Tensor):
        if c is None or isinstance(c, torch.Tensor):
            return c
        if isinstance(c, numbers.Integral) and not isinstance(c, bool):
            return torch.full((x.shape[0],), int(c), device=x.device, dtype=torch.long)
        raise TypeError(f"condition must be an int, a tensor of class labels or None, got {type(c).__name__}")

    def _net_kwargs(self, x: torch.Tensor) -> dict:
        """Extra keywords of one network call on the batch ``x`` (none here; a subclass may add
        conditioning such as a guidance embedding)."""
        return {}

    def __call__(self, x: torch.Tensor, t, c: Any = None) -> torch.Tensor:
        t_in = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return self.net(x.to(self.dtype), t_in, class_labels=self._labels(c, x), **self._net_kwargs(x)).sample

    def null(self, cond: torch.Tensor | int | None = None):
        """The unconditional condition: the null class for every row of ``cond`` (a tensor of
        labels), or the bare null class (an int) when ``cond`` is not a tensor."""
        if self.null_class is None:
            raise ValueError("this denoiser has no null class: pass null_class= to denoiser()")
        if isinstance(cond, torch.Tensor):
            return torch.full_like(cond, self.null_class)
        return self.null_class

    def evaluate_pair(self, x: torch.Tensor, t, cond: Any, uncond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(model(x, t, cond), model(x, t, uncond))`` from one network call on the doubled batch
        (conditional rows first). Falls back to two calls when the conditions cannot be stacked
        (e.g. None on one side)."""
        b = x.shape[0]
        c, u = self._labels(cond, x), self._labels(uncond, x)
        if not (isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor)):
            return self(x, t, cond), self(x, t, uncond)
        c, u = c.reshape(-1), u.reshape(-1)
        if c.numel() not in (1, b) or u.numel() not in (1, b):
            return self(x, t, cond), self(x, t, uncond)
        labels = torch.cat([c.expand(b), u.expand(b)])
        t_in = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        xx = torch.cat([x, x])
        out = self.net(xx.to(self.dtype), torch.cat([t_in, t_in]), class_labels=labels, **self._net_kwargs(xx)).sample
        out_c, out_u = out.chunk(2)
        return out_c, out_u


def denoiser(net, null_class: int | None = None) -> Denoiser:
    """Wrap ``net`` (``net(x, t, class_labels=c).sample``, e.g. a diffusers ``UNet2DModel``) as
    ``model(x, t, c)``; ``null_class`` is the label of the unconditional branch (classifier-free
    guidance training's dropped label), None for networks without one."""
    return Denoiser(net, null_class)
