"""Benchmark of the one-step distribution-matching students (issue 15: f-distill, DisBack) on the digits
teacher, with the conventions of benchmarks/distill.py (fresh noise from seed ``10_000 + seed``, N labels
balanced over the ten classes, FD-digits and class accuracy against the 360 held-out test digits).

Besides FD and accuracy, two measures that see mode dropping (class accuracy cannot):

* **recall** (Kynkaenniemi et al. 2019, "Improved precision and recall", Sec. 2): the fraction of the
  real test digits that fall inside the union of k-NN balls (k = 3) of the generated samples, in the
  classifier's 128-d feature space; **precision** is the converse (generated inside the real balls);
* **intra-class diversity**: per class, the trace of the covariance of the generated features divided by
  that of the real test digits of the class, averaged over classes (1: as varied as real digits; a
  student that collapses each class to a few prototypes scores well below 1).

Rows: every run of ``--runs`` (its exported one-step student ``RUN/final``, 1 step), the teacher's 50-step
DDIM (the reference of the FD target) and the real training digits (the floor). Curves: FD-vs-generator-
iteration of the runs (the trainer's fixed-noise evaluation; DisBack's stage-1 steps are not generator
iterations and are subtracted), and the DisBack target: the first generator iteration at which the DisBack
curve reaches the final FD of the reverse-KL run, over the reverse-KL run's iterations (target <= 0.7).

Targets (issue 15): f-distill 1-step FD <= 1.1x the teacher's DDIM-50 FD, class accuracy >= 98%, no mode
dropping (recall and intra-class diversity near the teacher's); DisBack ratio <= 0.7.

Usage::

    python benchmarks/fdistill.py --runs out/runs/fdistill_rkl out/runs/fdistill_js out/runs/fdistill_kl \\
        out/runs/disback --compare out/runs/fdistill_rkl out/runs/disback --horizon 200
    python benchmarks/fdistill.py --runs RUN --n 100 --seeds 0 --out /tmp/f.json     # dry run

Prints markdown tables and verdicts, writes ``benchmarks/results/fdistill.json`` and
``benchmarks/results/fdistill_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill import _agg, _generate, _noise, _teacher_generate  # noqa: E402  (shared protocol)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_FD_RATIO, TARGET_ACC, TARGET_DISBACK = 1.1, 0.98, 0.7


def knn_radii(feats: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (the k-NN ball radius)."""
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the row itself is at distance 0


