"""Benchmark: DPM-Solver-v3 on the bundled digits teacher (issue 5, the digits half; the exact
Gaussian-mixture half is benchmarks/dpm_v3.py).

fewstep's ``DPMSolverV3Scheduler`` with the shipped EMS (``"digits"`` for w = 1, ``"digits-cfg2"``
for w = 2) next to fewstep's ``DPMSolverPPScheduler`` and diffusers' DPMSolverMultistep (2M/3M on the
teacher's trailing grid, Karras, lu-lambdas), UniPC and DEIS, at NFE 4, 5, 6, 8, 10, 15 and
classifier-free guidance w = 1 and 2 (``uncond + w (cond - uncond)``; NFE counts solver steps, one
guided evaluation -- a cond + uncond pair at w = 2 -- per step, as in the DPM-Solver papers).
Rows named ``... logsnr[-3,2.5]`` / ``... power1.3`` run on the grids chosen by
benchmarks/dpm_v3_grid_search.py (on its own search set, seed 1), snapped to the EMS lambda grid and
given unchanged to v3, v3 without EMS, fewstep DPM++ and diffusers' UniPC (whose ``set_timesteps``
takes no custom grid for VP models: the grid is put into its ``timesteps``/``sigmas``, see
:func:`install_grid`; these UniPC rows are not "diffusers configurations" and stay out of "best diffusers").

Protocol: ``N`` samples balanced over the ten classes, fixed seed, the same start noise for every
row and both guidance scales. Reference per guidance scale: a 1000-step deterministic solve from
the same noise with fewstep ``DPMSolverPPScheduler`` 2M on the ``trailing`` grid with 1000 steps,
i.e. every integer training time 999, 998, ..., 0 (the exact model times, no rounding), then the
data prediction at t = 0 (``--ref-check K`` solves the first K samples again with 3M on a 1000-point
logSNR grid at exact float times and records the RMSE between the two references). Per row:
RMSE = root-mean-square pixel difference between the raw final samples and the reference
(in the model's [-1, 1] units, unclipped), FD-digits against the 360 held-out test digits
(``fewstep.eval.fd_digits``, images clamped to [-1, 1] like the pipeline output) and class accuracy.

Usage::

    python benchmarks/dpm_v3_digits.py                    # N=200, w = 1 and 2, ~11 min on 1 loaded CPU thread
    python benchmarks/dpm_v3_digits.py --guidance 1       # one scale; merges into the existing JSON
    python benchmarks/dpm_v3_digits.py --guidance 1 --only "logsnr[" power1.3   # some rows; merged with the
                                                          # stored rows of that scale (same N, seed, NFE)
    python benchmarks/dpm_v3_digits.py --n 20 --nfe 5 --allow-degenerated --out /tmp/x.json  # dry run

Prints markdown tables (RMSE and FD, rows x NFE) per guidance scale, the best diffusers configuration
per NFE, the v3 / best-diffusers ratios and whether the target (>= 25% lower RMSE than the best
diffusers configuration at every NFE 5-10) is met; writes ``benchmarks/results/dpm_v3_digits.json``
(entries per guidance scale are replaced, others kept).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fewstep.schedule import NoiseSchedule

RESULTS = Path(__file__).resolve().parent / "results" / "dpm_v3_digits.json"
NFES = (4, 5, 6, 8, 10, 15)
TARGET_NFES = (5, 6, 8, 10)
TARGET_RATIO = 0.75
EMS_FOR = {1.0: "digits", 2.0: "digits-cfg2"}
V3_MAIN = "v3 o3 logsnr"  # the setting fixed in advance from the mixture benchmark
LAMBDA_CLIP = -5.1  # diffusers' advice for the cosine schedule (``lambda_min_clipped`` docs); starts at t=995
# grids chosen by benchmarks/dpm_v3_grid_search.py on its own search set (seed 1, N=100, w=1; lowest mean
# RMSE over NFE 5-10 for v3 o2, one setting for all NFE; results/dpm_v3_grid_search.json), snapped to the
# digits EMS lambda grid and given to every solver of the row group "... on tuned grid" unchanged
TUNED_GRIDS = {"logsnr[-3,2.5]": ("logsnr", {"lo": -3.0, "hi": 2.5}), "power1.3": ("power", {"p": 1.3})}
V3_TUNED = "v3 o2 logsnr[-3,2.5]"  # the overall winner of the search
TUNED_GROUP = "diffusers solver, tuned grid"  # diffusers solvers on a grid diffusers cannot make: not "best diffusers"


def make_rows(config: dict, ems, degenerated: bool) -> dict[str, tuple[str, callable]]:
    """name -> (group, factory). ``ems``: an EMS name/object for the v3 rows (None with degenerated)."""
    from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler

    rows: dict[str, tuple[str, callable]] = {}
    for o in (2, 3):
        rows[f"diffusers DPM++{o}M trailing"] = ("diffusers", lambda o=o: DPMSolverMultistepScheduler.from_config(
            config, solver_order=o))
        rows[f"diffusers DPM++{o}M karras"] = ("diffusers", lambda o=o: DPMSolverMultistepScheduler.from_config(
            config, solver_order=o, use_karras_sigmas=True))
    rows["diffusers DPM++2M lu"] = ("diffusers", lambda: DPMSolverMultistepScheduler.from_config(
        config, solver_order=2, use_lu_lambdas=True))
    for o in (2, 3):
        rows[f"diffusers UniPC bh2 o{o}"] = ("diffusers", lambda o=o: UniPCMultistepScheduler.from_config(
            config, solver_order=o, solver_type="bh2"))
    rows["diffusers DEIS o2"] = ("diffusers", lambda: DEISMultistepScheduler.from_config(config, solver_order=2))
    for o in (2, 3):
        for sp in ("logsnr", "karras"):
            rows[f"fewstep DPM++{o}M {sp}"] = ("fewstep", lambda o=o, sp=sp: DPMSolverPPScheduler.from_config(
                config, solver_order=o, timestep_spacing=sp, round_timesteps=False))
    tag = " (degenerated)" if degenerated else ""
    v3 = {
        "v3 o3 logsnr": dict(solver_order=3, timestep_spacing="logsnr"),
        "v3 o3 logsnr clip": dict(solver_order=3, timestep_spacing="logsnr", lambda_min_clipped=LAMBDA_CLIP),
        "v3 o2 trailing": dict(solver_order=2, timestep_spacing="trailing"),
        "v3 o3 trailing": dict(solver_order=3, timestep_spacing="trailing"),
    }
    for name, kw in v3.items():
        if degenerated:
            rows[name + tag] = ("v3", lambda kw=kw: DPMSolverV3Scheduler.from_config(config, degenerated=True, **kw))
        else:
            rows[name] = ("v3", lambda kw=kw: DPMSolverV3Scheduler.from_config(config, ems=ems, **kw))
    # the same solver without EMS (l=1, s=0, b=0): what the statistics themselves contribute
    rows["v3 o3 trailing no-EMS"] = ("v3 without EMS", lambda: DPMSolverV3Scheduler.from_config(
        config, degenerated=True, solver_order=3, timestep_spacing="trailing"))
    rows["v3 o2 trailing no-EMS"] = ("v3 without EMS", lambda: DPMSolverV3Scheduler.from_config(
        config, degenerated=True, solver_order=2, timestep_spacing="trailing"))
    # v3's defaults (what from_config(pipe.scheduler.config, ems=...) gives: time_power_zero 1.5, order 3,
    # corrector), the same without EMS, and the time_power_zero family (issue 10, docs/dpm-v3.md)
    if not degenerated:
        rows["v3 default"] = ("v3", lambda: DPMSolverV3Scheduler.from_config(config, ems=ems))
    rows["v3 default no-EMS"] = ("v3 without EMS", lambda: DPMSolverV3Scheduler.from_config(
        config, degenerated=True, round_timesteps=False))
    for p in (1.0, 1.5, 2.0):
        for o in (2, 3):
            kw = dict(solver_order=o, timestep_spacing="time_power_zero", timestep_power=p)
            if not degenerated:
                rows[f"v3 o{o} tpz{p:g}"] = ("v3", lambda kw=kw: DPMSolverV3Scheduler.from_config(
                    config, ems=ems, **kw))
            rows[f"v3 o{o} tpz{p:g} no-EMS"] = ("v3 without EMS", lambda kw=kw: DPMSolverV3Scheduler.from_config(
                config, degenerated=True, round_timesteps=False, **kw))
    # the searched grids, with v3 and with the other solvers on exactly the same (EMS-snapped) points:
    # v3 vs DPM++ / UniPC on one grid separates the solver's gain from the grid's
    if degenerated:
        return rows
    from grid_families import grid_fn

    from fewstep.samplers import EMS
    from fewstep.samplers.ems import resolve_ems_path
    from fewstep.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_config(config)
    snap_to = ems if isinstance(ems, EMS) else EMS.load(resolve_ems_path(ems))  # digits and -cfg2 share the grid
    for gname, (fam, par) in TUNED_GRIDS.items():
        grid = grid_fn(snap_to, schedule, fam, **par)
        orders = (2, 3) if gname == "logsnr[-3,2.5]" else (2,)
        for o in orders:
            rows[f"v3 o{o} {gname}"] = ("v3", lambda o=o: DPMSolverV3Scheduler.from_config(
                config, ems=ems, solver_order=o), grid)
        rows[f"v3 o2 {gname} no-EMS"] = ("v3 without EMS", lambda: DPMSolverV3Scheduler.from_config(
            config, degenerated=True, solver_order=2, round_timesteps=False), grid)
        for o in orders:
            rows[f"fewstep DPM++{o}M {gname}"] = ("fewstep", lambda o=o: DPMSolverPPScheduler.from_config(
                config, solver_order=o, round_timesteps=False), grid)
        for o in orders:
            rows[f"diffusers UniPC bh2 o{o} {gname}"] = (TUNED_GROUP, lambda o=o: UniPCMultistepScheduler.from_config(
                config, solver_order=o, solver_type="bh2"), grid)
    return rows


def load_teacher():
    """The digits teacher as ``model(x, t, c) -> v`` plus its scheduler config (a dict)."""
    from fewstep.models import load_digits_pipeline
    from fewstep.models.adapters import denoiser
    from fewstep.models.pipeline import NULL_CLASS, load_digits_scheduler_config

    config = dict(load_digits_scheduler_config())
    return denoiser(load_digits_pipeline().unet.eval(), null_class=NULL_CLASS), config


def start_noise(n: int, seed: int):
    """``(noise, labels, null)``: ``n`` start noises from ``seed``, labels balanced over the ten classes."""
    from fewstep.models.pipeline import NULL_CLASS

    if n < 10 or n % 10:
        raise ValueError(f"--n must be a positive multiple of 10, got {n}")
    labels = torch.arange(10).repeat_interleave(n // 10)
    null = torch.full_like(labels, NULL_CLASS)
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return noise, labels, null


def install_grid(sched, timesteps, schedule) -> None:
    """Put explicit model times ``timesteps`` (training scale, decreasing, floats allowed; the grid
    ends at sigma = 0 after the last one) on ``sched``. fewstep schedulers take them through
    ``set_timesteps(timesteps=...)``; diffusers' multistep schedulers of this version take no float
    ``timesteps=`` (UniPC: neither ``timesteps=`` nor, for VP models, ``sigmas=``), so for them
    ``set_timesteps(n)`` is called and its ``timesteps`` / ``sigmas`` (VE ``sigma/alpha`` of
    ``schedule``, then 0) are replaced in place -- the state their ``step`` reads."""
    t = np.asarray(timesteps, dtype=np.float64)
    if hasattr(sched, "_plan"):  # a FewstepScheduler
        sched.set_timesteps(timesteps=t)
        return
    sched.set_timesteps(len(t))
    sig = np.append(np.asarray(schedule.sigma_ve(t), dtype=np.float64), 0.0)
    sched.timesteps = torch.from_numpy(t.astype(np.float32))
    sched.sigmas = torch.from_numpy(sig.astype(np.float32))
    sched.num_inference_steps = len(t)


def solve(model, sched, steps, w, noise, labels, null, grid=None, schedule=None):
    """Sample ``noise`` with ``sched`` for ``steps`` steps at guidance ``w``; ``grid`` (a callable
    ``n -> model times``) replaces the scheduler's own grid (see :func:`install_grid`)."""
    from fewstep.sample import sample

    # start at grid index 0 even when the first rounded model times repeat (lambda grids on the
    # cosine schedule give 999, 999, ... / diffusers Karras 998 x 4; both libraries' default
    # "second match of a repeated time" lookup then skips the first point and fails)
    set_ts = sched.set_timesteps

    def set_timesteps(*a, **k):
        if grid is None:
            set_ts(*a, **k)
        else:
            sched.set_timesteps = set_ts
            install_grid(sched, grid(steps), schedule)
            sched.set_timesteps = set_timesteps
        sched.set_begin_index(0)

    sched.set_timesteps = set_timesteps
    with torch.inference_mode():
        x, nfe = sample(model, noise, sched, steps, guidance=w, cond=labels, uncond=null)
    assert nfe == steps * (2 if w > 1 else 1), (nfe, steps, w)
    return x.float()


