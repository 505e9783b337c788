"""Training of the bundled digits teacher and digits classifier (deterministic, resumable).

Both trainers take a config dict (defaults below, copied in ``configs/digits_teacher.json``) and
a seed, train on the ``"train"`` split of :func:`fewstep.models.digits.load_digits_split` only,
run single-threaded on CPU by default (``torch.set_num_threads(1)``) so that a rerun with the
same config and seed reproduces the shipped weights (to float rounding: a later rerun
with the same torch differed by at most 6e-6 per weight), show a tqdm progress bar, and write a
checkpoint every ``checkpoint_every`` steps into ``work_dir`` so that an interrupted run resumes
where it stopped (the checkpoint stores model, EMA, optimiser, step and RNG states). The teacher
trainer also keeps weight snapshots along the run (``work_dir/checkpoints/step-NNNNNN/``, the layout
of :mod:`fewstep.distill.checkpoints`) and the final EMA as a diffusers folder ``work_dir/final/``,
so ``fewstep lcsc --run work_dir`` can combine them (LCSC on a diffusion model).

Teacher objective: v-prediction (Salimans & Ho 2022, "Progressive Distillation", Sec. 4 and
App. D): with ``x_t = alpha_t x0 + sigma_t eps`` the network predicts
``v = alpha_t eps - sigma_t x0`` and is trained with the plain MSE on ``v``. Labels are replaced
by the null class 10 with probability ``label_dropout`` for classifier-free guidance
(Ho & Salimans 2022).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._io import atomic_path, atomic_paths, check_output_dir, read_checkpoint
from .digits import NUM_CLASSES, load_digits_split

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: default output folders of the trainers (user folders: the package's weights/ is never written
#: unless asked for explicitly)
TEACHER_OUTPUT_DIR = "out/teacher"
CLASSIFIER_OUTPUT_DIR = "out/classifier"
NULL_CLASS = NUM_CLASSES  # class id 10 = unconditional

DEFAULT_TEACHER_CONFIG: dict[str, Any] = {
    "seed": 0,
    "num_threads": 1,
    "steps": 5000,
    "batch_size": 128,
    "lr": 1e-3,
    "lr_warmup_steps": 200,
    "lr_final_fraction": 0.05,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "label_dropout": 0.1,
    "checkpoint_every": 500,
    "unet": {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
        "add_attention": False,
        "num_class_embeds": NUM_CLASSES + 1,
        "norm_num_groups": 16,
        "dropout": 0.0,
    },
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "timestep_spacing": "trailing",
    },
}

DEFAULT_CLASSIFIER_CONFIG: dict[str, Any] = {
    "seed": 0,
    "num_threads": 1,
    "epochs": 60,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "max_shift": 1,
    "noise_std": 0.05,
    "width": 32,
    "feature_dim": 128,
    "checkpoint_every": 10,
}


def _merge(defaults: dict, overrides: dict | None) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in (overrides or {}).items():
        if key not in out:
            raise ValueError(f"config has unknown key {key!r}; allowed: {sorted(out)}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _save_checkpoint(path: Path, cfg: dict, objects: dict, gen: torch.Generator, **extra) -> None:
    """Atomically write a resumable checkpoint: ``cfg``, the ``state_dict()`` of every object in
    ``objects`` (model, EMA, optimiser, LR scheduler, ...), the data generator's and torch's RNG
    states and ``extra`` counters (step/epoch, losses, elapsed seconds)."""
    state = {"config": cfg, **{k: o.state_dict() for k, o in objects.items()}, "gen": gen.get_state(),
             "torch_rng": torch.get_rng_state(), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume_checkpoint(path: Path, cfg: dict, objects: dict, gen: torch.Generator) -> dict | None:
    """Restore what :func:`_save_checkpoint` wrote (objects, RNG states) and return the whole
    state for its counters; ``None`` when there is no checkpoint. A checkpoint made with another
    config is a ``ValueError`` (continuing it would silently mix two runs)."""
    if not path.exists():
        return None
    state = read_checkpoint(path, lambda f: torch.load(f, map_location="cpu", weights_only=False))
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"{path} is not a training checkpoint of fewstep; delete it (rm {path}) to start over")
    if state["config"] != cfg:
        raise ValueError(f"checkpoint {path} was made with a different config; remove it or pass work_dir")
    for k, o in objects.items():
        o.load_state_dict(state[k])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    return state


def _json_config(config) -> dict:
    """A diffusers ``config`` as a JSON-ready dict: tuples as lists, private ``_`` keys dropped."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def _lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up then cosine decay to ``lr * lr_final_fraction``."""
    base, warm, total = cfg["lr"], cfg["lr_warmup_steps"], cfg["steps"]
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    final = base * cfg["lr_final_fraction"]
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def build_teacher_unet(unet_config: dict):
    """Build the (untrained) digits ``UNet2DModel`` from its config dict."""
    from diffusers import UNet2DModel

    cfg = dict(unet_config)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return UNet2DModel(**cfg)