def coverage_fraction(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` inside at least one ball (``centres``, ``radii``)."""
    d = torch.cdist(points, centres)
    return float((d <= radii[None, :]).any(dim=1).float().mean())


def diversity_scores(gen: torch.Tensor, gen_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor,
                     k: int = 3) -> dict:
    """Precision, recall (k-NN manifolds) and the mean per-class covariance-trace ratio gen / real."""
    recall = coverage_fraction(real, gen, knn_radii(gen, k))
    precision = coverage_fraction(gen, real, knn_radii(real, k))
    ratios = []
    for c in range(10):
        g, r = gen[gen_labels == c], real[real_labels == c]
        ratios.append(float(g.var(dim=0).sum() / r.var(dim=0).sum()))
    return {"precision": precision, "recall": recall, "intra_class_var_ratio": statistics.fmean(ratios),
            "min_class_var_ratio": min(ratios)}


def _features(images: torch.Tensor, extractor) -> torch.Tensor:
    with torch.no_grad():
        return extractor.embed(images.float() * 2 - 1).cpu()


def _score_all(images, labels, extractor, reference, real_feats, real_labels) -> dict:
    from fewstep.eval.fd_digits import fd_digits

    r = fd_digits(images, labels=labels, extractor=extractor, reference=reference)
    return {"fd": r["fd"], "acc": r["accuracy"],
            **diversity_scores(_features(images, extractor), labels, real_feats, real_labels)}


def _collect(per_seed: list[dict]) -> dict:
    return {k: _agg([s[k] for s in per_seed]) for k in per_seed[0]}


def run_rows(runs, n, seeds, extractor, reference, real_feats, real_labels, progress=print) -> dict:
    from fewstep.models.pipeline import load_digits_scheduler_config, load_digits_teacher_unet
    from fewstep.models.students import load_digits_student_pipeline

    labels = torch.arange(10).repeat_interleave(n // 10)
    rows = {}
    for run in runs:
        final = Path(run) / "final"
        meta = sorted(final.glob("digits_*.json"))
        if not meta:
            progress(f"{run}: no exported student in {final}, skipped")
            continue
        name = meta[0].stem[len("digits_"):]
        pipe = load_digits_student_pipeline(name, weights_dir=final)
        per = []
        for seed in seeds:
            imgs, nfe, _ = _generate(pipe, labels, _noise(n, seed), 1, 1.0, seed)
            per.append(_score_all(imgs, labels, extractor, reference, real_feats, real_labels))
        info = json.loads(meta[0].read_text())["training"]
        rows[Path(run).name] = {"run": str(run), "method": info.get("method"), "f": info.get("f"), "nfe": 1,
                                **_collect(per)}
        progress(f"{Path(run).name}: FD {rows[Path(run).name]['fd']['mean']:.3f}")
    from diffusers import DDIMScheduler

    unet = load_digits_teacher_unet()
    config = load_digits_scheduler_config()
    per = []
    for seed in seeds:
        imgs, _, _ = _teacher_generate(unet, lambda: DDIMScheduler.from_config(config), None, labels,
                                       _noise(n, seed), 50)
        per.append(_score_all(imgs, labels, extractor, reference, real_feats, real_labels))
    rows["teacher DDIM-50"] = {"run": None, "method": "teacher", "f": None, "nfe": 50, **_collect(per)}
    from fewstep.models import load_digits_split

    x, y = load_digits_split("train")
    per = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:n // 10]]
                         for c in range(10)])
        if len(idx) == n:
            per.append(_score_all((x[idx] + 1) / 2, y[idx], extractor, reference, real_feats, real_labels))
    if per:
        rows["real train digits (floor)"] = {"run": None, "method": "data", "f": None, "nfe": 0, **_collect(per)}
    return rows


def generator_curve(run: str) -> tuple[list[tuple[int, float]], dict]:
    """``[(generator iteration, fixed-noise 1-step FD)]`` of a run and its config."""
    from fewstep.distill import read_log

    cfg = json.loads((Path(run) / "config.json").read_text())["config"]
    offset = cfg["method"].get("degradation_steps", 0) if cfg["method"]["name"] == "disback" else 0
    pts = [(r["step"] - offset, r["fd/1"]) for r in read_log(run) if r["kind"] == "eval" and "fd/1" in r
           and r["step"] >= offset]
    return pts, cfg


def disback_verdict(pairs: list[tuple[str, str]], horizon: int | None = None) -> dict:
    """Per (reverse-KL run, DisBack run) pair of the same seed: the reverse-KL run's fixed-noise FD at
    generator iteration ``horizon`` (default: its last evaluation), and the first generator iteration
    at which the DisBack curve is at or below it; the ratio of the two (target <= 0.7), mean and spread
    over the pairs. A DisBack curve that never gets there counts as ratio None (a miss)."""
    per = []
    for rkl_run, db_run in pairs:
        rkl, _ = generator_curve(rkl_run)
        db, cfg = generator_curve(db_run)
        h = horizon if horizon is not None else rkl[-1][0]
        at = [fd for it, fd in rkl if it == h]
        if not at:
            raise ValueError(f"{rkl_run} has no evaluation at generator iteration {h}")
        reach = next((it for it, fd in db if 0 < it <= h and fd <= at[0]), None)
        per.append({"rkl_run": rkl_run, "disback_run": db_run, "horizon": h, "rkl_fd_at_horizon": at[0],
                    "disback_fd_at_horizon": next((fd for it, fd in db if it == h), None),
                    "disback_reaches_at": reach, "ratio": None if reach is None else reach / h,
                    "stage1_steps": cfg["method"].get("degradation_steps")})
    ratios = [p["ratio"] if p["ratio"] is not None else float("inf") for p in per]
    finite = [r for r in ratios if r != float("inf")]
    return {"pairs": per, "ratio_mean": statistics.fmean(finite) if len(finite) == len(ratios) else None,
            "ratio_std": statistics.stdev(finite) if len(finite) == len(ratios) > 1 else None,
            "pass": all(r <= TARGET_DISBACK for r in ratios)}


def plot_curves(runs, out_png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    teacher = None
    for run in runs:
        if not (Path(run) / "log.jsonl").exists():
            continue
        pts, cfg = generator_curve(run)
        label = f"{Path(run).name} ({cfg['method']['name']}, f={cfg['method']['f']})"
        ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        from fewstep.distill import read_log

        teacher = teacher or next((r.get("teacher_ddim50/fd") for r in read_log(run) if r["kind"] == "teacher"), None)
    if teacher:
        ax.axhline(teacher, color="k", ls="--", lw=0.8, label="teacher DDIM-50 (same noise)")
    ax.set_yscale("log")
    ax.set_xlabel("generator iteration")
    ax.set_ylabel("1-step FD-digits (fixed eval noise, n=500)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def verdicts(rows: dict, disback: dict | None) -> dict:
    out = {}
    ref = rows.get("teacher DDIM-50")
    for name, r in rows.items():
        if r["method"] != "fdistill" or ref is None:
            continue
        ratio = r["fd"]["mean"] / ref["fd"]["mean"]
        out[f"{name}: 1-step FD <= {TARGET_FD_RATIO}x teacher DDIM-50"] = {"ratio": round(ratio, 3),
                                                                           "pass": ratio <= TARGET_FD_RATIO}
        out[f"{name}: class accuracy >= {TARGET_ACC}"] = {"acc": round(r["acc"]["mean"], 4),
                                                          "pass": r["acc"]["mean"] >= TARGET_ACC}
        rec = r["recall"]["mean"] / ref["recall"]["mean"]
        out[f"{name}: recall >= 0.9x teacher's"] = {"recall": round(r["recall"]["mean"], 3),
                                                    "teacher": round(ref["recall"]["mean"], 3), "pass": rec >= 0.9}
    if disback is not None:
        out[f"DisBack reaches reverse-KL's final FD in <= {TARGET_DISBACK}x its iterations"] = disback
    return out


def print_tables(result: dict) -> None:
    def fmt(a, scale=1.0, digits=3):
        return f"{scale * a['mean']:.{digits}f} ± {scale * a['std']:.{digits}f}"

    print(f"\nN={result['n']}, seeds {result['seeds']} (mean ± std over seeds)")
    print("| model | f | NFE | FD-digits | class acc % | precision | recall | intra-class var ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in result["rows"].items():
        print(f"| {name} | {r['f'] or '-'} | {r['nfe']} | {fmt(r['fd'])} | {fmt(r['acc'], 100, 1)} | "
              f"{fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['intra_class_var_ratio'])} |")
    if result.get("training"):
        print("\n| run | trainer steps | wall time (min) | peak RSS (MB) | trainable params |")
        print("|---|---:|---:|---:|---:|")
        for run, i in result["training"].items():
            wall = f"{i['wall_time_s'] / 60:.1f}" if i.get("wall_time_s") else "-"
            mem = (i.get("memory") or {}).get("cpu_max_rss_mb", "-")
            print(f"| {run} | {i['steps']} | {wall} | {mem} | {sum((i.get('trainable_parameters') or {}).values())} |")
    print()
    for k, v in result.get("verdicts", {}).items():
        print(f"{'PASS' if v['pass'] else 'MISS'}  {k}: {json.dumps({a: b for a, b in v.items() if a != 'pass'})}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="training run directories (RUN/final, RUN/log.jsonl)")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("RKL_RUN", "DISBACK_RUN"),
                        help="a reverse-KL run and a DisBack run of the same seed (repeat for more seeds)")
    parser.add_argument("--horizon", type=int, default=None,
                        help="generator iteration of the reverse-KL FD that DisBack must reach (default: its last)")
    parser.add_argument("--n", type=int, default=1000, help="samples per seed (multiple of 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--curves-only", action="store_true",
                        help="only the training curves and the DisBack verdict (from the run logs; no sampling)")
    parser.add_argument("--out", default=str(RESULTS / "fdistill.json"))
    args = parser.parse_args(argv)
    if args.n < 10 or args.n % 10:
        raise ValueError(f"--n must be a positive multiple of 10, got {args.n}")
    torch.set_num_threads(args.threads)
    from fewstep.eval.fd_digits import DigitsFeatures
    from fewstep.eval.frechet import FeatureStats
    from fewstep.models import load_digits_split

    extractor = DigitsFeatures()
    x_test, y_test = load_digits_split("test")
    with torch.no_grad():
        real_feats = extractor.embed(x_test).cpu()
    reference = FeatureStats.from_features(real_feats, extractor.meta())
    rows = {} if args.curves_only else run_rows(args.runs, args.n, args.seeds, extractor, reference, real_feats,
                                                y_test)
    disback = disback_verdict([tuple(p) for p in args.compare], args.horizon) if args.compare else None
    out = Path(args.out)
    plot_curves(args.runs, out.with_name(out.stem + "_curves.png"))
    training = {}
    for run in args.runs:
        s = Path(run) / "summary.json"
        if s.exists():
            summ = json.loads(s.read_text())
            training[Path(run).name] = {k: summ.get(k) for k in ("steps", "wall_time_s", "memory",
                                                                 "trainable_parameters")}
    result = {"n": args.n, "seeds": args.seeds, "rows": rows, "training": training,
              "command": "python benchmarks/fdistill.py " + " ".join(map(shlex.quote, argv if argv is not None
                                                                         else sys.argv[1:])),
              "protocol": __doc__.split("Usage::")[0].strip()}
    result["verdicts"] = verdicts(rows, disback)
    print_tables(result)
    from fewstep._io import atomic_write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {atomic_write_json(out, result)}")
    return result


if __name__ == "__main__":
    main()
