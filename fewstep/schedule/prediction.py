"""Prediction conversion: raw model outputs <-> ``(x0, eps)``, and EDM's preconditioning.

The only place fewstep converts between parameterisations (epsilon, v, sample, flow velocity, EDM's
``F``). Conventions: ``x = alpha x0 + sigma eps``; coefficients in float64, tensors combined in their
own dtype. See docs/samplers-reference.md ("Noise schedule kinds").
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._arrays import as64, check_choice, lib

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


# ----------------------------------------------------------------------------------------------
def _bcast(v, ref: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=ref.dtype, device=ref.device)
    while v.ndim < ref.ndim:
        v = v.unsqueeze(-1)
    return v


def edm_c_noise(sigma):
    """EDM's noise conditioning ``c_noise(sigma) = log(sigma) / 4`` (Karras et al. 2022, Table 1,
    EDM column): the time value an EDM-preconditioned network is called with. ``sigma`` in VE
    units (``x = x0 + sigma eps``); float, numpy or torch in, float64 out."""
    sigma = as64(sigma)
    return 0.25 * lib(sigma).log(sigma)


def edm_preconditioning(sigma, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
    """The EDM preconditioning ``(c_skip, c_out, c_in, c_noise)`` of Karras et al. 2022 (Eq. 7 and
    Table 1, EDM column) at VE noise level ``sigma`` (``x = x0 + sigma eps``)::

        c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out   = +- sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
        c_noise = log(sigma) / 4

    The network ``F`` is called as ``F(c_in x, c_noise)`` and the denoiser (data prediction) is
    ``D(x) = c_skip x + c_out F``. ``prediction_type`` names the sign of ``c_out`` with diffusers'
    EDM-scheduler vocabulary: ``"epsilon"`` is Table 1's ``+`` (``F`` is EDM's ``F_theta``, *not* a
    noise prediction), ``"v_prediction"`` the ``-`` sign, which makes ``F`` the v-prediction
    ``v = a eps - b y0`` of Salimans & Ho 2022 for the VP process ``c_in x = a y0 + b eps`` of the
    normalised data ``y0 = x0 / sigma_data`` (``a = sigma_data c_in``, ``b = sigma c_in``,
    ``a^2 + b^2 = 1``; CosXL). ``c_noise`` is ``-inf`` at ``sigma = 0``, where the network is never
    called. Float, numpy or torch in; float64 out.
    """
    check_choice("prediction_type", prediction_type, EDM_PREDICTION_TYPES)
    sigma = as64(sigma)
    xp = lib(sigma)
    sd = float(sigma_data)
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sigma_data={sigma_data!r} must be a finite number > 0")
    norm = xp.sqrt(sigma * sigma + sd * sd)
    c_skip = sd * sd / (norm * norm)
    c_out = sigma * sd / norm
    if prediction_type == "v_prediction":
        c_out = -c_out
    with np.errstate(divide="ignore"):
        c_noise = edm_c_noise(sigma)
    return c_skip, c_out, 1.0 / norm, c_noise


def to_x0_eps(output: torch.Tensor, sample: torch.Tensor, alpha, sigma, prediction_type: str,
              sigma_data: float | None = None):
    """Convert a raw model output to ``(x0, eps)`` given ``x = alpha x0 + sigma eps``.

    ``prediction_type``:

    * ``epsilon``: output is ``eps`` (Ho et al. 2020).
    * ``v_prediction``: output is ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, Eq. 6 for VP;
      then ``x0 = alpha x - sigma v``, ``eps = sigma x + alpha v``).
    * ``sample``: output is ``x0``.
    * ``flow_prediction``: output is the velocity ``u = eps - x0`` (rectified flow, Liu et al.
      2022; SD3). For ``alpha + sigma = 1``: ``x0 = x - sigma u``; in general
      ``x0 = (x - sigma u) / (alpha + sigma)``.

    ``alpha``/``sigma`` are scalars or per-sample tensors (broadcast over trailing dims). At
    ``sigma = 0`` an ``eps`` is not defined by ``x`` and is returned as zeros for ``sample``.

    ``sigma_data`` (EDM models): ``output`` is the raw output ``F`` of an EDM-preconditioned
    network and ``x0 = D(x) = c_skip y + c_out F`` (Karras et al. 2022, Eq. 7) with the Table 1
    coefficients of :func:`edm_preconditioning` at the VE level ``sigma / alpha`` and
    ``y = x / alpha`` (``alpha = 1`` on EDM schedules); ``prediction_type`` is ``"epsilon"`` or
    ``"v_prediction"`` with the meaning given there. ``sample`` is the unscaled state ``x``, not
    the network input ``c_in x``.
    """
    if sigma_data is not None:
        return _edm_to_x0_eps(output, sample, alpha, sigma, prediction_type, sigma_data)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    a, s = _bcast(alpha, output), _bcast(sigma, output)
    if prediction_type == "epsilon":
        eps = output
        x0 = (sample - s * eps) / a
    elif prediction_type == "v_prediction":
        # for VP alpha^2 + sigma^2 = 1; divide by it for schedules where it is not
        norm = a * a + s * s
        x0 = (a * sample - s * output) / norm
        eps = (s * sample + a * output) / norm
    elif prediction_type == "sample":
        x0 = output
        eps = torch.where(s > 0, (sample - a * x0) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x0))
    else:
        x0 = (sample - s * output) / (a + s)
        eps = output + x0
    return x0, eps


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction_type: str,
                sigma_data: float | None = None) -> torch.Tensor:
    """Inverse of :func:`to_x0_eps`: the raw output of type ``prediction_type`` whose ``(x0, eps)``
    are the given ones (used to hand a guided prediction to a scheduler or pipeline).

    With ``sigma_data`` (EDM): the network output ``F = (x0 - c_skip y) / c_out`` with
    ``y = x0 + (sigma/alpha) eps``, i.e. ``F = +-(s x0 / sigma_data - sigma_data eps) /
    sqrt(s^2 + sigma_data^2)`` with ``s = sigma/alpha`` (finite at ``s = 0``)."""
    if sigma_data is not None:
        check_choice("prediction_type", prediction_type, EDM_PREDICTION_TYPES)
        s_ve = _ve_sigma(sigma, alpha)
        sd = float(sigma_data)
        sign = 1.0 if prediction_type == "epsilon" else -1.0
        s_t = _bcast(s_ve, x0)
        return sign * (s_t * x0 / sd - sd * eps) / _bcast(lib(s_ve).sqrt(s_ve * s_ve + sd * sd), x0)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    a, s = _bcast(alpha, x0), _bcast(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    return eps - x0


def _ve_sigma(sigma, alpha):
    """``sigma / alpha`` in float64 (torch when either is a tensor)."""
    if isinstance(sigma, torch.Tensor) or isinstance(alpha, torch.Tensor):
        dev = sigma.device if isinstance(sigma, torch.Tensor) else alpha.device
        return (torch.as_tensor(sigma, dtype=torch.float64, device=dev)
                / torch.as_tensor(alpha, dtype=torch.float64, device=dev))
    return as64(sigma) / as64(alpha)


def _edm_to_x0_eps(output, sample, alpha, sigma, prediction_type, sigma_data):
    """:func:`to_x0_eps` for EDM-preconditioned outputs (see there). Coefficients in float64, the
    combination ``c_skip * y + c_out * F`` in the tensors' dtype (diffusers' order of operations)."""
    s_ve = _ve_sigma(sigma, alpha)
    c_skip, c_out, _, _ = edm_preconditioning(s_ve, sigma_data, prediction_type)
    a, s = _bcast(alpha, output), _bcast(sigma, output)
    y = sample / a
    x0 = _bcast(c_skip, output) * y + _bcast(c_out, output) * output
    eps = torch.where(s > 0, (sample - a * x0) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x0))
    return x0, eps
