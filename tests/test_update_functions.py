"""The DPM-Solver++ and DPM-Solver-v3 update functions on their own (explicit points and histories,
no scheduler), against the exact solution of the probability-flow ODE for polynomial data
predictions: ``x_t = (sigma_t/sigma_s) x_s + sigma_t int e^lambda x0(lambda) dlambda`` (DPM-Solver++
paper Eq. 9), integrated in closed form."""

import math

import numpy as np
import pytest
import torch

from fewstep.samplers import EMS
from fewstep.samplers.dpm_v3_update import ClosedFormCoefficients, EMSCoefficients, V3Point, v3_update
from fewstep.samplers.dpmpp_update import (
    Point,
    first_order,
    multistep_update,
    second_order,
    third_order_multistep,
    third_order_singlestep,
)
from fewstep.schedule import NoiseSchedule

LS, LT, XS = 0.1, 0.9, 0.3


def vp_point(lam: float, cls=Point, **kw):
    sigma = 1.0 / math.sqrt(1.0 + math.exp(2.0 * lam))
    return cls(lam, sigma * math.exp(lam), sigma, **kw)


def exact(coeffs):
    """The ODE solution from (LS, XS) to LT for x0(lambda) = sum_k coeffs[k] (lambda - LS)^k:
    int_LS^LT e^lambda (lambda - LS)^k dlambda = e^LS * k! * (e^h sum_{j<=k} (-1)^(k-j) h^j / j! - (-1)^k)."""
    h, s, t = LT - LS, vp_point(LS), vp_point(LT)
    integral = sum(c * math.exp(LS) * math.factorial(k) * (
        math.exp(h) * sum((-1) ** (k - j) * h**j / math.factorial(j) for j in range(k + 1)) - (-1) ** k)
        for k, c in enumerate(coeffs))
    return t.sigma / s.sigma * XS + t.sigma * integral


def preds(coeffs, lams):
    return [(lam, torch.tensor(sum(c * (lam - LS) ** k for k, c in enumerate(coeffs)), dtype=torch.float64))
            for lam in lams]


X = torch.tensor(XS, dtype=torch.float64)
S, T = vp_point(LS), vp_point(LT)
QUAD = [0.7, -0.4, 1.3]


def test_dpmpp_orders_integrate_their_polynomials_exactly():
    assert first_order(X, S, T, preds(QUAD[:1], [LS])[0][1]).item() == pytest.approx(exact(QUAD[:1]), abs=1e-14)
    behind = preds(QUAD[:2], [LS, -0.3])
    assert second_order(X, S, T, behind, "heun").item() == pytest.approx(exact(QUAD[:2]), abs=1e-14)
    assert abs(second_order(X, S, T, behind, "midpoint").item() - exact(QUAD[:2])) > 1e-3  # midpoint is not Taylor
    hist = preds(QUAD, [LS, -0.2, -0.6])
    assert third_order_multistep(X, S, T, hist, d2_weight=2.0).item() == pytest.approx(exact(QUAD), abs=1e-13)
    assert abs(third_order_multistep(X, S, T, hist).item() - exact(QUAD)) > 1e-3  # the official halved D2
    ahead = preds(QUAD, [LS, LS + (LT - LS) / 3, LS + 2 * (LT - LS) / 3])
    assert third_order_singlestep(X, S, T, ahead, "heun").item() == pytest.approx(exact(QUAD), abs=1e-13)
    for order in (1, 2, 3):  # the dispatcher picks the same functions
        assert torch.equal(multistep_update(X, S, T, hist, order, "heun", None, 2.0),
                           [first_order(X, S, T, hist[0][1]), second_order(X, S, T, hist, "heun"),
                            third_order_multistep(X, S, T, hist, d2_weight=2.0)][order - 1])


def v3_points(coeffs, lams):
    """V3Points with f = -x0 (degenerate statistics, l = 1) at ``lams``, newest first."""
    return [vp_point(lam, V3Point, f=-p) for lam, (_, p) in zip(lams, preds(coeffs, lams))]


def test_v3_closed_form_update_is_exact_and_equals_dpmpp_heun():
    pts = v3_points(QUAD, [LS, -0.2, -0.6])
    target = vp_point(LT, V3Point)
    src = ClosedFormCoefficients()
    assert v3_update(X, pts, target, 3, src).item() == pytest.approx(exact(QUAD), abs=1e-13)
    lin = v3_points([0.7, -0.4, 0.9], [LS, -0.3])
    dpmpp = second_order(X, S, T, [(p.lam, -p.f) for p in lin], "heun")
    assert v3_update(X, lin, target, 2, src).item() == pytest.approx(dpmpp.item(), abs=1e-13)


def test_v3_ems_coefficients_of_degenerate_statistics_match_the_closed_form():
    """EMSCoefficients integrate l = 1, s = 0, b = 0 by the trapezoid rule: equal to the closed form
    up to the rule's O(dlambda^2) error, with per-dimension tensors of the EMS shape."""
    sched = NoiseSchedule.from_config(dict(beta_schedule="linear"))
    ems = EMS.degenerated(sched, (2,), num_grid=2000)
    ks, k1, kt = 1500, 1450, 1700
    ts = ems.timesteps
    lam = ems.lambdas
    make = lambda k, m: V3Point(float(lam[k]), float(sched.alpha(ts[k])), float(sched.sigma(ts[k])), k=k,  # noqa: E731
                                f=torch.full((4, 2), -m, dtype=torch.float64))
    pts = [make(ks, 0.7), make(k1, 0.5)]
    target = make(kt, 0.0)
    x = torch.full((4, 2), XS, dtype=torch.float64)
    src = EMSCoefficients(ems)
    src.check_shape((2,))
    with pytest.raises(ValueError, match="shape"):
        src.check_shape((3,))
    got = v3_update(x, pts, target, 2, src)
    want = v3_update(x, pts, target, 2, ClosedFormCoefficients())
    assert got.shape == (4, 2)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-5)  # dlambda ~ 5e-3: error ~ dlambda^2
    assert not torch.equal(got, want)  # really the EMS integrals, not the closed form
