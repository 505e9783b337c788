"""Do the example settings give good digits? FD-digits of every example the CLI and the demo suggest.

Each setting is sampled with ``fewstep sample`` (digits teacher, ``--n`` images balanced over the
ten classes, 8 steps as in the demo) for two seeds and scored with ``fewstep eval fd-digits``
(Frechet distance to the 360 held-out test digits on the bundled classifier's features, and the
classifier's accuracy on the intended labels). Settings: the guidance examples of
``fewstep sample --list-guidance`` (= the demo's defaults), the demo's compare lines, and
scheduler-override candidates for the demo's placeholder, including the full logSNR grid the
placeholder used to suggest.

    OMP_NUM_THREADS=1 python benchmarks/cli_examples.py            # ~10 min on one CPU thread

Prints a table and writes ``benchmarks/results/cli_examples.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_io import save_json

from fewstep.apps.cli import main as cli
from fewstep.guidance.spec import GUIDANCE_METHODS

RESULTS = Path(__file__).resolve().parent / "results" / "cli_examples.json"


def _row(sched: str, spec: str, overrides: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    argv = ["--scheduler", sched, "--guidance", spec]
    for item in overrides:
        argv += ["--scheduler-config", item]
    return " ".join([sched, spec, *overrides]), argv


def settings() -> list[tuple[str, list[str]]]:
    """(name, fewstep sample arguments) of every setting measured."""
    # the guidance examples (CFG++ needs a renoising scheduler; the paper's is DDIM) and the demo's compare lines
    rows = [_row("ddim" if m.name == "cfgpp" else "dpmpp-2m", f"{m.name}:{m.example}")
            for m in GUIDANCE_METHODS.values() if m.example]
    rows.append(_row("ddim", "cfg:2.0"))
    # the README's second example before the restructure, and the same guidance on the model's own grid
    rows += [_row("dpmpp-3m", "apg:scale=5,eta=0", ("timestep_spacing=logsnr",)), _row("dpmpp-3m", "apg:scale=5,eta=0")]
    # candidates for the demo's scheduler-override placeholder
    for overrides in ((), ("timestep_spacing=logsnr",), ("timestep_spacing=logsnr", "lambda_min_clipped=-5.1"),
                      ("timestep_spacing=time_power", "timestep_power=1.3"), ("use_karras_sigmas=true",)):
        rows += [_row(sched, "cfg:2.0", overrides) for sched in ("dpmpp-3m", "dpmpp-2m")]
    return rows


def run(argv: list[str], n: int, seed: int, tmp: str) -> dict:
    out = Path(tmp) / f"s{seed}"
    with contextlib.redirect_stderr(io.StringIO()):
        rc = cli(["sample", "--model", "digits", "--steps", "8", "--labels", "0-9", "--n", str(n), "--seed",
                  str(seed), "--device", "cpu", "--no-progress", "--threads", "1", "--out", str(out), *argv])
        if rc != 0:
            raise RuntimeError(f"fewstep sample {argv} failed")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli(["eval", "fd-digits", str(out), "--json", "--no-progress", "--device", "cpu"])
    if rc != 0:
        raise RuntimeError(f"fewstep eval fd-digits failed for {argv}")
    res = json.loads(buf.getvalue())
    rec = json.loads((out / "record.json").read_text())
    return {"fd": res["value"], "accuracy": res["accuracy"], "nfe": rec["nfe"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="images per setting and seed (multiple of 10)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    print(f"| setting (8 steps, n={args.n}) | NFE | FD-digits (seeds {args.seeds}) | accuracy |")
    print("|---|---|---|---|")
    for name, sargv in settings():
        runs = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(run(sargv, args.n, seed, tmp))
        fds, accs = [r["fd"] for r in runs], [r["accuracy"] for r in runs]
        row = {"setting": name, "argv": sargv, "nfe": runs[0]["nfe"], "fd": fds, "accuracy": accs,
               "fd_mean": statistics.mean(fds), "accuracy_mean": statistics.mean(accs)}
        rows.append(row)
        print(f"| {name} | {row['nfe']} | {' / '.join(f'{v:.2f}' for v in fds)} | "
              f"{' / '.join(f'{v:.3f}' for v in accs)} |", flush=True)
    result = {"protocol": f"fewstep sample --model digits --steps 8 --labels 0-9 --n {args.n} --seed S, then "
                          "fewstep eval fd-digits (360 held-out test digits); one row per setting",
              "seeds": args.seeds, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
              "command": "python benchmarks/cli_examples.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
