"""Benchmark of LCSC (issue 16) on a consistency-distillation run of the digits teacher.

Protocol (the one of benchmarks/distill.py, so the rows compare with benchmarks/results/distill.json):
for every seed, ``N`` labels balanced over the ten classes and start noise from seed ``10_000 + seed``
(re-noising of multistep sampling: ``20_000 + seed``). The LCSC searches used other noise (``fewstep
lcsc --noise-seed``, default 7), so every number here is on held-out noise. Score: FD-digits against
the 360 held-out test digits (and class accuracy), mean and standard deviation over seeds.

Rows, all at ``--nfe`` sampling steps (1 by default):

* every saved checkpoint of the run: the raw student weights (``student``) and the trainer's EMA
  (``student_ema``, decay 0.999) at each step; "last checkpoint" = raw weights at the last step,
  "best single checkpoint" = the raw checkpoint with the lowest mean FD (chosen on these same seeds:
  a choice in its favour), "EMA" = the EMA weights at the last step (the shipped ``cd`` student),
  "best EMA checkpoint" likewise chosen on these seeds;
* LCSC: the merged student of ``--search`` (all checkpoints) and of ``--half`` (the first 50%).

Targets: LCSC FD <= 0.9 x min(last, best single, EMA); LCSC over the first half <= the final
checkpoint's FD (raw and EMA) within the seed spread.

Usage::

    python benchmarks/lcsc.py --run RUN --search out/lcsc_cd --half out/lcsc_cd_half   # N=1000, seeds 0 1 2
    python benchmarks/lcsc.py --run RUN --search out/lcsc_cd --n 100 --seeds 0 --out /tmp/l.json   # dry run

Prints markdown tables and the verdicts, writes ``benchmarks/results/lcsc.json`` and
``benchmarks/results/lcsc_fitness.png`` (fitness over generations of the searches).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_io import save_json

RESULTS = Path(__file__).resolve().parent / "results"


def _agg(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _scorers(n: int, seeds: list[int], pipe, nfe: int):
    from fewstep.distill.lcsc import DigitsFDFitness

    return {s: DigitsFDFitness(pipe, nfe=nfe, num_samples=n, noise_seed=10_000 + s, renoise_seed=20_000 + s)
            for s in seeds}


def _measure(scorers: dict, pipe) -> dict:
    fds, accs = [], []
    for sc in scorers.values():
        r = sc.score(pipe)
        fds.append(r["fd"])
        accs.append(r["acc"])
    return {"fd": _agg(fds), "acc": _agg(accs)}


def run(args) -> dict:
    from fewstep.distill import lcsc
    from fewstep.models.students import load_digits_student_pipeline

    template = lcsc.load_template(args.run)
    pipe = template.pipeline
    state = template.model.state_dict()
    rows: dict[str, dict] = {}
    t0 = time.time()
    for nfe in args.nfe:
        scorers = _scorers(args.n, args.seeds, pipe, nfe)
        for weights in ("student", "student_ema"):
            refs = lcsc.checkpoint_refs(args.run, weights=weights)
            for i, ref in enumerate(refs):
                onehot = [0.0] * len(refs)
                onehot[i] = 1.0
                lcsc.merge(refs, onehot, out=state)
                key = f"{weights}@{ref.step} nfe={nfe}"
                rows[key] = {"kind": weights, "step": ref.step, "nfe": nfe, **_measure(scorers, pipe)}
                print(f"{key:>28}: FD {rows[key]['fd']['mean']:.3f} +- {rows[key]['fd']['std']:.3f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
        for label, folder in (("lcsc", args.search), ("lcsc-half", args.half)):
            if folder is None:
                continue
            rec = json.loads((Path(folder) / "lcsc.json").read_text())
            name = next(Path(folder).glob("digits_*_unet.safetensors")).name[len("digits_"):-len("_unet.safetensors")]
            merged = load_digits_student_pipeline(name, weights_dir=folder)
            key = f"{label} nfe={nfe}"
            rows[key] = {"kind": label, "nfe": nfe, "folder": str(folder), "alpha": rec["alpha"],
                         "steps": [c["step"] for c in rec["checkpoints"]], "search": rec.get("search"),
                         **_measure(scorers, merged)}
            print(f"{key:>28}: FD {rows[key]['fd']['mean']:.3f} +- {rows[key]['fd']['std']:.3f}", flush=True)
    return rows


def summarise(rows: dict, nfe: int) -> dict:
    def fd(r):
        return r["fd"]["mean"]

    raw = [r for r in rows.values() if r["kind"] == "student" and r["nfe"] == nfe]
    ema = [r for r in rows.values() if r["kind"] == "student_ema" and r["nfe"] == nfe]
    last = max(raw, key=lambda r: r["step"])
    out = {"last checkpoint": last, "best single checkpoint": min(raw, key=fd),
           "EMA (last step)": max(ema, key=lambda r: r["step"]), "best EMA checkpoint": min(ema, key=fd)}
    for label in ("lcsc", "lcsc-half"):
        key = f"{label} nfe={nfe}"
        if key in rows:
            out[{"lcsc": "LCSC (all checkpoints)", "lcsc-half": "LCSC (first 50%)"}[label]] = rows[key]
    return out


def verdicts(summary: dict) -> dict:
    v = {}
    if "LCSC (all checkpoints)" in summary:
        lc = summary["LCSC (all checkpoints)"]["fd"]["mean"]
        base = min(summary[k]["fd"]["mean"] for k in ("last checkpoint", "best single checkpoint", "EMA (last step)"))
        v["lcsc_vs_best_baseline"] = {"lcsc": lc, "best_baseline": base, "ratio": lc / base,
                                      "target": "<= 0.9", "met": lc <= 0.9 * base}
    if "LCSC (first 50%)" in summary:
        h = summary["LCSC (first 50%)"]["fd"]
        for ref in ("last checkpoint", "EMA (last step)"):
            r = summary[ref]["fd"]
            spread = max(h["std"], r["std"])
            v[f"half_vs_{ref}"] = {"lcsc_half": h["mean"], "final": r["mean"], "spread": spread,
                                   "target": "<= final + spread", "met": h["mean"] <= r["mean"] + spread}
    return v


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the CD run folder (trainer layout, with final/)")
    p.add_argument("--search", default=None, help="output folder of `fewstep lcsc` over all checkpoints")
    p.add_argument("--half", default=None, help="output folder of `fewstep lcsc --first-fraction 0.5`")
    p.add_argument("--n", type=int, default=1000, help="samples per seed (multiple of 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="held-out noise seeds")
    p.add_argument("--nfe", type=int, nargs="+", default=[1], help="sampling steps")
    p.add_argument("--out", default=str(RESULTS / "lcsc.json"), help="result JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args)
    result = {"n": args.n, "seeds": args.seeds, "nfe": args.nfe, "run": args.run,
              "command": "python benchmarks/lcsc.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "torch": torch.__version__, "rows": rows, "summary": {}, "verdicts": {}}
    for nfe in args.nfe:
        s = summarise(rows, nfe)
        result["summary"][str(nfe)] = {k: {"fd": v["fd"], "acc": v["acc"], "step": v.get("step")} for k, v in s.items()}
        result["verdicts"][str(nfe)] = verdicts(s)
        print(f"\n### NFE {nfe} (n = {args.n}, seeds {args.seeds}, held-out noise)\n")
        print("| model | FD-digits | accuracy |\n|---|---|---|")
        for k, v in s.items():
            step = f" (step {v['step']})" if v.get("step") else ""
            print(f"| {k}{step} | {v['fd']['mean']:.3f} +- {v['fd']['std']:.3f} | {v['acc']['mean']:.3f} |")
        for k, v in result["verdicts"][str(nfe)].items():
            print(f"- {k}: {json.dumps(v)}")
    searches = {k: f for k, f in (("all", args.search), ("first 50%", args.half)) if f}
    for label, folder in searches.items():
        rec = json.loads((Path(folder) / "lcsc.json").read_text())
        result.setdefault("search_cost", {})[label] = {
            "evaluations": rec["search"]["evaluations"], "evaluation_minutes": rec["search"]["evaluation_seconds"] / 60,
            "fitness": rec["search"]["fitness"], "config": rec["search"]["config"],
            "best_search_fitness": rec["search"]["best_fitness"], "checkpoints": len(rec["checkpoints"])}
        print(f"- search cost ({label}): {result['search_cost'][label]}")
    return save_with_plot(result, args.out, searches, "lcsc_fitness.png")


def save_with_plot(result: dict, out: str, searches: dict, png_name: str) -> dict:
    """Plot the fitness over generations of ``searches`` (label -> `fewstep lcsc` output folder) to
    ``png_name`` next to ``out`` (``result["plot"]``), then write ``result`` to ``out``."""
    if searches:
        from fewstep.distill.lcsc import SEARCH_LOG, plot_search

        png = plot_search({k: Path(f) / SEARCH_LOG for k, f in searches.items()}, Path(out).with_name(png_name))
        result["plot"] = str(png) if png else None
    save_json(out, result)
    return result


if __name__ == "__main__":
    main()
