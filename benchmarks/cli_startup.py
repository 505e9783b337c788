"""Start-up time of the ``fewstep`` command line: ``--help`` and argument errors, before any work.

Each case runs ``python -m fewstep.apps.cli ARGS`` in a fresh process ``--repeats`` times (wall
time, median and range) and once more to record which heavy modules (torch, diffusers, gradio)
the command imported. Targets: ``--help`` under 1 s, argument errors under 2 s.

    python benchmarks/cli_startup.py                        # this checkout
    python benchmarks/cli_startup.py --before /tmp/main      # and an older checkout, side by side

Prints a table and writes ``benchmarks/results/cli_startup.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_io import save_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cli_startup.json"
HEAVY = ("torch", "diffusers", "gradio")
TARGETS = {"help": 1.0, "error": 2.0}


def cases(tmp: str) -> list[tuple[str, str, list[str]]]:
    """(name, kind, argv): ``kind`` is ``help`` (exit 0) or ``error`` (exit 2 with a message)."""
    out = ["--out", f"{tmp}/never"]
    return [
        ("fewstep --help", "help", ["--help"]),
        ("fewstep sample --help", "help", ["sample", "--help"]),
        ("fewstep eval --help", "help", ["eval", "--help"]),
        ("fewstep ems --help", "help", ["ems", "--help"]),
        ("sample --list-schedulers", "help", ["sample", "--list-schedulers"]),
        ("sample --list-guidance", "help", ["sample", "--list-guidance"]),
        ("sample without --out", "error", ["sample"]),
        ("sample --scheduler nope", "error", ["sample", *out, "--scheduler", "nope"]),
        ("sample --guidance apg:foo=1", "error", ["sample", *out, "--guidance", "apg:foo=1"]),
        ("sample --steps 0", "error", ["sample", *out, "--steps", "0"]),
        ("sample --model /no/such/dir", "error", ["sample", *out, "--model", "/no/such/dir"]),
        ("ems --num-grid 0", "error", ["ems", "--output", f"{tmp}/x.safetensors", "--num-grid", "0"]),
    ]


_PROBE = ("import runpy, sys\n"
          "sys.argv = ['fewstep'] + sys.argv[1:]\n"
          "try:\n    runpy.run_module('fewstep.apps.cli', run_name='__main__')\n"
          "except SystemExit:\n    pass\n"
          "print('\\nHEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n")


def run_case(root: Path, argv: list[str], repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    times, rc, err = [], None, ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fewstep.apps.cli", *argv], env=env, capture_output=True,
                              text=True, cwd=tempfile.gettempdir())
        times.append(time.perf_counter() - t0)
        rc, err = proc.returncode, proc.stderr
    probe = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *argv], env=env, capture_output=True,
                           text=True, cwd=tempfile.gettempdir())
    heavy = probe.stderr.rpartition("HEAVY=")[2].strip()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "exit_code": rc, "message": lines[-1][:160] if lines else "",
            "imported": [m for m in heavy.split(",") if m]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="runs per case (median reported)")
    ap.add_argument("--before", type=Path, default=None, help="an older checkout to measure side by side")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    roots = {"after": ROOT} if args.before is None else {"before": args.before, "after": ROOT}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, case_argv in cases(tmp):
            row = {"case": name, "kind": kind, "argv": case_argv, "target_s": TARGETS[kind]}
            for label, root in roots.items():
                row[label] = run_case(root, case_argv, args.repeats)
            rows.append(row)
            cells = "  ".join(f"{label} {row[label]['median_s']:6.2f} s [{row[label]['min_s']:.2f}-"
                              f"{row[label]['max_s']:.2f}] {'+'.join(row[label]['imported']) or '-':<22}"
                              for label in roots)
            ok = "ok" if row["after"]["median_s"] < row["target_s"] else "MISSED"
            print(f"{name:<30} {cells} target {row['target_s']:.0f} s {ok}", flush=True)
    result = {
        "protocol": f"python -m fewstep.apps.cli ARGS in a fresh process, {args.repeats} runs per case, wall time "
                    "(median, min-max); 'imported' = heavy modules loaded by the command",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "roots": {k: str(v) for k, v in roots.items()},
        "rows": rows,
        "command": "python benchmarks/cli_startup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