def reference(model, config, w, noise, labels, null, steps: int = 1000):
    """The reference solve: fewstep DPM++ 2M on the trailing grid with ``steps`` steps."""
    from fewstep.samplers import DPMSolverPPScheduler

    ref_sched = DPMSolverPPScheduler.from_config(config, solver_order=2, timestep_spacing="trailing")
    return solve(model, ref_sched, steps, w, noise, labels, null)


def rmse_to(x, ref) -> float:
    """Root-mean-square difference of two sample batches (model units)."""
    return float(((x - ref) ** 2).mean().sqrt())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="samples (multiple of 10, balanced over classes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    ap.add_argument("--ref-steps", type=int, default=1000)
    ap.add_argument("--ref-check", type=int, default=0,
                    help="also solve the first K samples with 3M on a 1000-point logSNR grid (float times)")
    ap.add_argument("--allow-degenerated", action="store_true",
                    help="run the v3 rows degenerated (no EMS) when the EMS file is missing (dry runs only)")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of row names to run (default: all)")
    ap.add_argument("--ems", nargs="*", default=[], metavar="W=PATH",
                    help="EMS file per guidance scale instead of the shipped set, e.g. 1=/tmp/ems.safetensors")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    ems_override = dict(item.split("=", 1) for item in args.ems)
    if args.n < 10 or args.n % 10:
        raise ValueError(f"--n must be a positive multiple of 10, got {args.n}")
    torch.set_num_threads(args.threads)
    command = "python benchmarks/dpm_v3_digits.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    import diffusers

    from fewstep.eval.fd_digits import DigitsFeatures, fd_digits
    from fewstep.models import load_digits_split
    from fewstep.samplers import EMS, DPMSolverPPScheduler
    from fewstep.samplers.ems import resolve_ems_path

    warnings.filterwarnings("ignore", message=r"only \d+ generated images")  # FD at N < 128 (dry runs)
    model, config = load_teacher()
    schedule = NoiseSchedule.from_config(config)
    extractor = DigitsFeatures()
    x_test, _ = load_digits_split("test")
    noise, labels, null = start_noise(args.n, args.seed)

    # timing of one UNet pass at batch N (the unit of cost)
    with torch.inference_mode():
        model(noise, 500.0, labels)
        t0 = time.perf_counter()
        for _ in range(3):
            model(noise, 500.0, labels)
    unet_s = (time.perf_counter() - t0) / 3
    print(f"one UNet pass at batch {args.n}: {unet_s * 1e3:.0f} ms", flush=True)

    def run(sched, steps, w, x0=noise, lab=labels, nul=null, grid=None):
        return solve(model, sched, steps, w, x0, lab, nul, grid=grid, schedule=schedule)

    def quality(x):
        res = fd_digits((x.clamp(-1, 1) + 1) / 2, labels=labels, extractor=extractor, reference=x_test)
        return res["fd"], res["accuracy"]

    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    prev_n, prev_seed, prev_nfe, prev_ref = (result.get(k) for k in ("n", "seed", "nfe", "reference"))
    result.update({
        "protocol": __doc__.split("\n\n")[2].replace("\n", " "),
        "nfe": args.nfe, "n": args.n, "seed": args.seed, "threads": args.threads,
        "reference": f"fewstep DPMSolverPPScheduler 2M, trailing grid, {args.ref_steps} steps",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "target": f"RMSE(v3) <= {TARGET_RATIO} x RMSE(best diffusers) at NFE {list(TARGET_NFES)}",
    })
    result.setdefault("guidance", {})
    for w in args.guidance:
        t_w = time.perf_counter()
        ems_name = ems_override.get(f"{w:g}", EMS_FOR.get(float(w)))
        degenerated = False
        ems_meta = None
        try:
            ems = EMS.load(resolve_ems_path(ems_name)) if ems_name else None
            if ems is None:
                raise FileNotFoundError(f"no shipped EMS for w={w:g}")
            ems_meta = {k: ems.metadata.get(k) for k in ("num_grid", "num_samples", "guidance_scale", "t_range",
                                                         "model_id", "seconds") if k in ems.metadata}
            ems_meta["name"] = ems_name
            if ems.metadata.get("guidance_scale") not in (None, float(w)) and not (
                    w == 1 and ems.metadata.get("guidance_scale") in (None, 1, 1.0)):
                print(f"WARNING: EMS {ems_name} was computed at guidance {ems.metadata.get('guidance_scale')}, "
                      f"sampling at w={w:g}", flush=True)
        except FileNotFoundError as err:
            if not args.allow_degenerated:
                raise
            print(f"w={w:g}: {err}; v3 rows run degenerated (dry run)", flush=True)
            ems, degenerated = None, True
        print(f"\n=== w = {w:g} (EMS: {ems_name if not degenerated else 'none, degenerated'}) ===", flush=True)
        t0 = time.perf_counter()
        ref = reference(model, config, w, noise, labels, null, args.ref_steps)
        ref_s = time.perf_counter() - t0
        ref_fd, ref_acc = quality(ref)
        print(f"reference ({args.ref_steps} steps, {ref_s:.0f} s): FD {ref_fd:.3f}, acc {ref_acc:.3f}", flush=True)
        entry = {"ems": ems_meta, "degenerated_v3": degenerated, "reference_fd": ref_fd, "reference_accuracy": ref_acc,
                 "reference_seconds": round(ref_s, 1), "unet_pass_seconds": round(unet_s, 4), "rows": {}}
        if args.ref_check:
            k = min(args.ref_check, args.n)
            chk = DPMSolverPPScheduler.from_config(config, solver_order=3, timestep_spacing="logsnr",
                                                   round_timesteps=False)
            alt = run(chk, 1000, w, noise[:k], labels[:k], null[:k])
            entry["reference_check"] = {"k": k, "alt": "fewstep DPM++3M logsnr 1000 steps, float model times",
                                        "rmse_between_references": float(((alt - ref[:k]) ** 2).mean().sqrt())}
            print(f"reference check on {k} samples: RMSE(2M trailing-1000, 3M logsnr-1000) = "
                  f"{entry['reference_check']['rmse_between_references']:.2e}", flush=True)
        rows = make_rows(config, ems, degenerated)
        order = list(rows)
        if args.only:
            rows = {k: v for k, v in rows.items() if any(s in k for s in args.only)}
            # keep the rows of an earlier run of the same protocol, so the summary still sees them
            old = result["guidance"].get(f"{w:g}")
            if old is not None:
                same = (result.get("n"), result.get("seed"), result.get("nfe"), result.get("reference")) == (
                    prev_n, prev_seed, prev_nfe, prev_ref)
                if not same:
                    raise ValueError(f"--only merges into {out_path}, which holds N={prev_n}, seed={prev_seed}, "
                                     f"NFE {prev_nfe}, reference {prev_ref!r}; run with the same --n/--seed/--nfe/"
                                     "--ref-steps or another --out")
                entry["rows"] = {k: v for k, v in old.get("rows", {}).items() if k not in rows}
                for k, v in old.items():  # e.g. the reference check of the earlier run
                    entry.setdefault(k, v)
                entry["earlier_commands"] = old.get("earlier_commands", []) + [old.get("command")]
        for name, spec in rows.items():
            group, make = spec[:2]
            grid = spec[2] if len(spec) > 2 else None
            t0 = time.perf_counter()
            rec = {"group": group, "rmse": [], "fd": [], "accuracy": []}
            for n in args.nfe:
                try:
                    x = run(make(), n, w, grid=grid)
                    if not torch.isfinite(x).all():
                        raise FloatingPointError("non-finite sample")
                    rmse = rmse_to(x, ref)
                    fd, acc = quality(x)
                except Exception as err:  # noqa: BLE001 - record and go on (a failing config is a result)
                    rec.setdefault("errors", {})[str(n)] = f"{type(err).__name__}: {err}"
                    rmse = fd = acc = float("nan")
                rec["rmse"].append(rmse)
                rec["fd"].append(fd)
                rec["accuracy"].append(acc)
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            entry["rows"][name] = rec
            print(f"{name:<28} RMSE " + " ".join(f"{e:.4f}" for e in rec["rmse"]) + "  FD "
                  + " ".join(f"{e:.2f}" for e in rec["fd"]) + f"  ({rec['seconds']:.0f} s)"
                  + (f"  errors: {rec['errors']}" if "errors" in rec else ""), flush=True)
        # table order = make_rows order, whichever rows were run now and which were kept
        entry["rows"] = {k: entry["rows"][k] for k in sorted(
            entry["rows"], key=lambda k: order.index(k) if k in order else len(order))}
        summarize(entry, args.nfe)
        entry["seconds"] = round(time.perf_counter() - t_w, 1)
        entry["command"] = command
        result["guidance"][f"{w:g}"] = entry
        print_tables(w, entry, args.nfe, args.n)
    result["command"] = command
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    print(f"wrote {out_path}")
    return result


