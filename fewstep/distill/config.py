"""Distillation recipes: the config schema, defaults and validation.

A recipe is a JSON object with the sections below (every key optional; defaults here). Method
options live under ``"method"`` and are declared by the method class (``Method.options``).
:func:`resolve_config` fills the defaults and validates every key *before* anything heavy is
loaded: an unknown key, a wrong type or a value out of range is a ``ValueError`` that names the
key (as a dotted path), the value and what is allowed.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Option:
    """One config key: its default, kind and allowed values.

    ``kind``: ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"list"`` (of ``item`` kind),
    ``"dict"`` or ``"any"``. ``choices`` restricts the value; ``low``/``high`` bound numbers
    (``low_open``/``high_open`` make a bound exclusive); ``nullable`` allows ``null``;
    ``length`` fixes a list length; ``check`` is an extra validator returning an error text or None.
    """

    default: Any
    kind: str
    doc: str = ""
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    item: str | None = None
    length: int | None = None
    check: Callable[[Any], str | None] | None = None


def _allowed(opt: Option) -> str:
    if opt.choices is not None:
        return "one of " + ", ".join(map(repr, opt.choices))
    parts = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "list": f"a list of {opt.item or 'values'}", "dict": "an object", "any": "any value"}
    text = parts[opt.kind]
    if opt.length is not None:
        text += f" of length {opt.length}"
    if opt.low is not None:
        text += f" {'>' if opt.low_open else '>='} {opt.low:g}"
    if opt.high is not None:
        text += f"{' and' if opt.low is not None else ''} {'<' if opt.high_open else '<='} {opt.high:g}"
    if opt.nullable:
        text += " (or null)"
    return text


def _is_kind(value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list":
        return isinstance(value, (list, tuple))
    if kind == "dict":
        return isinstance(value, dict)
    return True


def check_value(path: str, value, opt: Option):
    """``value`` validated (and normalised: ints for int keys, floats for float keys, lists for
    list keys) against ``opt``; a ``ValueError`` naming ``path`` otherwise."""

    def bad(reason: str = ""):
        extra = f" ({reason})" if reason else ""
        return ValueError(f"config key {path!r} = {value!r} is invalid{extra}; allowed: {_allowed(opt)}")

    if value is None:
        if opt.nullable:
            return None
        raise bad()
    if not _is_kind(value, opt.kind):
        raise bad()
    if opt.kind == "float":
        value = float(value)
    elif opt.kind == "int":
        value = int(value)
    elif opt.kind == "list":
        value = list(value)
        if opt.length is not None and len(value) != opt.length:
            raise bad(f"needs {opt.length} entries")
        if opt.item is not None:
            for i, v in enumerate(value):
                if not _is_kind(v, opt.item):
                    raise bad(f"entry {i} is not {opt.item}")
            if opt.item == "float":
                value = [float(v) for v in value]
    if opt.choices is not None and value not in opt.choices:
        raise bad()
    nums = value if opt.kind == "list" and opt.item in ("int", "float") else [value]
    for v in nums if opt.kind in ("int", "float", "list") else []:
        if opt.low is not None and (v < opt.low or (opt.low_open and v == opt.low)):
            raise bad()
        if opt.high is not None and (v > opt.high or (opt.high_open and v == opt.high)):
            raise bad()
    if opt.check is not None:
        msg = opt.check(value)
        if msg:
            raise bad(msg)
    return value


def _nonempty(v) -> str | None:
    return None if v else "must not be empty"


SECTIONS: dict[str, dict[str, Option]] = {
    "model": {
        "source": Option("digits", "str", "the teacher: the bundled digits teacher or a local diffusers pipeline",
                         choices=("digits", "pipeline")),
        "path": Option(None, "str", "pipeline folder (model.source = 'pipeline')", nullable=True),
        "teacher_dtype": Option("fp32", "str", "precision of the frozen teacher (memory knob)",
                                choices=("fp32", "fp16", "bf16")),
    },
    "data": {
        "prompts": Option(None, "str", "text file, one prompt per line (pipelines)", nullable=True),
        "images": Option(None, "str", "folder of training images (pipelines)", nullable=True),
        "resolution": Option(None, "int", "training resolution in pixels (default: the UNet's)", low=8,
                             nullable=True),
    },
    "train": {
        "steps": Option(2000, "int", "optimisation steps (iterations)", low=1),
        "batch_size": Option(64, "int", "global batch per step (all processes x accumulation)", low=1),
        "grad_accum": Option(1, "int", "gradient accumulation micro-steps", low=1),
        "lr": Option(1e-4, "float", "peak learning rate", low=0, low_open=True),
        "lr_warmup_steps": Option(0, "int", "linear warm-up steps", low=0),
        "lr_schedule": Option("constant", "str", "after warm-up", choices=("constant", "cosine", "linear")),
        "lr_final_fraction": Option(0.0, "float", "final lr / peak lr for cosine and linear", low=0, high=1),
        "adam_betas": Option([0.9, 0.999], "list", "AdamW betas", item="float", length=2, low=0, high=1,
                             high_open=True),
        "adam_eps": Option(1e-8, "float", "AdamW eps", low=0, low_open=True),
        "weight_decay": Option(0.0, "float", "AdamW weight decay", low=0),
        "grad_clip": Option(1.0, "float", "max gradient norm (null: no clipping)", low=0, low_open=True,
                            nullable=True),
        "ema_decay": Option(0.999, "float", "EMA of the student (0: off)", low=0, high=1, high_open=True),
        "ema_warmup": Option(True, "bool", "EMA decay min(decay, (1 + n) / (10 + n)) for update n"),
        "mixed_precision": Option("no", "str", "accelerate mixed precision", choices=("no", "fp16", "bf16")),
        "gradient_checkpointing": Option(False, "bool", "recompute activations in backward (memory knob)"),
        "use_8bit_adam": Option(False, "bool", "bitsandbytes AdamW8bit (memory knob; needs bitsandbytes)"),
        "num_threads": Option(None, "int", "torch CPU threads (null: leave as is)", low=1, nullable=True),
        "device": Option("auto", "str", "auto, cpu, cuda, cuda:N, mps (under accelerate launch: its device)"),
        "log_every": Option(10, "int", "progress bar / text log every N steps", low=1),
    },
    "checkpoint": {
        "every": Option(500, "int", "write a checkpoint every N steps (and at the end)", low=1),
        "keep_last": Option(2, "int", "keep the optimizer/RNG state of the last N checkpoints "
                            "(model and EMA weights of every checkpoint are kept, for LCSC)", low=1),
    },
    "eval": {
        "every": Option(500, "int", "evaluate every N steps (0: never; digits only)", low=0),
        "steps": Option([1, 2, 4], "list", "sampling steps to evaluate", item="int", low=1, check=_nonempty),
        "num_samples": Option(500, "int", "samples per evaluation (multiple of 10)", low=10,
                              check=lambda v: None if v % 10 == 0 else "must be a multiple of 10"),
        "seed": Option(1234, "int", "seed of the fixed evaluation noise", low=0),
        "model": Option("ema", "str", "which weights to evaluate", choices=("ema", "student")),
        "guidance": Option(1.0, "float", "guidance scale used in evaluation (students with a w input)", low=0),
        "teacher_reference": Option(True, "bool", "also score the teacher (50-step DDIM) once on the same noise"),
    },
    "export": {
        "model": Option("ema", "str", "which weights to export at the end", choices=("ema", "student")),
        "name": Option(None, "str", "name of the exported student (default: the method)", nullable=True),
    },
}

TOP_LEVEL = {
    "seed": Option(0, "int", "seed of model init, data order and training noise", low=0),
    "tracker": Option("tensorboard", "str", "metrics tracker (TensorBoard needs the tensorboard package)",
                      choices=("tensorboard", "none")),
    "description": Option("", "str", "free text"),
}

#: keys that may change when a run is resumed (they do not change what is computed)
RESUMABLE_CHANGES = ("train.steps", "train.num_threads", "train.device", "train.log_every", "checkpoint.",
                     "eval.", "tracker", "description")


def load_config_file(path: str | Path) -> dict:
    """A recipe file (JSON object)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config file {path} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a JSON object")
    return data


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides (``value`` parsed as JSON, else taken as a string)."""
    out = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return out


def _section(name: str, given, schema: dict[str, Option]) -> dict:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ValueError(f"config key {name!r} must be an object, got {given!r}")
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise ValueError(f"config has unknown key {name + '.' + unknown[0]!r}; allowed in {name!r}: "
                         f"{', '.join(sorted(schema))}")
    return {k: check_value(f"{name}.{k}", given.get(k, copy.deepcopy(opt.default)), opt) for k, opt in schema.items()}


def resolve_config(method_name: str, config: dict, method_options: dict[str, Option],
                   method_check: Callable[[dict], None] | None = None) -> dict:
    """The full validated config for ``method_name``: defaults filled in, every key checked.

    ``config["method"]`` holds the method options (``method_options`` is their schema); a ``"name"``
    there must equal ``method_name``. ``method_check(cfg)`` runs cross-key checks of the method.
    """
    if not isinstance(config, dict):
        raise ValueError("a distillation config must be a JSON object")
    known = set(SECTIONS) | set(TOP_LEVEL) | {"method"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"config has unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
    out: dict[str, Any] = {k: check_value(k, config.get(k, opt.default), opt) for k, opt in TOP_LEVEL.items()}
    for name, schema in SECTIONS.items():
        out[name] = _section(name, config.get(name), schema)
    given = dict(config.get("method") or {})
    if "name" in given and given.pop("name") != method_name:
        raise ValueError(f"config key 'method.name' = {config['method']['name']!r} does not match the method "
                         f"{method_name!r} given on the command line")
    out["method"] = {"name": method_name, **_section("method", given, method_options)}
    _cross_checks(out)
    if method_check is not None:
        method_check(out)
    return out


def _cross_checks(cfg: dict) -> None:
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    if m["source"] == "pipeline":
        if not m["path"]:
            raise ValueError("config key 'model.path' is required when model.source = 'pipeline'")
        if not (Path(m["path"]) / "model_index.json").is_file():
            raise FileNotFoundError(f"config key 'model.path' = {m['path']!r} is not a diffusers pipeline folder "
                                    "(no model_index.json)")
        for key in ("prompts", "images"):
            if d[key] is not None and not Path(d[key]).exists():
                raise FileNotFoundError(f"config key 'data.{key}' = {d[key]!r} does not exist")
    elif m["path"] is not None or d["prompts"] is not None or d["images"] is not None:
        raise ValueError("config keys 'model.path', 'data.prompts' and 'data.images' belong to model.source = "
                         "'pipeline'; the digits source uses the bundled teacher and data")
    if t["batch_size"] % t["grad_accum"]:
        raise ValueError(f"config key 'train.batch_size' = {t['batch_size']} must be a multiple of "
                         f"train.grad_accum = {t['grad_accum']}")
    if t["use_8bit_adam"]:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("config key 'train.use_8bit_adam' = true needs the bitsandbytes package, which is "
                             "not installed (pip install bitsandbytes)") from None
    if cfg["tracker"] == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("config key 'tracker' = 'tensorboard' needs the tensorboard package "
                             "(pip install 'fewstep[distill]'), or set tracker to 'none'") from None


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        path = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def incompatible_changes(old: dict, new: dict) -> list[str]:
    """Differences that forbid resuming ``old`` with ``new`` (see :data:`RESUMABLE_CHANGES`)."""
    return [k for k in config_differences(old, new)
            if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]
