"""How many threads should ``fewstep sample`` use on the digits teacher? The evidence for ``--threads auto``.

Runs ``fewstep sample --model digits --steps 8 --guidance cfg:2.0 --n N --threads T`` in a fresh
process for each thread count, ``--repeats`` times, and reports the median generation wall time
from ``record.json`` (the sampling loop only: no start-up, no model load). The result depends on
how busy the machine is: the load average is recorded with it.

    python benchmarks/sample_threads.py                     # N = 64 and 1000, T = 1, 2, all cores

Prints a table and writes ``benchmarks/results/sample_threads.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_io import save_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sample_threads.json"


def wall_time(n: int, threads: int, tmp: str) -> float:
    out = Path(tmp) / f"n{n}_t{threads}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "fewstep.apps.cli", "sample", "--model", "digits", "--steps", "8", "--guidance",
           "cfg:2.0", "--n", str(n), "--threads", str(threads), "--device", "cpu", "--no-progress", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return json.loads((out / "record.json").read_text())["wall_time_s"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[64, 1000], help="images per run")
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, 2, os.cpu_count() or 1}))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            for t in args.threads:
                times = [wall_time(n, t, tmp) for _ in range(args.repeats)]
                rows.append({"n": n, "threads": t, "median_s": statistics.median(times), "times_s": times})
                print(f"n={n:<5} threads={t:<3} median {statistics.median(times):7.2f} s  "
                      f"[{min(times):.2f}-{max(times):.2f}]", flush=True)
    result = {"protocol": "fewstep sample --model digits --steps 8 --guidance cfg:2.0 --n N --threads T, generation "
                          "wall time from record.json, median over repeats",
              "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "rows": rows,
              "command": "python benchmarks/sample_threads.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
