"""Schedule kinds as classes, the legacy constructor, noise_schedule_of, shipped_file and the
deprecation shims of names that moved in the restructure (issue 9)."""

import importlib
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from fewstep.schedule import (
    DiscreteVPSchedule,
    EDMSchedule,
    FlowMatchingSchedule,
    NoiseSchedule,
    make_grid,
    noise_schedule_of,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_from_config_and_the_legacy_constructor_build_the_kind_classes():
    assert type(NoiseSchedule.from_config(SD)) is DiscreteVPSchedule
    assert type(NoiseSchedule.from_config(dict(use_flow_sigmas=True, flow_shift=3.0))) is FlowMatchingSchedule
    assert type(NoiseSchedule.from_config(dict(sigma_schedule="karras", sigma_data=0.5))) is EDMSchedule
    ac = np.linspace(0.999, 0.01, 50)
    legacy = NoiseSchedule(kind="discrete", alphas_cumprod=ac)
    assert type(legacy) is DiscreteVPSchedule and legacy.num_train_timesteps == 50 and legacy.sigma_data is None
    np.testing.assert_allclose(legacy.alpha(np.arange(50.0)) ** 2, ac, rtol=1e-14)
    edm = NoiseSchedule("edm", sigma_min=0.01)  # positional kind, as the dataclass took it
    assert isinstance(edm, NoiseSchedule) and (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.01, 80.0, 0.5)
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule(kind="ve")
    with pytest.raises(ValueError, match="shift=3.0 does not apply"):
        NoiseSchedule(kind="edm", shift=3.0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule(kind="discrete")
    with pytest.raises(AttributeError):
        legacy.kind = "flow"  # a read-only name


@pytest.mark.parametrize("schedule", [
    NoiseSchedule.from_config(SD),
    NoiseSchedule.from_config(dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)),
    FlowMatchingSchedule(shift=3.0),
    EDMSchedule(sigma_min=0.002, sigma_max=80.0),
], ids=["vp", "vp-clipped", "flow", "edm"])
def test_every_kind_keeps_its_own_maps_consistent(schedule):
    """lambda = log(alpha/sigma), t(lambda(t)) = t, model_time inverts, and d log(alpha)/d lambda
    (the EMS drift term) agrees with a central difference of log alpha along lambda."""
    t = np.linspace(schedule.t_min, schedule.t_max, 41)[1:-1]
    a, s, lam = schedule.alpha(t), schedule.sigma(t), schedule.lambda_(t)
    np.testing.assert_allclose(lam, np.log(a) - np.log(s), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(schedule.t_of_lambda(lam), t, rtol=1e-8, atol=1e-6)
    np.testing.assert_allclose(schedule.t_of_model_time(schedule.model_time(t)), t, rtol=1e-12)
    with np.errstate(divide="ignore"):  # flow: lambda(t_max) = -inf (sigma = 1)
        (lo, hi), lam_max = schedule.lambda_range, float(schedule.lambda_(schedule.t_max))
    assert lo == pytest.approx(lam_max) and lo < hi
    d = 1e-5
    t_p, t_m = schedule.t_of_lambda(lam + d), schedule.t_of_lambda(lam - d)
    numeric = (np.log(schedule.alpha(t_p)) - np.log(schedule.alpha(t_m))) / (2 * d)
    np.testing.assert_allclose(schedule.dlogalpha_dlambda(a, s), numeric, rtol=1e-4, atol=1e-7)


def test_edm_kind_carries_its_preconditioning():
    edm = EDMSchedule(sigma_data=0.7)
    sigma = 3.0
    assert edm.model_time(sigma) == pytest.approx(math.log(sigma) / 4)  # Karras et al. 2022, Table 1
    assert edm.c_in(1.0, sigma) == pytest.approx(1 / math.sqrt(sigma**2 + 0.7**2))
    assert edm.init_noise_sigma == 80.0 and DiscreteVPSchedule(np.linspace(0.99, 0.1, 10)).init_noise_sigma == 1.0
    with pytest.raises(ValueError, match="prediction_type"):
        edm.check_prediction_type("sample")
    with pytest.raises(ValueError, match="dynamic shifting"):
        edm.set_dynamic_shift(0.5)
    with pytest.raises(ValueError, match="time_power"):
        make_grid(edm, 5, "time_power")


@pytest.mark.parametrize("make, kind", [
    (lambda: DDIMScheduler(**SD), "discrete"),
    (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "flow"),
    (lambda: EDMEulerScheduler(sigma_data=0.7), "edm"),
])
def test_noise_schedule_of_diffusers_schedulers_writes_nothing_and_follows_the_config(make, kind):
    sched = make()
    before = dict(vars(sched))
    ns = noise_schedule_of(sched)
    assert ns.kind == kind and noise_schedule_of(sched) is ns  # cached
    assert vars(sched).keys() == before.keys()  # nothing written onto the foreign object
    if kind == "discrete":
        torch.testing.assert_close(torch.as_tensor(ns.alpha(np.arange(1000.0)) ** 2), sched.alphas_cumprod.double(),
                                   rtol=1e-6, atol=1e-9)
        sched.register_to_config(beta_schedule="linear")  # a new config object: recomputed
        ns2 = noise_schedule_of(sched)
        assert ns2 is not ns and ns2.alphas_cumprod[-1] != ns.alphas_cumprod[-1]
    elif kind == "edm":
        assert ns.sigma_data == 0.7
    else:
        assert ns.shift == 3.0


def test_noise_schedule_of_fewstep_scheduler_is_its_schedule():
    from fewstep.samplers import DPMSolverPPScheduler

    s = DPMSolverPPScheduler(**SD)
    assert noise_schedule_of(s) is s.schedule


def test_shipped_file_and_shipped_ems_names():
    from fewstep.models import shipped_file
    from fewstep.samplers.ems import resolve_ems_path

    p = shipped_file("digits_ems.safetensors")
    assert p.is_file() and resolve_ems_path("digits") == p
    for bad in ("../schedule.py", "weights/digits_ems.json", "", None):
        with pytest.raises(ValueError, match="plain file name"):
            shipped_file(bad)
    with pytest.raises(FileNotFoundError, match="no_such_file.bin"):
        shipped_file("no_such_file.bin")


MOVED = [
    ("fewstep.samplers.dpm_v3", "_psi", "fewstep.samplers.dpm_v3_update", "psi"),
    ("fewstep.samplers.dpm_v3", "derivative_estimates", "fewstep.samplers.dpm_v3_update", "derivative_estimates"),
    ("fewstep.samplers.ems", "compute_ems", "fewstep.samplers", "compute_ems"),
    ("fewstep.samplers.ems", "jvp", "fewstep.samplers.ems_estimate", "jvp"),
    ("fewstep.samplers.ems", "smooth_derivative", "fewstep.samplers.ems_estimate", "smooth_derivative"),
]


@pytest.mark.parametrize("old_mod, old, new_mod, new", MOVED)
def test_moved_names_still_import_with_a_deprecation_warning(old_mod, old, new_mod, new):
    with pytest.warns(DeprecationWarning, match=new):
        got = getattr(importlib.import_module(old_mod), old)
    assert got is getattr(importlib.import_module(new_mod), new)
    with pytest.raises(AttributeError):
        importlib.import_module(old_mod).no_such_name  # noqa: B018


def test_old_update_signatures_warn_and_match_the_point_api():
    from fewstep.samplers.dpmpp_update import Point, first_order, second_order, third_order_singlestep
    from fewstep.schedule import PREDICTION_TYPES

    g = torch.Generator().manual_seed(0)
    x, m0, m1, m2 = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    s, t = Point(0.1, 0.7, 0.66), Point(0.9, 0.9, 0.35)
    with pytest.warns(DeprecationWarning, match="dpmpp_update"):
        from fewstep.samplers.dpmpp import first_order_update, second_order_update, third_order_singlestep_update
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(first_order_update(x, m0, s.lam, t.lam, t.alpha, t.sigma, s.sigma),
                           first_order(x, s, t, m0))
        assert torch.equal(second_order_update(x, m0, s.lam, m1, -0.3, t.lam, t.alpha, t.sigma, s.sigma, "heun"),
                           second_order(x, s, t, [(s.lam, m0), (-0.3, m1)], "heun"))
        assert torch.equal(
            third_order_singlestep_update(x, m0, s.lam, m1, 0.4, m2, 0.6, t.lam, t.alpha, t.sigma, s.sigma, "heun"),
            third_order_singlestep(x, s, t, [(s.lam, m0), (0.4, m1), (0.6, m2)], "heun"))
    with pytest.warns(DeprecationWarning):
        from fewstep.samplers.ems import dlogalpha_dlambda
    vp = NoiseSchedule.from_config(SD)
    assert dlogalpha_dlambda(vp, np.array([0.8]), np.array([0.6]))[0] == pytest.approx(0.36)
    assert "flow_prediction" in PREDICTION_TYPES