def _nanmin(vals):
    vals = [v for v in vals if not math.isnan(v)]
    return min(vals) if vals else float("nan")


def summarize(entry: dict, nfes: list[int]) -> None:
    rows = entry["rows"]
    groups = {}
    for name, r in rows.items():
        groups.setdefault(r["group"], []).append(name)

    def best(group, key):
        names = groups.get(group, [])
        out, who = [], []
        for i in range(len(nfes)):
            vals = {k: rows[k][key][i] for k in names if not math.isnan(rows[k][key][i])}
            k = min(vals, key=vals.get) if vals else None
            out.append(vals[k] if k else float("nan"))
            who.append(k)
        return out, who

    s = {}
    for g in ("diffusers", "fewstep", "v3", TUNED_GROUP):  # NaN where a group has no rows (--only)
        for key in ("rmse", "fd"):
            s[f"best {g} {key}"], s[f"best {g} {key} row"] = best(g, key)
    main = next((k for k in rows if k.startswith(V3_MAIN) and k[len(V3_MAIN):] in ("", " (degenerated)")), None)
    bd = s["best diffusers rmse"]
    if main:
        s["v3 main row"] = main
        s["ratio v3 main / best diffusers (rmse)"] = [rows[main]["rmse"][i] / bd[i] for i in range(len(nfes))]
    s["ratio best v3 / best diffusers (rmse)"] = [s["best v3 rmse"][i] / bd[i] for i in range(len(nfes))]
    s["target met (best v3)"] = {str(n): bool(s["ratio best v3 / best diffusers (rmse)"][i] <= TARGET_RATIO)
                                 for i, n in enumerate(nfes) if n in TARGET_NFES}
    if main:
        s["target met (v3 main)"] = {str(n): bool(s["ratio v3 main / best diffusers (rmse)"][i] <= TARGET_RATIO)
                                     for i, n in enumerate(nfes) if n in TARGET_NFES}
    if V3_TUNED in rows:  # the searched grid: one fixed setting for all NFE
        r = rows[V3_TUNED]["rmse"]
        s["ratio v3 tuned / best diffusers (rmse)"] = [r[i] / bd[i] for i in range(len(nfes))]
        s["target met (v3 tuned)"] = {str(n): bool(s["ratio v3 tuned / best diffusers (rmse)"][i] <= TARGET_RATIO)
                                      for i, n in enumerate(nfes) if n in TARGET_NFES}
        # same grid, other solver: what v3 itself adds on that grid
        for other in ("diffusers UniPC bh2 o2", "fewstep DPM++2M"):
            name = f"{other} {V3_TUNED[len('v3 o2 '):]}"
            if name in rows:
                s[f"ratio v3 tuned / {name} (rmse)"] = [r[i] / rows[name]["rmse"][i] for i in range(len(nfes))]
        if f"{V3_TUNED} no-EMS" in rows:
            s["ratio v3 tuned / same without EMS (rmse)"] = [
                r[i] / rows[f"{V3_TUNED} no-EMS"]["rmse"][i] for i in range(len(nfes))]
    if "v3 default" in rows:  # what from_config(config, ems=...) gives (docs/dpm-v3.md)
        d = rows["v3 default"]["rmse"]
        s["ratio v3 default / best diffusers (rmse)"] = [d[i] / bd[i] for i in range(len(nfes))]
    # issue 10: what the EMS contribute, each v3 row against the same solver and grid without EMS
    s["EMS gain: v3 / same without EMS (rmse)"] = {
        k: [rows[k]["rmse"][i] / rows[f"{k} no-EMS"]["rmse"][i] for i in range(len(nfes))]
        for k in rows if f"{k} no-EMS" in rows}
    entry["summary"] = s


