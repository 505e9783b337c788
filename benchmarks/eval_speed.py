"""End-to-end FID throughput: ``fewstep eval fid`` vs torchmetrics' FrechetInceptionDistance.

Both sides do the whole job on the same PNG files: decode, resize to 299 (TF1 bilinear), the
same FID Inception module (``fewstep.eval.InceptionFeatures``, default_1.pt), float64
statistics and the Frechet distance. torchmetrics is driven the usual way: PIL decode, stack a
batch, ``update(batch, real=...)``, ``compute()``. Images are random crops of scikit-learn's two
sample photos resized to ``--size`` px (no download). Prints a table and writes
``benchmarks/results/eval_speed.json``.

Fairness: both sides run in this process after one warm-up run each (imports, first TorchScript
calls), then ``--repeats`` runs alternate fewstep / torchmetrics (the machine may be shared) and the
median per side is reported. Timed on each side (see ``INCLUDES``): building the Inception module
(jit.load + its width probe), listing the folders, PNG decode, resize, features, float64 sums and
the Frechet distance. fewstep additionally times its CLI work (argument parsing, the PIL ``verify``
pass over every file, JSON output); neither side times Python/torch import or process start.

    python benchmarks/eval_speed.py --n 32 --size 64 --batch-size 16 --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(folder: Path, n: int, size: int, seed: int) -> None:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ph = photos[i % len(photos)]
        side = int(rng.integers(150, min(ph.shape[:2])))
        y, x = int(rng.integers(0, ph.shape[0] - side)), int(rng.integers(0, ph.shape[1] - side))
        im = Image.fromarray(ph[y : y + side, x : x + side]).resize((size, size), Image.LANCZOS)
        im.save(folder / f"{i:05d}.png")


INCLUDES = {
    "fewstep": "in-process `fewstep eval fid` CLI main(): arg parsing, folder listing, PIL verify pass, "
    "InceptionFeatures build (jit.load + probe), PIL decode, TF resize, features, float64 sums, FID, JSON print",
    "torchmetrics": "InceptionFeatures build (jit.load + probe), FrechetInceptionDistance init, glob, PIL decode, "
    "stack, update() (TF resize, features, float64 sums), compute() (eigvals FID)",
}


def run_fewstep(gen: Path, ref: Path, batch_size: int) -> tuple[float, float]:
    from fewstep.apps.cli import main

    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf):
        code = main(["eval", "fid", str(gen), str(ref), "--json", "--no-progress", "--batch-size", str(batch_size),
                     "--device", "cpu"])  # fmt: skip
    dt = time.perf_counter() - t0
    assert code == 0
    return json.loads(buf.getvalue())["value"], dt


def run_torchmetrics(gen: Path, ref: Path, batch_size: int) -> tuple[float, float]:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from fewstep.eval.inception import InceptionFeatures

    t0 = time.perf_counter()
    fid = FrechetInceptionDistance(feature=InceptionFeatures(preprocess="tf"))
    for folder, real in ((ref, True), (gen, False)):
        files = sorted(folder.glob("*.png"))
        for k in range(0, len(files), batch_size):
            batch = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                     for f in files[k : k + batch_size]]  # fmt: skip
            fid.update(torch.stack(batch), real=real)
    value = fid.compute().item()
    return value, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="images per side")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (alternating); median reported")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        gen, ref = Path(tmp) / "gen", Path(tmp) / "ref"
        make_images(gen, args.n, args.size, seed=0)
        make_images(ref, args.n, args.size, seed=1)
        run_fewstep(gen, ref, args.batch_size)  # warm-up of each side (imports, first TorchScript runs)
        run_torchmetrics(gen, ref, args.batch_size)
        f_ts, t_ts = [], []
        for _ in range(args.repeats):  # alternate, so that load from other processes hits both sides alike
            f_val, t = run_fewstep(gen, ref, args.batch_size)
            f_ts.append(t)
            t_val, t = run_torchmetrics(gen, ref, args.batch_size)
            t_ts.append(t)
    n_img = 2 * args.n
    f_t, t_t = statistics.median(f_ts), statistics.median(t_ts)
    rows = [
        {"method": "fewstep eval fid", "fid": f_val, "seconds": f_t, "images_per_second": n_img / f_t,
         "seconds_all": f_ts, "includes": INCLUDES["fewstep"]},
        {"method": "torchmetrics FrechetInceptionDistance(feature=same module)", "fid": t_val, "seconds": t_t,
         "images_per_second": n_img / t_t, "seconds_all": t_ts, "includes": INCLUDES["torchmetrics"]},
    ]  # fmt: skip
    result = {
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "torch_threads": args.threads,
        "gpu_measured": False, "images_per_side": args.n, "image_size": args.size, "batch_size": args.batch_size,
        "repeats": args.repeats, "torch": torch.__version__, "rows": rows,
        "note": "end to end on both sides: PNG decode, resize to 299 (tf), Inception features, float64 stats, "
        "Frechet distance; one warm-up run per side, then runs alternate and the median is reported",
    }  # fmt: skip
    print(f"{'method':60s} {'FID':>10s} {'s':>8s} {'img/s':>8s}  (median of {args.repeats}, {n_img} images)")
    for r in rows:
        print(f"{r['method']:60s} {r['fid']:10.4f} {r['seconds']:8.2f} {r['images_per_second']:8.2f}")
    for r in rows:
        print(
            f"  {r['method'].split('(')[0]}: runs {', '.join(f'{t:.2f}' for t in r['seconds_all'])} s; "
            f"includes {r['includes']}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} (CPU only; GPU not measured)")


if __name__ == "__main__":
    main()