def train_teacher(
    config: dict | None = None,
    seed: int | None = None,
    work_dir: str | os.PathLike = "out/train_teacher",
    output_dir: str | os.PathLike = TEACHER_OUTPUT_DIR,
    progress: bool = True,
    snapshot_every: int | None = None,
) -> dict:
    """Train the class-conditional v-prediction digits teacher and write its files.

    ``config`` overrides :data:`DEFAULT_TEACHER_CONFIG` (unknown keys raise ``ValueError``);
    ``seed`` overrides ``config["seed"]``. Checkpoints go to ``work_dir/checkpoint.pt`` (resumed
    automatically when present and made with the same config). At the end the EMA weights are
    written to ``output_dir`` (default ``out/teacher``; it is created and checked for writability
    before training) as ``digits_unet.safetensors``, ``digits_unet_config.json`` and
    ``digits_scheduler_config.json``, plus ``digits_teacher_train.json`` (config, seed, final loss,
    wall time), as one unit (all four complete before any is renamed into place, the record last).
    Pass :data:`WEIGHTS_DIR` to replace the shipped teacher. Every ``snapshot_every`` steps
    (default ``checkpoint_every``; 0: none) the raw and EMA weights are kept in
    ``work_dir/checkpoints/step-NNNNNN/`` (``teacher.safetensors``, ``teacher_ema.safetensors``,
    ``meta.json``), and the final EMA is also written to ``work_dir/final/`` (a diffusers
    ``UNet2DModel`` folder): the inputs of LCSC (:mod:`fewstep.distill.lcsc`). Snapshots are not part
    of the config, so they never change the weights. Returns the record.
    """
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    cfg = _merge(DEFAULT_TEACHER_CONFIG, config)
    if seed is not None:
        cfg["seed"] = int(seed)
    if cfg["steps"] < 1:
        raise ValueError(f"steps must be >= 1, got {cfg['steps']}")
    if not 0.0 <= cfg["label_dropout"] < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {cfg['label_dropout']}")
    snapshot_every = cfg["checkpoint_every"] if snapshot_every is None else snapshot_every
    if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 0:
        raise ValueError(f"snapshot_every must be an integer >= 0 (0: no snapshots), got {snapshot_every!r}")
    torch.set_num_threads(int(cfg["num_threads"]))
    work_dir = Path(work_dir)
    output_dir = check_output_dir(TEACHER_OUTPUT_DIR if output_dir is None else output_dir, "output_dir")
    check_output_dir(work_dir, "work_dir")
    ckpt_path = work_dir / "checkpoint.pt"

    x_train, y_train = load_digits_split("train")
    scheduler = DDPMScheduler(**cfg["scheduler"])
    alphas_cumprod = scheduler.alphas_cumprod.float()

    torch.manual_seed(cfg["seed"])
    model = build_teacher_unet(cfg["unet"])
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    start, losses, elapsed = 0, [], 0.0
    stateful = {"model": model, "ema": ema, "opt": opt}
    state = _resume_checkpoint(ckpt_path, cfg, stateful, gen)
    if state is not None:
        start, losses, elapsed = state["step"], state["losses"], state["elapsed"]

    model.train()
    n = len(x_train)
    t0 = time.time() - elapsed
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc="train-teacher",
               disable=not progress)
    for step in bar:
        idx = torch.randint(0, n, (cfg["batch_size"],), generator=gen)
        x0, y = x_train[idx], y_train[idx].clone()
        drop = torch.rand(len(y), generator=gen) < cfg["label_dropout"]
        y[drop] = NULL_CLASS
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(y),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        xt = alpha * x0 + sigma * eps
        v = alpha * eps - sigma * x0
        pred = model(xt, t, class_labels=y).sample
        loss = F.mse_loss(pred, v)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        decay = min(cfg["ema_decay"], (1 + step) / (10 + step))
        _ema_update(ema, model, decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        done = step + 1
        if snapshot_every and (done % snapshot_every == 0 or done == cfg["steps"]):
            _save_snapshot(work_dir, done, model, ema, loss=sum(losses[-50:]) / len(losses[-50:]),
                           elapsed=time.time() - t0)
        if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]:
            _save_checkpoint(ckpt_path, cfg, stateful, gen, step=done, losses=losses, elapsed=time.time() - t0)
    wall = time.time() - t0

    sched_cfg = _json_config(scheduler.config)
    sched_cfg["_class_name"] = "DDPMScheduler"
    record = {
        "config": cfg,
        "seed": cfg["seed"],
        "final_loss_last500": sum(losses[-500:]) / len(losses[-500:]),
        "wall_time_s": round(wall, 1),
        "num_parameters": sum(p.numel() for p in ema.parameters()),
        "torch_version": torch.__version__,
    }
    names = ("digits_unet.safetensors", "digits_unet_config.json", "digits_scheduler_config.json",
             "digits_teacher_train.json")
    with atomic_paths(*(output_dir / n for n in names)) as (weights, unet_json, sched_json, record_json):
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(weights))
        _write_json(unet_json, _json_config(ema.config))
        _write_json(sched_json, sched_cfg)
        _write_json(record_json, record)
    if snapshot_every:
        _save_final(work_dir / "final", ema)
    return record