def print_tables(w: float, entry: dict, nfes: list[int], n: int) -> None:
    rows, s = entry["rows"], entry["summary"]
    head = "| {} | " + " | ".join(f"NFE {k}" for k in nfes) + " |"
    sep = "|---|" + "---:|" * len(nfes)
    for key, label, fmt in (("rmse", f"RMSE to the 1000-step reference, w={w:g}, N={n}", "{:.4f}"),
                            ("fd", f"FD-digits (reference solve: {entry['reference_fd']:.3f}), w={w:g}, N={n}",
                             "{:.2f}")):
        print()
        print(head.format(label))
        print(sep)
        for name, r in rows.items():
            vals = r[key]
            cells = []
            for i, v in enumerate(vals):
                c = "NaN" if math.isnan(v) else fmt.format(v)
                cells.append(c)
            print(f"| {name} | " + " | ".join(cells) + " |")
        for g in ("diffusers", "fewstep", "v3", TUNED_GROUP):
            if f"best {g} {key}" in s:
                print(f"| **best {g}** | " + " | ".join(fmt.format(v) for v in s[f"best {g} {key}"]) + " |")
        if key == "rmse":
            if "v3 main row" in s:
                print(f"| {s['v3 main row']} / best diffusers | "
                      + " | ".join(f"{v:.3f}" for v in s["ratio v3 main / best diffusers (rmse)"]) + " |")
            for k in s:
                if k.startswith("ratio v3 tuned"):
                    print(f"| {k[len('ratio '):-len(' (rmse)')]} | " + " | ".join(f"{v:.3f}" for v in s[k]) + " |")
            if "ratio v3 default / best diffusers (rmse)" in s:
                print("| v3 default / best diffusers | "
                      + " | ".join(f"{v:.3f}" for v in s["ratio v3 default / best diffusers (rmse)"]) + " |")
            for k, v in s.get("EMS gain: v3 / same without EMS (rmse)", {}).items():
                print(f"| {k} / {k} no-EMS | " + " | ".join(f"{x:.3f}" for x in v) + " |")
            print("| best v3 / best diffusers | "
                  + " | ".join(f"{v:.3f}" for v in s["ratio best v3 / best diffusers (rmse)"]) + " |")
    print()
    print("best diffusers row per NFE (RMSE): " + ", ".join(
        f"{k}: {r}" for k, r in zip(nfes, s["best diffusers rmse row"])))
    print("best v3 row per NFE (RMSE): " + ", ".join(f"{k}: {r}" for k, r in zip(nfes, s["best v3 rmse row"])))
    for tag in ("v3 main", "best v3", "v3 tuned"):
        key = f"target met ({tag})"
        if key in s:
            print(f"target (ratio <= {TARGET_RATIO}) {tag}: " + ", ".join(
                f"NFE {k}: {'met' if v else 'MISSED'}" for k, v in s[key].items()))
    acc = {name: min(r["accuracy"]) for name, r in rows.items()}
    print(f"class accuracy: reference {entry['reference_accuracy']:.3f}; min over NFE per row: "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
