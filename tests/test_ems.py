"""Tests of fewstep.samplers.ems (DPM-Solver-v3 empirical model statistics, arXiv 2310.13268)."""


import numpy as np
import pytest
import torch

from fewstep.samplers import EMS, DPMSolverPPScheduler, compute_ems
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture

CFG = dict(DPMSolverPPScheduler(beta_schedule="linear", prediction_type="epsilon").config)


def _single_gaussian(dim=4):
    mix = make_gaussian_mixture(dim=dim, num_components=1, num_classes=1, seed=3)
    sched = DPMSolverPPScheduler.from_config(CFG).schedule
    return mix, GaussianMixtureModel(mix, sched, "epsilon")


def test_single_gaussian_closed_forms():
    """For x0 ~ N(mu, diag v): eps = s (y - mu) / (v + s^2) with s = e^{-lambda}, so
    l* = sigma d eps/dx = 1 / (1 + v e^{2 lambda}) exactly (Hutchinson is exact on a diagonal
    Jacobian), f = -l* mu is deterministic (so s* = 0) and b* = E[f^(1)] = -(dl/dlambda) E[y]."""
    mix, model = _single_gaussian()
    x0 = mix.sample(128, generator=torch.Generator().manual_seed(1))
    ems = compute_ems(model, CFG, x0, num_grid=120, batch_size=64, dtype=torch.float64, progress=False,
                      smoothing_window=0)
    v, mu = mix.variances[0].numpy()[None], mix.means[0].numpy()[None]
    l_exact = 1.0 / (1.0 + v * np.exp(2 * ems.lambdas[:, None]))
    np.testing.assert_allclose(ems.l, l_exact, atol=1e-10)
    assert np.all(ems.s == 0)
    ld_exact = -2 * l_exact * (1 - l_exact)
    # b = -l_d E[y]; l_d is a finite difference of l on the grid, E[y] a sample mean
    scale = np.abs(ld_exact * mu).max()
    assert np.abs(ems.b - (-ld_exact * mu)).max() < 0.05 * scale


def test_hutchinson_matches_exact_jacobian_diagonal():
    """On a 3-component mixture the estimated l equals sigma * mean diag(d eps/dx) computed with
    the full Jacobian over the same noised samples, to Monte-Carlo accuracy of the probes."""
    mix = make_gaussian_mixture(dim=3, num_components=3, num_classes=1, seed=0)
    sched = DPMSolverPPScheduler.from_config(CFG).schedule
    model = GaussianMixtureModel(mix, sched, "epsilon")
    x0 = mix.sample(400, generator=torch.Generator().manual_seed(2))
    ems = compute_ems(model, CFG, x0, num_grid=4, batch_size=400, dtype=torch.float64, progress=False)
    j = 2
    t = float(ems.timesteps[j])
    a, s = float(sched.alpha(t)), float(sched.sigma(t))
    x = a * x0 + s * torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    diag = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda z: model(z[None], torch.tensor([t]))[0], row)
        diag.append(torch.diagonal(jac) * s)
    exact = torch.stack(diag).mean(0).numpy()
    np.testing.assert_allclose(ems.l[j], exact, atol=0.08 * np.abs(exact).max() + 1e-3)


def _mix_setup(dim=4, k=48):
    mix = make_gaussian_mixture(dim=dim, num_components=2, num_classes=1, seed=1)
    sched = DPMSolverPPScheduler.from_config(CFG).schedule
    x0 = mix.sample(k, generator=torch.Generator().manual_seed(4))
    return mix, GaussianMixtureModel(mix, sched, "epsilon"), x0


def test_save_load_round_trip(tmp_path):
    _, model, x0 = _mix_setup()
    ems = compute_ems(model, CFG, x0, num_grid=20, batch_size=16, dtype=torch.float64, progress=False,
                      model_id="gmm-test")
    path = ems.save(tmp_path / "e.safetensors")
    assert (tmp_path / "e.json").exists()
    back = EMS.load(path)
    for k in ("lambdas", "timesteps", "l", "s", "b", "L", "S", "B"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ems, k))
    np.testing.assert_array_equal(back.b_coefficient(2, 7), ems.b_coefficient(2, 7))
    assert back.metadata["model_id"] == "gmm-test" and back.metadata["num_samples"] == 48
    assert back.metadata["num_grid"] == 20 and back.metadata["schedule"]["beta_schedule"] == "linear"
    with pytest.raises(ValueError, match="path"):
        ems.save(tmp_path / "e.bin")


class _Interrupt(Exception):
    pass


