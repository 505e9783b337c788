"""Guidance benchmarks (issue 6): AG / LinearAG savings, APG vs CFG at high scales, CFG++ vs CFG,
DDIM inversion round trip, FD-digits vs strength plot.

    python benchmarks/guidance.py [--n 500] [--steps 20]

Prints markdown tables; writes benchmarks/results/guidance.md and guidance_fd_vs_strength.png.
Mixture rows use the exact Gaussian mixture (fewstep.testing); digits rows the bundled teacher.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewstep.guidance import APG, CFG, AdaptiveGuidance, CFGPlusPlus, LinearAG, cfg_combine, fit_linear_ag
from fewstep.sample import sample
from fewstep.samplers import DPMSolverPPScheduler
from fewstep.schedule import to_x0_eps

RESULTS = Path(__file__).parent / "results"
LINES: list[str] = []


def emit(s=""):
    print(s, flush=True)
    LINES.append(s)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "guidance.md").write_text("\n".join(LINES) + "\n")  # partial results survive a timeout


def rmse(a, b):
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def mixture_rows(steps):
    from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture

    torch.manual_seed(0)  # make_gaussian_mixture draws its weights from the global RNG
    mix = make_gaussian_mixture(dim=16, num_components=6, num_classes=3)
    sch = DPMSolverPPScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                               prediction_type="v_prediction")
    model = GaussianMixtureModel(mix, sch.schedule, "v_prediction")
    n = 512
    noise = torch.randn(n, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c, u = torch.arange(n) % 3, torch.full((n,), -1)
    ref, nfe_ref = sample(model, noise, sch, steps, guidance=3.0, cond=c, uncond=u)
    emit(f"### Exact Gaussian mixture (16-D, 3 classes), DPM-Solver++ 2M, {steps} steps, CFG w = 3, n = {n}")
    emit()
    emit("| method | passes | saved (passes) | per-sample evals | saved (per-sample) | RMSE vs CFG |")
    emit("|---|---|---|---|---|---|")
    emit(f"| CFG | {nfe_ref} | 0% | {nfe_ref:.1f} | 0% | 0 |")
    fit = fit_linear_ag(model, sch, torch.randn(256, 16, generator=torch.Generator().manual_seed(1),
                                                 dtype=torch.float64), c[:256], u[:256], steps, 3.0)
    rows = [(f"AG x0 thr {th} {'per-sample' if ps else 'batch'}", AdaptiveGuidance(3.0, threshold=th, per_sample=ps))
            for th in (0.9, 0.99) for ps in (True, False)]
    rows.append(("LinearAG (start N/2, fitted on other seeds)", LinearAG(fit)))
    for name, g in rows:
        x, nfe = sample(model, noise, sch, steps, guidance=g, cond=c, uncond=u)
        emit(f"| {name} | {nfe} | {1 - nfe / nfe_ref:.0%} | {g.sample_evals:.1f} | {1 - g.sample_evals / nfe_ref:.0%} "
             f"| {rmse(x, ref):.4f} |")
    emit()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    emit("## Guidance benchmarks")
    emit()
    mixture_rows(args.steps)

    from fewstep.eval.fd_digits import fd_digits
    from fewstep.models import load_digits_pipeline, load_digits_split
    from fewstep.models.adapters import denoiser
    from fewstep.models.pipeline import NULL_CLASS

    pipe = load_digits_pipeline()
    model = denoiser(pipe.unet.eval(), null_class=NULL_CLASS)
    n, steps = args.n, args.steps

    def sched(order=2):
        return DPMSolverPPScheduler.from_config(pipe.scheduler.config, solver_order=order)

    labels = torch.arange(n) % 10
    null = model.null(labels)

    def noise(seed):
        return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))

    def metrics(x):
        xc = x.clamp(-1, 1)
        r = fd_digits(((xc + 1) / 2), labels=labels)
        sat = float((xc.abs() >= 0.98).float().mean())
        return r["fd"], r["accuracy"], sat, float(((xc + 1) / 2).mean())

    emit(f"### Digits teacher (8x8, v-prediction), {steps} steps, n = {n} (labels 0-9 balanced)")
    emit()
    # ---------------- noise level of FD: CFG w=3 with two seeds
    cfg3, nfe_cfg = sample(model, noise(0), sched(), steps, guidance=3.0, cond=labels, uncond=null)
    cfg3b, _ = sample(model, noise(1), sched(), steps, guidance=3.0, cond=labels, uncond=null)
    fd_a, acc_a, _, _ = metrics(cfg3)
    fd_b, _, _, _ = metrics(cfg3b)
    emit(f"CFG w = 3 run-to-run FD noise (seeds 0 vs 1): {fd_a:.3f} vs {fd_b:.3f} (|diff| {abs(fd_a - fd_b):.3f})")
    emit()
    # ---------------- AG / LinearAG
    emit("#### Adaptive Guidance / LinearAG vs CFG (w = 3, DPM-Solver++ 2M)")
    emit()
    emit("| method | passes | saved (passes) | saved (per-sample) | RMSE vs CFG | FD-digits | accuracy |")
    emit("|---|---|---|---|---|---|---|")
    emit(f"| CFG | {nfe_cfg} | 0% | 0% | 0 | {fd_a:.3f} | {acc_a:.3f} |")
    lag_path = Path(__file__).resolve().parents[1] / "configs" / "linear_ag_digits.json"
    ag_rows = [(f"AG x0 thr {th} {'per-sample' if ps else 'batch'}", AdaptiveGuidance(3.0, threshold=th, per_sample=ps))
               for th in (0.99, 0.95) for ps in (True, False)]
    if lag_path.exists():
        ag_rows.append(("LinearAG (configs/linear_ag_digits.json)", LinearAG(lag_path)))
    for name, g in ag_rows:
        x, nfe = sample(model, noise(0), sched(), steps, guidance=g, cond=labels, uncond=null)
        fd, acc, _, _ = metrics(x)
        emit(f"| {name} | {nfe} | {1 - nfe / nfe_cfg:.0%} | {1 - g.sample_evals / nfe_cfg:.0%} | {rmse(x, cfg3):.4f} "
             f"| {fd:.3f} | {acc:.3f} |")
    emit()
    # ---------------- APG vs CFG at high scales
    emit("#### APG vs CFG at high scales (DPM-Solver++ 2M; APG: x0 space, eta 0, momentum -0.5, r = 2)")
    emit()
    emit("| w | method | FD-digits | accuracy | saturated px | mean intensity |")
    emit("|---|---|---|---|---|---|")
    curves = {"CFG": [], "APG": [], "CFG++ (DDIM)": [], "CFG (DDIM)": []}
    for w in (3.0, 5.0, 10.0, 15.0):
        for name, g in (("CFG", CFG(w)), ("APG", APG(w, eta=0.0, momentum=-0.5, norm_threshold=2.0))):
            x, _ = sample(model, noise(0), sched(), steps, guidance=g, cond=labels, uncond=null)
            fd, acc, sat, mi = metrics(x)
            curves[name].append((w, fd))
            emit(f"| {w:g} | {name} | {fd:.3f} | {acc:.3f} | {sat:.3f} | {mi:.3f} |")
    emit()
    # ---------------- CFG++ vs CFG (DDIM)
    emit("#### CFG++ vs CFG with DDIM (DPM-Solver++ order 1); matched strength w = 1 + 11.5 lambda")
    emit()
    emit("| lambda | w | CFG++ FD | CFG++ acc | CFG FD | CFG acc |")
    emit("|---|---|---|---|---|---|")
    for lam in (0.2, 0.4, 0.8):
        w = 1 + 11.5 * lam
        xp, _ = sample(model, noise(0), sched(1), steps, guidance=CFGPlusPlus(lam), cond=labels, uncond=null)
        xc, _ = sample(model, noise(0), sched(1), steps, guidance=CFG(w), cond=labels, uncond=null)
        fp, ap_, _, _ = metrics(xp)
        fc, ac, _, _ = metrics(xc)
        curves["CFG++ (DDIM)"].append((w, fp))
        curves["CFG (DDIM)"].append((w, fc))
        emit(f"| {lam:g} | {w:.2f} | {fp:.3f} | {ap_:.3f} | {fc:.3f} | {ac:.3f} |")
    emit()
    # ---------------- DDIM inversion round trip
    emit("#### DDIM inversion round trip (real test digits, invert then regenerate, RMSE in [-1, 1] pixels)")
    emit()
    real, real_y = load_digits_split("test")
    real, real_y = real[:100].float(), torch.as_tensor(real_y[:100]).long()
    s = sched(1)
    s.set_timesteps(steps)
    ts = s.timesteps
    al = [s.alpha_sigma(i) for i in range(len(ts) + 1)]
    pt = s.config.prediction_type
    nul = model.null(real_y)

    def eps_pair(x, i):
        a, sg = al[i]
        _, ec = to_x0_eps(model(x, ts[i], real_y), x, a, sg, pt)
        _, eu = to_x0_eps(model(x, ts[i], nul), x, a, sg, pt)
        return ec, eu

    def roundtrip(mode, k):
        # invert: from the clean digit at the last grid point (sigma ~ 0 replaced by the smallest level) upward
        x = al[len(ts) - 1][0] * real  # start at the least-noisy evaluation point with x0 = real, eps = 0
        for i in range(len(ts) - 1, 0, -1):  # point i -> i - 1 (more noise)
            a, sg = al[i]
            a_n, s_n = al[i - 1]
            ec, eu = eps_pair(x, i)
            eg = cfg_combine(ec, eu, k)
            if mode == "cfg":
                x0 = (x - sg * eg) / a
                x = a_n * x0 + s_n * eg
            else:  # CFG++ inversion (Chung et al., App.): x0 from eps_u, renoise with eps_lambda
                x0 = (x - sg * eu) / a
                x = a_n * x0 + s_n * eg
        for i in range(0, len(ts) - 1):  # regenerate back to point len(ts) - 1
            a, sg = al[i]
            a_n, s_n = al[i + 1]
            ec, eu = eps_pair(x, i)
            eg = cfg_combine(ec, eu, k)
            x0 = (x - sg * eg) / a
            x = a_n * x0 + s_n * (eg if mode == "cfg" else eu)
        return rmse(x / al[len(ts) - 1][0], real)

    emit("| lambda | w = 1 + 11.5 lambda | CFG++ RMSE | CFG RMSE |")
    emit("|---|---|---|---|")
    for lam in (0.2, 0.4):
        w = 1 + 11.5 * lam
        emit(f"| {lam:g} | {w:.2f} | {roundtrip('cfgpp', lam):.4f} | {roundtrip('cfg', w):.4f} |")
    emit()
    # ---------------- plot
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("guidance strength w (CFG++: w = 1 + 11.5 lambda)")
        ax.set_ylabel("FD-digits")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"digits teacher, {steps} steps, n = {n}")
        fig.tight_layout()
        fig.savefig(RESULTS / "guidance_fd_vs_strength.png", dpi=120)
        emit("plot: benchmarks/results/guidance_fd_vs_strength.png")
    except ImportError:
        emit("(matplotlib not installed: no plot)")
    emit(f"runtime {time.time() - t0:.0f} s")
    (RESULTS / "guidance.md").write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
