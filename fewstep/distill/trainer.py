"""The shared distillation trainer: one loop for every method, on accelerate.

The same code runs on one CPU, one GPU, several GPUs or nodes (``accelerate launch``, DDP), with
mixed precision and gradient accumulation. Per iteration and per :class:`~fewstep.distill.methods.Phase`
of the method (``repeat`` times each):

1. the *global* batch (``train.batch_size`` samples) is drawn once, identically on every process:
   data indices from a resumable epoch-shuffled order (:class:`DataOrder`) and the method's
   per-sample randomness (``Method.draw``) from the trainer's generator;
2. it is cut into ``world_size x grad_accum`` equal chunks; process ``r`` computes micro-batch
   ``m`` on chunk ``m * world_size + r`` (gradients of ``loss / grad_accum`` accumulate, DDP
   all-reduces on the last micro-batch), so a run gives the same losses however it is split;
3. gradient clipping, the optimizer and LR-schedule step, the EMA update of the student, and
   ``Method.after_update`` (e.g. the target network).

Checkpoints (every ``checkpoint.every`` steps and at the end; see
:mod:`fewstep.distill.checkpoints`) hold models, EMA, optimizers, LR schedulers, the data position,
every RNG state and the counters; a resumed run continues bit for bit (CPU, same thread count).
Evaluation (every ``eval.every`` steps, digits only): FD-digits and class accuracy at
``eval.steps`` sampling steps on fixed noise, logged to ``log.jsonl``, the tracker and the plot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import checkpoints as ckpt
from .config import incompatible_changes, resolve_config
from .methods import Method, Phase, get_method

LOG = logging.getLogger("fewstep.distill")


# ------------------------------------------------------------------------------------------------
# small stateful pieces
# ------------------------------------------------------------------------------------------------
class DataOrder:
    """Epoch-wise shuffled indices ``0..n-1``: epoch ``e`` is ``randperm(n)`` seeded with
    ``(seed, e)``; :meth:`take` continues where the last call stopped (across epochs). The state is
    the position ``(epoch, offset)``, so a resumed run reads the same data."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the training data is empty")
        self.n, self.seed, self.epoch, self.offset = int(n), int(seed), 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            m = min(k, self.n - self.offset)
            out.append(self._perm[self.offset:self.offset + m])
            self.offset += m
            k -= m
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"checkpoint data order has {state['n']} items, the data now has {self.n}")
        self.seed, self.epoch, self.offset = state["seed"], state["epoch"], state["offset"]
        self._perm = self._permutation(self.epoch)