def test_resume_after_interruption(tmp_path):
    _, model, x0 = _mix_setup()
    kw = dict(num_grid=20, batch_size=16, dtype=torch.float64, progress=False, pairs_per_call=64)
    full = compute_ems(model, CFG, x0, **kw)
    calls = {"n": 0}

    def flaky(x, t, c):
        calls["n"] += 1
        if calls["n"] > 25:
            raise _Interrupt
        return model(x, t, c)

    ckpt = tmp_path / "ems.ckpt"
    with pytest.raises(_Interrupt):
        compute_ems(flaky, CFG, x0, checkpoint=ckpt, **kw)
    assert ckpt.exists()
    resumed = compute_ems(model, CFG, x0, checkpoint=ckpt, **kw)
    for k in ("l", "s", "b"):
        np.testing.assert_allclose(getattr(resumed, k), getattr(full, k), rtol=1e-12, atol=1e-14)


def cli_mixture():
    """``module:callable`` model for ``fewstep ems --model test_ems:cli_mixture``."""
    _, model, x0 = _mix_setup()
    return model, CFG, x0


_CLI_ARGS = ["--model", "test_ems:cli_mixture", "--num-grid", "20", "--batch-size", "16", "--float64",
             "--device", "cpu", "--threads", "1", "--quiet"]


def _single_process_reference():
    _, model, x0 = _mix_setup()
    return compute_ems(model, CFG, x0, num_grid=20, batch_size=16, dtype=torch.float64, progress=False)


def test_cli_single_process_equals_api(tmp_path, capsys):
    from fewstep.apps.cli import main

    out = tmp_path / "cli.safetensors"
    assert main(["ems", *_CLI_ARGS, "--output", str(out)]) == 0
    assert '"world_size": 1' in capsys.readouterr().out
    got, want = EMS.load(out), _single_process_reference()
    for k in ("l", "s", "b"):
        np.testing.assert_array_equal(getattr(got, k), getattr(want, k))
    assert got.metadata["model_id"] == "test_ems:cli_mixture"


@pytest.mark.slow
def test_two_process_sharding_equals_single(tmp_path):
    """``accelerate launch`` with two CPU processes (a gloo group; fresh processes: forking a process
    that has already run torch can deadlock, so no ``debug_launcher``) shards the batches and
    reduces the sums to the single-process EMS; the launch exits cleanly (the group is torn down)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "sharded.safetensors"
    tests = os.path.dirname(__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "fewstep.apps.cli", "ems", *_CLI_ARGS, "--output", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"world_size": 2' in res.stdout
    sharded = EMS.load(out)
    assert sharded.metadata["world_size"] == 2
    single = _single_process_reference()
    for k in ("l", "s", "b"):
        # s = cov/var amplifies differences of summation order
        np.testing.assert_allclose(getattr(sharded, k), getattr(single, k), rtol=1e-7, atol=1e-10)


def test_bad_inputs():
    _, model, x0 = _mix_setup()
    with pytest.raises(ValueError, match="num_grid"):
        compute_ems(model, CFG, x0, num_grid=1, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        compute_ems(model, CFG, x0, num_samples=10_000, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        compute_ems(model, CFG, x0, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="t_range"):
        compute_ems(model, CFG, x0, t_range=(500, 100), progress=False)
    with pytest.raises(TypeError, match="data"):
        compute_ems(model, CFG, 3.0, progress=False)
    lam = np.linspace(-1, 1, 5)
    with pytest.raises(ValueError, match="leading dimension"):
        EMS(lam, lam, np.zeros((4, 2)), np.zeros((5, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="increasing"):
        EMS(lam[::-1], lam, np.zeros((5, 2)), np.zeros((5, 2)), np.zeros((5, 2)))


def _free_port() -> int:
    """A free localhost TCP port for the rendezvous (never collide with another launch)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_integrals_stay_finite_when_exp_L_overflows():
    """With l = 60 on lambda in [-10, 10], e^{L} reaches e^{1200} (float64 overflows at e^{709}).
    The first-order weight e^{-L(t)} int_s^t e^{L} dlambda = (1 - e^{-l h}) / l must still come out
    finite and right (paper Eq. 11 with s = b = 0), at both ends of the range."""
    lam = np.linspace(-10.0, 10.0, 20001)  # l * dlambda = 0.06: trapezoid error ~3e-4
    ones = np.ones((len(lam), 2))
    ems = EMS(lam, lam, 60.0 * ones, 0.0 * ones, 0.0 * ones)
    for ks, kt in ((0, 50), (19950, 20000), (10000, 10020)):
        h = lam[kt] - lam[ks]
        c0 = np.exp(ems.L[ks] - ems.L[kt]) * ems.exp_coefficient(ks, kt, 0)
        assert np.all(np.isfinite(c0))
        np.testing.assert_allclose(c0, (1 - np.exp(-60.0 * h)) / 60.0, rtol=1e-3)
