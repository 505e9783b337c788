"""Record the outputs of every digits sampling path, to prove a refactor left them unchanged.

Records, with fixed seeds, (1) ``DigitsPipeline`` outputs for several diffusers and fewstep
schedulers at guidance 0.5, 1, 2 and 3, (2) ``fewstep.sample`` on the teacher UNet with guidance
objects (CFG, APG, CFG++, AG, rescale) through a plain ``model(x, t, c)`` callable and (3) the PNGs
and records of ``fewstep sample`` (every guidance method, several schedulers, batch splits). It
uses only the public API, so the same file runs against an older checkout::

    PYTHONPATH=/path/to/old/checkout python benchmarks/sampling_equality.py record /tmp/eq/before
    PYTHONPATH=$PWD python benchmarks/sampling_equality.py record /tmp/eq/after
    python benchmarks/sampling_equality.py compare /tmp/eq/before /tmp/eq/after

``compare`` prints one line per output (bit-identical, or the max absolute difference) and saves
the table to ``benchmarks/results/sampling_equality.json`` (``--out``); it exits 1 when anything
differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "sampling_equality.json"
LABELS = list(range(10))
STEPS = 6

CLI_RUNS = {
    "dpmpp-2m_cfg2": ["--scheduler", "dpmpp-2m", "--guidance", "cfg:2.0"],
    "dpmpp-2m_none": ["--scheduler", "dpmpp-2m", "--guidance", "none"],
    "dpmpp-2m_cfg1": ["--scheduler", "dpmpp-2m", "--guidance", "cfg:1.0"],
    "dpmpp-3m_cfg3_batches": ["--scheduler", "dpmpp-3m", "--guidance", "cfg:3", "--batch-size", "7"],
    "euler_cfg2": ["--scheduler", "euler", "--guidance", "cfg:2"],
    "unipc_cfg2": ["--scheduler", "unipc", "--guidance", "cfg:2"],
    "dpmpp-2m-sde_cfg2": ["--scheduler", "dpmpp-2m-sde", "--guidance", "cfg:2", "--seed", "3"],
    "dpm-v3_cfg2": ["--scheduler", "dpm-v3", "--guidance", "cfg:2"],
    "dpm-v3_none": ["--scheduler", "dpm-v3", "--guidance", "none"],
    "apg": ["--scheduler", "dpmpp-2m", "--guidance", "apg:scale=3,eta=0,momentum=-0.5"],
    "apg_eta1": ["--scheduler", "dpmpp-2m", "--guidance", "apg:scale=2,eta=1"],
    "cfgpp_ddim": ["--scheduler", "ddim", "--guidance", "cfgpp:0.6"],
    "ag": ["--scheduler", "dpmpp-2m", "--guidance", "ag:scale=2,threshold=0.99"],
    "rescale": ["--scheduler", "dpmpp-2m", "--guidance", "rescale:phi=0.7,scale=3"],
    "apg_batches": ["--scheduler", "dpmpp-2m", "--guidance", "apg:scale=3", "--batch-size", "6"],
}


def _gen(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def _pipeline_cases(pipe):
    """name -> (scheduler factory, kwargs of the pipeline call)."""
    import diffusers

    from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler

    cfg = pipe.scheduler.config
    scheds = {
        "diffusers-dpm2m": lambda: diffusers.DPMSolverMultistepScheduler.from_config(cfg),
        "diffusers-ddim": lambda: diffusers.DDIMScheduler.from_config(cfg),
        "diffusers-euler": lambda: diffusers.EulerDiscreteScheduler.from_config(cfg),
        "diffusers-unipc": lambda: diffusers.UniPCMultistepScheduler.from_config(cfg),
        "diffusers-ddpm": lambda: diffusers.DDPMScheduler.from_config(cfg),
        "fewstep-dpmpp2m": lambda: DPMSolverPPScheduler.from_config(cfg),
        "fewstep-dpmpp3m-sde": lambda: DPMSolverPPScheduler.from_config(cfg, solver_order=3,
                                                                        algorithm_type="sde-dpmsolver++"),
        "fewstep-v3": lambda: DPMSolverV3Scheduler.from_config(cfg, ems="digits-cfg2"),
    }
    cases = {}
    for sname, make in scheds.items():
        for w in (0.5, 1.0, 2.0, 3.0):
            cases[f"pipe/{sname}/w{w:g}"] = (make, dict(guidance_scale=w))
    cases["pipe/diffusers-ddim/eta0.5"] = (scheds["diffusers-ddim"], dict(guidance_scale=2.0, eta=0.5))
    return cases


def record(out: Path) -> None:
    import torch

    from fewstep import sample
    from fewstep.apps.cli import main as cli_main
    from fewstep.guidance import APG, CFG, AdaptiveGuidance, CFGPlusPlus, GuidanceRescale
    from fewstep.models import DigitsPipeline, load_digits_pipeline
    from fewstep.samplers import DPMSolverPPScheduler

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    pipe = load_digits_pipeline()
    for name, (make, kw) in _pipeline_cases(pipe).items():
        p = DigitsPipeline(unet=pipe.unet, scheduler=make())
        p.set_progress_bar_config(disable=True)
        res = p(LABELS, num_inference_steps=STEPS, generator=_gen(7), output_type="pt", **kw)
        tensors[name] = res.images
        tensors[name + "/nfe"] = torch.tensor(res.nfe)
    # generator list, given latents, np output with upscale
    p = load_digits_pipeline()
    gens = [_gen(s) for s in range(3)]
    tensors["pipe/default/genlist"] = p([1, 2, 3], num_inference_steps=STEPS, generator=gens, output_type="pt").images
    lat = torch.randn(2, 1, 8, 8, generator=_gen(11))
    tensors["pipe/default/latents"] = p([4, 5], num_inference_steps=STEPS, latents=lat, output_type="pt").images
    tensors["pipe/default/np-up4"] = torch.from_numpy(
        p([6], num_inference_steps=STEPS, generator=_gen(2), output_type="np", upscale=4).images)

    # fewstep.sample over a plain callable (no adapter): guidance objects
    unet = pipe.unet

    def model(x, t, c):
        return unet(x, t, class_labels=c).sample

    y = torch.tensor(LABELS)
    null = torch.full_like(y, 10)
    noise = torch.randn(10, 1, 8, 8, generator=_gen(5))
    rules = {"cfg2": CFG(2.0), "num2": 2.0, "num1": 1.0, "apg": APG(3.0, momentum=-0.5), "cfgpp": CFGPlusPlus(0.6),
             "ag": AdaptiveGuidance(2.0, threshold=0.99), "rescale": GuidanceRescale(0.7, scale=3.0)}
    with torch.no_grad():
        for name, g in rules.items():
            sched = DPMSolverPPScheduler.from_config(pipe.scheduler.config, solver_order=1 if name == "cfgpp" else 2)
            x, nfe = sample(model, noise, sched, STEPS, guidance=g, cond=y, uncond=null)
            tensors[f"sample/{name}"] = x
            tensors[f"sample/{name}/nfe"] = torch.tensor(nfe)
    torch.save(tensors, out / "tensors.pt")

    for name, argv in CLI_RUNS.items():
        folder = out / "cli" / name
        rc = cli_main(["sample", "--model", "digits", "--steps", str(STEPS), "--labels", "0-9", "--n", "12",
                       "--device", "cpu", "--no-progress", "--out", str(folder)] + argv)
        if rc != 0:
            raise SystemExit(f"fewstep sample {name} failed with exit code {rc}")
    print(f"recorded {len(tensors)} tensors and {len(CLI_RUNS)} CLI runs in {out}")


def _record_view(path: Path) -> dict:
    rec = json.loads(path.read_text())
    rec.pop("wall_time_s", None)
    rec.pop("versions", None)
    return rec


def compare(before: Path, after: Path, out: Path) -> int:
    import torch
    from PIL import Image

    a, b = torch.load(before / "tensors.pt"), torch.load(after / "tensors.pt")
    rows = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            rows.append({"name": name, "equal": False, "max_abs_diff": None, "note": "missing on one side"})
            continue
        x, y = a[name], b[name]
        same = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        diff = None if x.shape != y.shape else float((x.double() - y.double()).abs().max())
        rows.append({"name": name, "equal": bool(same), "max_abs_diff": diff})
    for name in CLI_RUNS:
        fa, fb = before / "cli" / name, after / "cli" / name
        ra, rb = _record_view(fa / "record.json"), _record_view(fb / "record.json")
        files = ra["images"] + ["grid.png"]
        worst, same = 0, ra == rb
        for f in files:
            pa = np.asarray(Image.open(fa / f), dtype=np.int16)
            pb = np.asarray(Image.open(fb / f), dtype=np.int16)
            worst = max(worst, int(np.abs(pa - pb).max()) if pa.shape == pb.shape else 255)
            same = same and pa.shape == pb.shape and np.array_equal(pa, pb)
        rows.append({"name": f"cli/{name}", "equal": bool(same), "max_abs_diff": worst,
                     **({} if ra == rb else {"note": "record.json differs"})})
    for r in rows:
        status = "bit-identical" if r["equal"] else f"DIFFERS (max |diff| {r['max_abs_diff']}) {r.get('note', '')}"
        print(f"{r['name']:<40} {status}")
    n_eq = sum(r["equal"] for r in rows)
    print(f"{n_eq}/{len(rows)} outputs bit-identical")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"before": str(before), "after": str(after), "rows": rows,
                               "identical": n_eq, "total": len(rows)}, indent=2) + "\n")
    return 0 if n_eq == len(rows) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="record every output into DIR")
    r.add_argument("dir")
    c = sub.add_parser("compare", help="compare two recordings")
    c.add_argument("before")
    c.add_argument("after")
    c.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.cmd == "record":
        record(Path(args.dir))
        return 0
    return compare(Path(args.before), Path(args.after), Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
