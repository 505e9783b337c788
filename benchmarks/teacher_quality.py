"""Quality of the bundled digits teacher: FD-digits and class accuracy per sampler setting.

Settings: 1000-step ancestral DDPM (the reference), 50-step deterministic DDIM, and few-step
deterministic solvers (diffusers DPMSolverMultistep = DPM-Solver++(2M), DDIM), at guidance 1 and
2 (diffusers convention ``uncond + w (cond - uncond)``). ``N`` samples balanced over the ten
classes, fixed seed, the same initial noise for every setting. FD-digits (``fewstep.eval.fd_digits``)
is measured against the 360 held-out test digits; the floor is the FD of ``N`` real training
digits (balanced, seeded) against the same test digits.

Quality bar (issue 3): FD(DDIM-50) <= 1.5 x FD(ancestral-1000) at the same guidance, and class
accuracy > 95% at guidance 2.

Usage::

    python benchmarks/teacher_quality.py            # N=500, about 10 minutes on one CPU thread
    python benchmarks/teacher_quality.py --n 1000 --ancestral-guidance 1 2   # longer

Prints a table and writes ``benchmarks/results/teacher_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "teacher_quality.json"


def _settings(ancestral_guidance: list[float]) -> list[tuple[str, str, int, float]]:
    rows = [("ancestral DDPM", "DDPMScheduler", 1000, g) for g in ancestral_guidance]
    for g in (1.0, 2.0):
        rows += [
            ("DDIM", "DDIMScheduler", 50, g),
            ("DDIM", "DDIMScheduler", 10, g),
            ("DPM-Solver++(2M)", "DPMSolverMultistepScheduler", 10, g),
            ("DPM-Solver++(2M)", "DPMSolverMultistepScheduler", 8, g),
            ("DPM-Solver++(2M)", "DPMSolverMultistepScheduler", 5, g),
        ]
    return rows


def _generate(pipe, labels: torch.Tensor, steps: int, guidance: float, seed: int,
              chunk: int) -> tuple[torch.Tensor, int]:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), 1, 8, 8, generator=gen)
    out, nfe = [], 0
    for i in range(0, len(labels), chunk):
        res = pipe(labels[i:i + chunk], num_inference_steps=steps, guidance_scale=guidance,
                   latents=noise[i:i + chunk], generator=gen, output_type="pt")
        out.append(res.images)
        nfe = res.nfe
    return torch.cat(out), nfe


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict that is also written as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="samples per setting (multiple of 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=500, help="images per pipeline call")
    parser.add_argument("--ancestral-guidance", type=float, nargs="*", default=[1.0],
                        help="guidance scales for the (slow) 1000-step ancestral reference")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.n < 10 or args.n % 10:
        raise ValueError(f"--n must be a positive multiple of 10, got {args.n}")
    torch.set_num_threads(args.threads)

    import diffusers

    from fewstep.eval.fd_digits import DigitsFeatures, fd_digits
    from fewstep.models import load_digits_pipeline, load_digits_split

    extractor = DigitsFeatures()
    x_test, _ = load_digits_split("test")
    labels = torch.arange(10).repeat_interleave(args.n // 10)

    # floor: N real training digits (balanced over classes, seeded) vs the held-out test digits
    x_train, y_train = load_digits_split("train")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.cat([
        torch.nonzero(y_train == c).flatten()[torch.randperm(int((y_train == c).sum()), generator=g)[: args.n // 10]]
        for c in range(10)
    ])
    if len(idx) < args.n:
        raise ValueError(f"--n {args.n} exceeds the balanced training set size")
    floor = fd_digits((x_train[idx] + 1) / 2, labels=y_train[idx], extractor=extractor, reference=x_test)
    rows = [{"sampler": "real train digits (floor)", "scheduler": None, "steps": 0, "guidance": None, "nfe": 0,
             "fd": floor["fd"], "accuracy": floor["accuracy"], "seconds": 0.0}]

    pipe = load_digits_pipeline()
    base_config = pipe.scheduler.config
    for name, cls_name, steps, guidance in _settings(args.ancestral_guidance):
        pipe.scheduler = getattr(diffusers, cls_name).from_config(base_config)
        t0 = time.time()
        with torch.inference_mode():
            imgs, nfe = _generate(pipe, labels, steps, guidance, args.seed, args.chunk)
        sec = time.time() - t0
        res = fd_digits(imgs, labels=labels, extractor=extractor, reference=x_test)
        rows.append({"sampler": name, "scheduler": cls_name, "steps": steps, "guidance": guidance, "nfe": nfe,
                     "fd": res["fd"], "accuracy": res["accuracy"], "seconds": round(sec, 1)})
        print(f"{name:>26} {steps:5d} steps  w={guidance:g}  NFE={nfe:5d}  FD={res['fd']:.3f}  "
              f"acc={res['accuracy']:.3f}  ({sec:.0f}s)", flush=True)

    def find(sched, steps, guidance):
        for r in rows:
            if r["scheduler"] == sched and r["steps"] == steps and r["guidance"] == guidance:
                return r
        return None

    checks = {}
    for gs in args.ancestral_guidance:
        anc, ddim = find("DDPMScheduler", 1000, gs), find("DDIMScheduler", 50, gs)
        if anc and ddim:
            ratio = ddim["fd"] / anc["fd"]
            checks[f"ddim50_over_ancestral1000_w{gs:g}"] = {"ratio": round(ratio, 3), "pass": ratio <= 1.5}
    acc2 = [r["accuracy"] for r in rows if r["guidance"] == 2.0]
    checks["min_accuracy_w2"] = {"value": round(min(acc2), 4), "pass": min(acc2) > 0.95}

    result = {
        "command": "python benchmarks/teacher_quality.py "
                   + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "n": args.n, "n_reference": len(x_test), "seed": args.seed, "threads": args.threads,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "rows": rows, "checks": checks,
    }
    print()
    print(f"| sampler | steps | w | NFE | FD-digits (N={args.n}) | class acc | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        w = "-" if r["guidance"] is None else f"{r['guidance']:g}"
        print(f"| {r['sampler']} | {r['steps'] or '-'} | {w} | {r['nfe'] or '-'} | {r['fd']:.3f} | "
              f"{100 * r['accuracy']:.1f}% | {r['seconds'] or '-'} |")
    print()
    for k, v in checks.items():
        print(f"{k}: {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