def _save_snapshot(work_dir: Path, step: int, model, ema, **meta) -> None:
    """Keep the raw and EMA weights at ``step`` as a complete run checkpoint (written into a temporary
    folder, ``meta.json`` last, then renamed: :func:`fewstep.distill.checkpoints.commit`)."""
    from fewstep.distill.checkpoints import commit, save_weights, tmp_dir

    tmp = tmp_dir(work_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(tmp / "teacher.safetensors", model.state_dict())
    save_weights(tmp / "teacher_ema.safetensors", ema.state_dict())
    commit(work_dir, step, {"step": step, "kind": "digits-teacher", **meta})


def _save_final(folder: Path, ema) -> None:
    """The final EMA teacher as a diffusers ``UNet2DModel`` folder (``from_pretrained``-loadable),
    replaced as a whole."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    ema.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int, noise_std: float) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels (background -1 fill) + Gaussian noise."""
    if max_shift > 0:
        pad = F.pad(x, (max_shift,) * 4, value=-1.0)
        b, size = x.shape[0], x.shape[-1]
        sx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
        sy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
        x = torch.stack([pad[i, :, sy[i]:sy[i] + size, sx[i]:sx[i] + size] for i in range(b)])
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=gen)
    return x


def train_classifier(
    config: dict | None = None,
    seed: int | None = None,
    work_dir: str | os.PathLike = "out/train_classifier",
    output_dir: str | os.PathLike = CLASSIFIER_OUTPUT_DIR,
    progress: bool = True,
) -> dict:
    """Train the digits classifier whose penultimate features define FD-digits.

    Trains :class:`fewstep.models.classifier.DigitsClassifier` with cross-entropy on the train
    split (random 1-pixel shifts and small Gaussian noise as augmentation), then writes
    ``digits_classifier.safetensors`` and ``digits_classifier.json`` (architecture config, training
    config, seed, held-out test accuracy) to ``output_dir`` (default ``out/classifier``; pass
    :data:`WEIGHTS_DIR` to replace the shipped classifier), as one unit.
    Resumable from ``work_dir/checkpoint.pt`` at epoch granularity. Returns the JSON record.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .classifier import DigitsClassifier

    cfg = _merge(DEFAULT_CLASSIFIER_CONFIG, config)
    if seed is not None:
        cfg["seed"] = int(seed)
    if cfg["epochs"] < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg['epochs']}")
    torch.set_num_threads(int(cfg["num_threads"]))
    work_dir = Path(work_dir)
    output_dir = check_output_dir(CLASSIFIER_OUTPUT_DIR if output_dir is None else output_dir, "output_dir")
    check_output_dir(work_dir, "work_dir")
    ckpt_path = work_dir / "checkpoint.pt"

    x_train, y_train = load_digits_split("train")
    x_test, y_test = load_digits_split("test")
    torch.manual_seed(cfg["seed"])
    arch = {"width": cfg["width"], "feature_dim": cfg["feature_dim"]}
    model = DigitsClassifier(**arch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total_steps = cfg["epochs"] * math.ceil(len(x_train) / cfg["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total_steps)
    gen = torch.Generator().manual_seed(cfg["seed"])
    start, t0 = 0, time.time()
    stateful = {"model": model, "opt": opt, "sched": sched}
    state = _resume_checkpoint(ckpt_path, cfg, stateful, gen)
    if state is not None:
        start, t0 = state["epoch"], time.time() - state["elapsed"]

    bar = tqdm(range(start, cfg["epochs"]), initial=start, total=cfg["epochs"], desc="train-classifier",
               disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), cfg["batch_size"]):
            idx = perm[i:i + cfg["batch_size"]]
            x = _augment(x_train[idx], gen, cfg["max_shift"], cfg["noise_std"])
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = epoch + 1
        if done % cfg["checkpoint_every"] == 0 or done == cfg["epochs"]:
            _save_checkpoint(ckpt_path, cfg, stateful, gen, epoch=done, elapsed=time.time() - t0)
    model.eval()
    with torch.no_grad():
        test_acc = float((model(x_test).argmax(1) == y_test).float().mean())
        train_acc = float((model(x_train).argmax(1) == y_train).float().mean())
    record = {
        "architecture": arch,
        "config": cfg,
        "seed": cfg["seed"],
        "test_accuracy": round(test_acc, 4),
        "train_accuracy": round(train_acc, 4),
        "num_test": len(y_test),
        "wall_time_s": round(time.time() - t0, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    with atomic_paths(output_dir / "digits_classifier.safetensors", output_dir / "digits_classifier.json") as (w, j):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(w))
        _write_json(j, record)
    return record
