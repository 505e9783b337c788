"""Benchmark of LCSC on a diffusion model (issue 16, second demonstration): the digits teacher's own
training snapshots, merged for few-step sampling.

The paper (Liu et al., ICLR 2025) reports that LCSC lowers the NFE a diffusion model needs (CIFAR-10:
NFE 15 -> 9 at equal FID). Here: the teacher retrained with ``fewstep train-teacher --snapshot-every
250`` (the shipped config and seed, so its final EMA is the shipped teacher), 20 raw snapshots, an
LCSC search of FD-digits at ``--search-nfe`` (6) DPM-Solver++(2M) steps, and the question whether
LCSC at 6 steps matches the EMA teacher at 10 steps.

Protocol (the one of benchmarks/lcsc.py): for every seed, ``N`` labels balanced over the ten classes
and start noise from seed ``10_000 + seed``; the search used noise seed 7, so every number here is on
held-out noise. Sampler: DPM-Solver++(2M), trailing, the digits scheduler config (the teacher
template of :func:`fewstep.distill.lcsc.load_template`). Rows: the EMA teacher (the run's ``final/``)
at ``--nfe`` steps, every raw snapshot and every EMA snapshot at the search NFE, the LCSC model at
``--nfe`` steps. Target: LCSC at 6 steps <= EMA teacher at 10 steps + the larger seed std.

Usage::

    fewstep train-teacher --snapshot-every 250 --work-dir out/lcsc_teacher/train --output-dir out/lcsc_teacher/teacher
    fewstep lcsc --run out/lcsc_teacher/train --nfe 6 --output out/lcsc_teacher/search
    python benchmarks/lcsc_teacher.py --run out/lcsc_teacher/train --search out/lcsc_teacher/search

Prints markdown tables and the verdict, writes ``benchmarks/results/lcsc_teacher.json`` and
``benchmarks/results/lcsc_teacher_fitness.png`` (the search's fitness over generations).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from lcsc import RESULTS, _measure, _scorers, save_with_plot


def run(args) -> tuple[dict, dict]:
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from fewstep.distill import lcsc
    from fewstep.models import shipped_file

    template = lcsc.load_template(args.run)
    pipe, model = template.pipeline, template.model
    final = {k: v.clone() for k, v in model.state_dict().items()}
    shipped = load_file(str(shipped_file("digits_unet.safetensors")))
    check = {"final_ema_equals_shipped_teacher": all(torch.equal(final[k], shipped[k]) for k in shipped),
             "max_abs_difference": max(float((final[k] - shipped[k]).abs().max()) for k in shipped)}
    print(f"retrained EMA vs shipped teacher: {check}", flush=True)
    merged = UNet2DModel.from_pretrained(str(Path(args.search) / "unet")).state_dict()
    rec = json.loads((Path(args.search) / "lcsc.json").read_text())
    rows: dict[str, dict] = {}
    t0 = time.time()

    def row(key, **info):
        scorers = _scorers(args.n, args.seeds, pipe, info["nfe"])
        rows[key] = {**info, **_measure(scorers, pipe)}
        print(f"{key:>34}: FD {rows[key]['fd']['mean']:.3f} +- {rows[key]['fd']['std']:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)

    for nfe in args.nfe:
        model.load_state_dict(final)
        row(f"EMA teacher nfe={nfe}", kind="ema-teacher", nfe=nfe)
        model.load_state_dict(merged)
        row(f"LCSC nfe={nfe}", kind="lcsc", nfe=nfe, alpha=rec["alpha"])
    for weights in ("teacher", "teacher_ema"):
        refs = lcsc.checkpoint_refs(args.run, weights=weights)
        for i, ref in enumerate(refs):
            onehot = [0.0] * len(refs)
            onehot[i] = 1.0
            lcsc.merge(refs, onehot, out=model.state_dict())
            row(f"{weights}@{ref.step} nfe={args.search_nfe}", kind=weights, step=ref.step, nfe=args.search_nfe)
    model.load_state_dict(final)
    return rows, {"check": check, "search": rec.get("search"), "checkpoints": len(rec["checkpoints"])}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the `fewstep train-teacher --snapshot-every` work dir")
    p.add_argument("--search", required=True, help="output folder of `fewstep lcsc --run RUN --nfe 6`")
    p.add_argument("--search-nfe", type=int, default=6, help="the NFE the search used")
    p.add_argument("--nfe", type=int, nargs="+", default=[6, 8, 10], help="sampling steps of the main rows")
    p.add_argument("--n", type=int, default=1000, help="samples per seed (multiple of 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="held-out noise seeds")
    p.add_argument("--out", default=str(RESULTS / "lcsc_teacher.json"), help="result JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, info = run(args)
    s = args.search_nfe
    raw = [r for r in rows.values() if r["kind"] == "teacher"]
    ema = [r for r in rows.values() if r["kind"] == "teacher_ema"]
    summary = {f"EMA teacher, {n} steps": rows[f"EMA teacher nfe={n}"] for n in args.nfe}
    summary.update({f"LCSC, {n} steps": rows[f"LCSC nfe={n}"] for n in args.nfe})
    summary[f"best raw snapshot, {s} steps"] = min(raw, key=lambda r: r["fd"]["mean"])
    summary[f"best EMA snapshot, {s} steps"] = min(ema, key=lambda r: r["fd"]["mean"])
    lc, ref = rows[f"LCSC nfe={s}"]["fd"], rows[f"EMA teacher nfe={max(args.nfe)}"]["fd"]
    spread = max(lc["std"], ref["std"])
    verdict = {"lcsc_nfe": s, "ema_nfe": max(args.nfe), "lcsc": lc["mean"], "ema": ref["mean"], "spread": spread,
               "target": "lcsc <= ema + spread", "met": lc["mean"] <= ref["mean"] + spread,
               "lcsc_vs_ema_same_nfe": lc["mean"] / rows[f"EMA teacher nfe={s}"]["fd"]["mean"]}
    result = {"n": args.n, "seeds": args.seeds, "run": args.run, "search_folder": args.search,
              "command": " ".join(["python benchmarks/lcsc_teacher.py",
                                   *(shlex.quote(a) for a in (argv or sys.argv[1:]))]),
              "torch": torch.__version__, **info, "rows": rows,
              "summary": {k: {"fd": v["fd"], "acc": v["acc"], "step": v.get("step"), "nfe": v["nfe"]}
                          for k, v in summary.items()},
              "verdict": verdict}
    print(f"\n### LCSC on the teacher's snapshots (n = {args.n}, seeds {args.seeds}, held-out noise, "
          "DPM-Solver++ 2M)\n")
    print("| model | FD-digits | accuracy |\n|---|---|---|")
    for k, v in summary.items():
        step = f" (step {v['step']})" if v.get("step") else ""
        print(f"| {k}{step} | {v['fd']['mean']:.3f} +- {v['fd']['std']:.3f} | {v['acc']['mean']:.3f} |")
    print(f"- verdict: {json.dumps(verdict)}")
    if info["search"]:
        print(f"- search: {info['search']['evaluations']} evaluations, "
              f"{info['search']['evaluation_seconds'] / 60:.1f} min of fitness evaluation")
    return save_with_plot(result, args.out, {"teacher snapshots": args.search} if info["search"] else {},
                          "lcsc_teacher_fitness.png")


if __name__ == "__main__":
    main()