class EMA:
    """Exponential moving average of a model's trainable parameters (``decay``; with ``warmup`` the
    rate of update ``n`` is ``min(decay, (1 + n) / (10 + n))``, as the digits teacher's training)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def rate(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.rate()
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1.0 - d)
        self.num_updates += 1

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the EMA values in place of the trainable parameters."""
        sd = model.state_dict()
        return {k: (self.shadow[k] if k in self.shadow else v) for k, v in sd.items()}

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Temporarily put the EMA weights into ``model`` (restored exactly on exit)."""
        saved = {}
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in self.shadow.items():
                saved[n] = params[n].detach().clone()
                params[n].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = state["num_updates"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


def lr_lambda(cfg: dict) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step ``i``: linear warm-up over ``lr_warmup_steps``, then
    constant, cosine or linear decay to ``lr_final_fraction`` at ``steps``."""
    warm, total, final = cfg["lr_warmup_steps"], cfg["steps"], cfg["lr_final_fraction"]
    kind = cfg["lr_schedule"]

    def fn(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        if kind == "constant":
            return 1.0
        p = min(1.0, (i - warm) / max(1, total - warm))
        if kind == "linear":
            return 1.0 - (1.0 - final) * p
        return final + 0.5 * (1.0 - final) * (1.0 + math.cos(math.pi * p))

    return fn


def _rng_state(gen: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _peak_memory_mb(device: torch.device) -> dict:
    import resource

    out = {"cpu_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _versions() -> dict:
    import accelerate
    import diffusers

    from fewstep import __version__

    return {"fewstep": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__}


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
class DigitsEvaluator:
    """FD-digits and class accuracy of a student at ``eval.steps`` sampling steps, on fixed noise
    (``eval.num_samples`` images, labels 0..9 balanced, noise from ``eval.seed``; the re-noising of
    multistep sampling draws from ``eval.seed + 1``), against the 360 held-out test digits."""

    def __init__(self, source, ecfg: dict, device):
        from fewstep.eval.fd_digits import DigitsFeatures, reference_stats

        self.source, self.cfg, self.device = source, ecfg, device
        n = ecfg["num_samples"]
        g = torch.Generator().manual_seed(ecfg["seed"])
        self.noise = torch.randn((n, *source.sample_shape), generator=g).to(device)
        self.cond = source.eval_cond(n)
        self.labels = self.cond["class_labels"].cpu()
        self.extractor = DigitsFeatures()
        self.reference = reference_stats(self.extractor)

    def _score(self, images: torch.Tensor) -> dict:
        from fewstep.eval.fd_digits import fd_digits

        res = fd_digits(images.cpu(), labels=self.labels, extractor=self.extractor, reference=self.reference)
        return {"fd": res["fd"], "acc": res["accuracy"]}

    @torch.no_grad()
    def __call__(self, method: Method, model: torch.nn.Module) -> dict:
        out = {}
        model.eval()
        try:
            for steps in self.cfg["steps"]:
                gen = torch.Generator(device=self.noise.device).manual_seed(self.cfg["seed"] + 1)
                x = method.sample(model, self.noise, self.cond, steps, self.cfg["guidance"], generator=gen)
                res = self._score(self.source.decode(x))
                out[f"fd/{steps}"], out[f"acc/{steps}"] = res["fd"], res["acc"]
        finally:
            model.train()
        return out

    @torch.no_grad()
    def teacher(self, steps: int = 50) -> dict:
        """The teacher with deterministic DDIM (``steps`` steps, trailing) at ``eval.guidance`` on the same noise."""
        from diffusers import DDIMScheduler

        from fewstep.sample import sample

        src = self.source
        sched = DDIMScheduler.from_config(src.scheduler_config)
        w = self.cfg["guidance"]

        def fn(x, t, c):
            return src.call(src.teacher, x, t, c)

        x, _ = sample(fn, self.noise, sched, steps, guidance=w if w > 1 else None, cond=self.cond,
                      uncond=src.null_cond(len(self.noise)))
        res = self._score(src.decode(x))
        return {f"teacher_ddim{steps}/fd": res["fd"], f"teacher_ddim{steps}/acc": res["acc"]}


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    """Train ``method`` with ``config`` into the run directory ``output``.

    ``config``: a recipe dict (see :mod:`fewstep.distill.config`); it is validated here, before
    anything is loaded. ``resume``: continue from the newest resumable checkpoint of ``output``
    (an existing run directory without ``resume`` is an error; ``resume`` on an empty one starts
    fresh). ``progress``: tqdm bar. ``crash_at``: testing aid, ends the process abruptly
    (``os._exit``) after that step, like a kill. ``hooks``: callables ``hook(trainer, step, logs)``
    after every step (tests, custom monitoring).
    """

    def __init__(self, method: str, config: dict, output: str | os.PathLike, resume: bool = False,
                 progress: bool = True, crash_at: int | None = None, hooks: list | None = None):
        self.method_cls = get_method(method)
        self.cfg = resolve_config(method, config, self.method_cls.options, self.method_cls.check)
        self.run_dir = Path(output)
        self.resume = bool(resume)
        self.progress = progress
        self.crash_at = crash_at
        self.hooks = list(hooks or [])
        self._check_run_dir()

    # ---- run directory -------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        cfg_file = self.run_dir / "config.json"
        if not cfg_file.exists():
            if self.run_dir.exists() and any(self.run_dir.iterdir()) and not self.resume:
                raise ValueError(f"--output {self.run_dir} exists and is not empty (and not a distillation run); "
                                 "choose a new folder")
            return
        if not self.resume:
            raise ValueError(f"--output {self.run_dir} already holds a distillation run; pass --resume to continue "
                             "it or choose a new folder")
        old = json.loads(cfg_file.read_text())["config"]
        bad = incompatible_changes(old, self.cfg)
        if bad:
            raise ValueError(f"cannot resume {self.run_dir}: the config differs in {', '.join(bad)} "
                             "(only train.steps, threads/device, logging, checkpoint and eval settings may change)")
        if old["train"]["steps"] != self.cfg["train"]["steps"] and self.cfg["train"]["lr_schedule"] != "constant":
            raise ValueError(f"cannot resume {self.run_dir} with train.steps = {self.cfg['train']['steps']} "
                             f"(was {old['train']['steps']}): the {self.cfg['train']['lr_schedule']!r} LR schedule "
                             "depends on it")

    # ---- helpers ---------------------------------------------------------------------------------
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        t = self.cfg["train"]
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        cpu = False
        if not multi:
            from fewstep.device import resolve_device

            cpu = resolve_device(t["device"], "train.device").type == "cpu"
        else:
            cpu = t["device"] == "cpu"
        log_with = "tensorboard" if self.cfg["tracker"] == "tensorboard" else None
        project = ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "tb"))
        return Accelerator(cpu=cpu, mixed_precision=t["mixed_precision"], log_with=log_with, project_config=project)

    def _optimizer(self, params, lr: float):
        t = self.cfg["train"]
        kw = dict(lr=lr, betas=tuple(t["adam_betas"]), eps=t["adam_eps"], weight_decay=t["weight_decay"])
        if t["use_8bit_adam"]:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kw)
        return torch.optim.AdamW(params, **kw)

    def _log_line(self, row: dict) -> None:
        if self.acc.is_main_process:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    # ---- checkpoints -----------------------------------------------------------------------------
    def _save(self, step: int, elapsed: float, last_eval: dict) -> None:
        acc = self.acc
        tmp = ckpt.tmp_dir(self.run_dir, step)
        if acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            for name, model in self.raw.items():
                trainable_only = any(not p.requires_grad for p in model.parameters())
                sd = model.state_dict()
                if trainable_only:  # LoRA: store the adapters only
                    keep = {n for n, p in model.named_parameters() if p.requires_grad}
                    sd = {k: v for k, v in sd.items() if k in keep}
                ckpt.save_weights(tmp / f"{name}.safetensors", sd)
                if name == self.method.ema_model and self.ema is not None:
                    full = self.ema.full_state_dict(model)
                    if trainable_only:
                        full = {k: v for k, v in full.items() if k in sd}
                    ckpt.save_weights(tmp / f"{name}_ema.safetensors", full)
            for name, module in self.method.state_modules().items():
                ckpt.save_weights(tmp / f"{name}.safetensors", module.state_dict())
            state = {
                "step": step,
                "elapsed": elapsed,
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "data": self.data_order.state_dict(),
                "last_eval": last_eval,
                "scaler": acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
            }
            torch.save(state, tmp / "training_state.pt")
        with open(tmp / f"rng-rank{acc.process_index}.pt", "wb") as f:
            pickle.dump(_rng_state(self.gen), f)
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {"step": step, "elapsed_s": round(elapsed, 2), "eval": last_eval,
                    "method": self.cfg["method"]["name"], "world_size": acc.num_processes}
            ckpt.commit(self.run_dir, step, meta)
            ckpt.prune(self.run_dir, self.cfg["checkpoint"]["keep_last"])
        acc.wait_for_everyone()

    def _load(self, info: ckpt.CheckpointInfo) -> dict:
        from safetensors.torch import load_file

        from .._io import read_checkpoint

        advice = (f"this checkpoint is damaged: delete its folder (rm -r {info.path}) and rerun with --resume "
                  "to continue from the previous checkpoint (or without --resume in a new --output to start over)")

        def read(name: str):
            return read_checkpoint(info.path / f"{name}.safetensors",
                                   lambda f: load_file(str(f), device=str(self.acc.device)), advice)

        for name, model in self.raw.items():
            model.load_state_dict(read(name), strict=not any(not p.requires_grad for p in model.parameters()))
        for name, module in self.method.state_modules().items():
            module.load_state_dict(read(name))
        state = read_checkpoint(info.path / "training_state.pt",
                                lambda f: torch.load(f, map_location=self.acc.device, weights_only=False), advice)
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.data_order.load_state_dict(state["data"])
        if state.get("scaler") is not None and getattr(self.acc, "scaler", None) is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        rng_file = info.path / f"rng-rank{self.acc.process_index}.pt"
        if not rng_file.exists():
            raise ValueError(f"checkpoint {info.path} has no RNG state for process {self.acc.process_index}: "
                             "resume with the number of processes it was written with")
        with open(rng_file, "rb") as f:
            _set_rng_state(pickle.load(f), self.gen)
        return state

    # ---- the loop --------------------------------------------------------------------------------
    def _micro_batches(self, phase: Phase):
        """This process's micro-batches of one global batch of ``phase``."""
        t = self.cfg["train"]
        acc, world, accum = self.acc, self.acc.num_processes, t["grad_accum"]
        b = t["batch_size"]
        indices = self.data_order.take(b)
        draws = self.method.draw(phase, b, self.gen)
        chunk = b // (world * accum)
        for m in range(accum):
            c = m * world + acc.process_index
            sl = slice(c * chunk, (c + 1) * chunk)
            batch = self.source.load_batch(indices[sl], with_data=phase.needs_data)
            for k, v in draws.items():
                batch[k] = v[sl].to(acc.device)
            yield m, batch

    def _run_phase(self, phase: Phase, step: int) -> float:
        acc, t = self.acc, self.cfg["train"]
        accum = t["grad_accum"]
        model = self.wrapped[phase.model]
        opt = self.optimizers[phase.model]
        total = torch.zeros((), device=acc.device)
        for m, batch in self._micro_batches(phase):
            sync = m == accum - 1
            ctx = contextlib.nullcontext() if sync else acc.no_sync(model)
            with ctx:
                loss, _ = self.method.loss(phase, batch, step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} (phase {phase.name})")
                acc.backward(loss / accum)
            total += loss.detach().float() / accum
        if t["grad_clip"] is not None:
            acc.clip_grad_norm_(self.raw[phase.model].parameters(), t["grad_clip"])
        opt.step()
        self.schedulers[phase.model].step()
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        if phase.model == self.method.ema_model and self.ema is not None:
            self.ema.update(self.raw[phase.model])
        self.method.after_update(phase, step)
        return float(acc.reduce(total, reduction="mean"))

    def _evaluate(self, step: int) -> dict:
        acc = self.acc
        res: dict[str, Any] = {}
        if self.evaluator is not None and acc.is_main_process:
            model = self.raw[self.method.ema_model]
            ctx = self.ema.applied(model) if (self.cfg["eval"]["model"] == "ema" and self.ema) else \
                contextlib.nullcontext()
            with ctx:
                res = self.evaluator(self.method, model)
            res = {k: float(v) for k, v in res.items()}
            self._log_line({"kind": "eval", "step": step, **res})
            acc.log({f"eval/{k}": v for k, v in res.items()}, step=step)
            LOG.info("eval step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in res.items()))
        acc.wait_for_everyone()
        return res

    def train(self) -> dict:
        """Run (or resume) the training; returns the summary that is also written to ``summary.json``."""
        from accelerate.state import AcceleratorState
        from tqdm.auto import tqdm

        t = self.cfg["train"]
        if t["num_threads"] is not None:
            torch.set_num_threads(t["num_threads"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.acc = acc = self._accelerator()
        handler = None
        try:
            if acc.is_main_process:
                handler = logging.FileHandler(self.run_dir / "train.log")
                handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
                LOG.addHandler(handler)
                LOG.setLevel(logging.INFO)
            return self._train(tqdm)
        finally:
            if handler is not None:
                LOG.removeHandler(handler)
                handler.close()
            acc.wait_for_everyone()
            acc.end_training()
            if acc.num_processes > 1 and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            else:  # let the next Trainer in this process choose its own mixed precision / device
                AcceleratorState._reset_state(True)

    def _train(self, tqdm) -> dict:
        cfg, t, acc = self.cfg, self.cfg["train"], self.acc
        seed = cfg["seed"]
        resume_info = ckpt.latest_resumable(self.run_dir) if self.resume else None
        if acc.is_main_process:
            _atomic_write(self.run_dir / "config.json",
                          json.dumps({"config": cfg, "versions": _versions()}, indent=2) + "\n")
            if resume_info is None:
                (self.run_dir / "log.jsonl").unlink(missing_ok=True)
        from .sources import build_source

        torch.manual_seed(seed)  # same initial weights (e.g. LoRA) on every process
        self.source = build_source(cfg["model"], cfg["data"], acc.device, self.method_cls.needs_data)
        self.method = method = self.method_cls(cfg, self.source, acc)
        self.raw = method.build()
        if method.ema_model not in self.raw:
            raise ValueError(f"method {method.name!r}: ema_model {method.ema_model!r} is not one of its models")
        if t["gradient_checkpointing"]:
            for m in self.raw.values():
                if not hasattr(m, "enable_gradient_checkpointing"):
                    raise ValueError(f"train.gradient_checkpointing: {type(m).__name__} does not support it")
                m.enable_gradient_checkpointing()
        self.optimizers, self.schedulers = {}, {}
        for name, model in self.raw.items():
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"method {method.name!r}: model {name!r} has no trainable parameters")
            self.optimizers[name] = self._optimizer(params, t["lr"] * method.lr_scale(name))
        self.ema = EMA(self.raw[method.ema_model], t["ema_decay"], t["ema_warmup"]) if t["ema_decay"] > 0 else None
        names = list(self.raw)
        prepared = acc.prepare(*[self.raw[n] for n in names], *[self.optimizers[n] for n in names])
        self.wrapped = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(names, prepared[len(names):]))
        for n in names:  # not prepared: accelerate would step it once per process
            self.schedulers[n] = torch.optim.lr_scheduler.LambdaLR(self.optimizers[n].optimizer
                                                                   if hasattr(self.optimizers[n], "optimizer")
                                                                   else self.optimizers[n], lr_lambda(t))
        method.bind(self.raw, self.wrapped)
        self.data_order = DataOrder(self.source.num_data(), seed)
        self.gen = torch.Generator().manual_seed(seed + 1)
        random.seed(seed + 7 * acc.process_index)
        np.random.seed(seed + 7 * acc.process_index)
        torch.manual_seed(seed + 1000 + acc.process_index)

        self.evaluator = None
        if cfg["eval"]["every"] > 0 and cfg["model"]["source"] == "digits" and acc.is_main_process:
            self.evaluator = DigitsEvaluator(self.source, cfg["eval"], acc.device)
        if cfg["tracker"] != "none":
            flat = {"method": method.name, "seed": seed, **{f"train.{k}": v for k, v in t.items()
                                                             if isinstance(v, (int, float, str, bool))}}
            acc.init_trackers("distill", config=flat)

        start, elapsed, last_eval = 0, 0.0, {}
        if resume_info is not None:
            state = self._load(resume_info)
            start, elapsed, last_eval = state["step"], state["elapsed"], state.get("last_eval") or {}
            if acc.is_main_process:
                self._truncate_log(start)
            LOG.info("resumed from %s (step %d)", resume_info.path, start)
        else:
            LOG.info("new run %s: method %s, %d steps, batch %d on %d process(es)", self.run_dir, method.name,
                     t["steps"], t["batch_size"], acc.num_processes)
            if self.evaluator is not None and cfg["eval"]["teacher_reference"]:
                ref = self.evaluator.teacher()
                self._log_line({"kind": "teacher", "step": 0, **ref})
                LOG.info("teacher reference: %s", ref)
            acc.wait_for_everyone()
            if cfg["eval"]["every"] > 0:
                last_eval = self._evaluate(0)

        t0 = time.time() - elapsed
        every_ckpt, every_eval = cfg["checkpoint"]["every"], cfg["eval"]["every"]
        bar = tqdm(range(start, t["steps"]), initial=start, total=t["steps"], desc=f"distill {method.name}",
                   disable=not (self.progress and acc.is_main_process))
        recent: list[float] = []
        for step in bar:
            logs = {}
            for phase in method.phases(step):
                for _ in range(phase.repeat):
                    loss = self._run_phase(phase, step)
                    logs[f"loss/{phase.name}"] = loss
            lrs = {f"lr/{n}": s.get_last_lr()[0] for n, s in self.schedulers.items()}
            done = step + 1
            row = {"kind": "train", "step": done, **logs, **lrs}
            self._log_line(row)
            if self.cfg["tracker"] != "none":
                acc.log({**logs, **lrs}, step=done)
            recent.append(next(iter(logs.values())))
            if done % t["log_every"] == 0 or done == t["steps"]:
                mean = sum(recent) / len(recent)
                bar.set_postfix(loss=f"{mean:.4g}")
                LOG.info("step %d loss %.5g", done, mean)
                recent = []
            if every_eval and (done % every_eval == 0 or done == t["steps"]):
                last_eval = self._evaluate(done) or last_eval
            if done % every_ckpt == 0 or done == t["steps"]:
                self._save(done, time.time() - t0, last_eval)
            for hook in self.hooks:
                hook(self, done, row)
            if self.crash_at is not None and done == self.crash_at:
                os._exit(17)
        bar.close()
        wall = time.time() - t0
        return self._finish(wall, last_eval)

    def _truncate_log(self, step: int) -> None:
        f = self.run_dir / "log.jsonl"
        if not f.exists():
            return
        rows = [ln for ln in f.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in rows if json.loads(ln)["step"] <= step]  # later rows: the crashed run's, redone now
        _atomic_write(f, "".join(ln + "\n" for ln in keep))

    def _finish(self, wall: float, last_eval: dict) -> dict:
        acc, cfg = self.acc, self.cfg
        acc.wait_for_everyone()
        summary: dict[str, Any] = {}
        if acc.is_main_process:
            model = self.raw[self.method.ema_model]
            use_ema = cfg["export"]["model"] == "ema" and self.ema is not None
            info = {"method": self.method.name, "steps": cfg["train"]["steps"], "wall_time_s": round(wall, 1),
                    "config": cfg, "versions": _versions(), "weights": "ema" if use_ema else "student"}
            ctx = self.ema.applied(model) if use_ema else contextlib.nullcontext()
            with ctx:
                final = self.method.export(model, self.run_dir / "final", info)
            plot = plot_run(self.run_dir)
            summary = {"method": self.method.name, "steps": cfg["train"]["steps"], "wall_time_s": round(wall, 1),
                       "world_size": acc.num_processes, "memory": _peak_memory_mb(acc.device),
                       "last_eval": last_eval, "final": str(final), "plot": str(plot) if plot else None,
                       "num_parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in self.raw.items()},
                       "trainable_parameters": {n: sum(p.numel() for p in m.parameters() if p.requires_grad)
                                                for n, m in self.raw.items()}}
            _atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            LOG.info("done: %s", json.dumps(summary))
        acc.wait_for_everyone()
        return summary


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's ``log.jsonl``."""
    f = Path(run_dir) / "log.jsonl"
    if not f.exists():
        return []
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path | None:
    """Plot the loss (raw and a 50-step moving average) and the FD-vs-step curves of a run into
    ``plots/curves.png`` (None when matplotlib is missing or there is nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        LOG.warning("matplotlib is not installed: no plot")
        return None
    rows = read_log(run_dir)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    teacher = [r for r in rows if r["kind"] == "teacher"]
    if not train:
        return None
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
        steps = np.array([r["step"] for r in train if key in r])
        vals = np.array([r[key] for r in train if key in r])
        ax.plot(steps, vals, alpha=0.25, lw=0.7)
        k = min(50, len(vals))
        if k > 1:
            ma = np.convolve(vals, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], ma, label=f"{key} ({k}-step mean)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    if evals:
        ax = axes[0][1]
        for key in sorted({k for r in evals for k in r if k.startswith("fd/")}, key=lambda s: int(s.split("/")[1])):
            ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], marker="o", ms=3,
                    label=f"{key.split('/')[1]}-step")
        for r in teacher:
            for k, v in r.items():
                if k.endswith("/fd"):
                    label = k.split("/")[0].replace("teacher_ddim", "teacher DDIM-")
                    ax.axhline(v, color="k", ls="--", lw=0.8, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("FD-digits (fixed noise)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / "plots" / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
