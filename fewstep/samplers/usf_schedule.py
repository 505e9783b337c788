"""USF solver schedules (Liu et al., ICLR 2024, "A Unified Sampling Framework for Solver Searching of
Diffusion Probabilistic Models"): the per-step decisions, their JSON file format, validation, and the
export of fewstep's hand-set schedulers into it (:func:`schedule_from_scheduler`).

A schedule moves through points ``0 .. K``: ``timesteps[j]`` (training-scale times, strictly
decreasing) for ``j < K`` and the end point ``t_end`` (``"zero"``: ``sigma = 0``, the data; or a
time). Step ``j`` moves the state from point ``j`` to point ``j + 1`` after the model was evaluated
at point ``j`` (point 0 is not evaluated when the analytical first step ``afs`` is on), so the
schedule costs ``K`` model evaluations, ``K - 1`` with AFS. Per step (:class:`USFStep`): the
prediction space (``data``, ``noise``, ``v3``), the Taylor order, the start point and the points
the derivatives are estimated from (back offsets from the current point), the relaxation of the
first derivative, and the corrector (:class:`USFCorrector`). The file format is documented in
docs/usf.md; :class:`fewstep.samplers.USFScheduler` executes schedules.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT = "fewstep-usf-schedule"
VERSION = 1
PREDICTIONS = ("data", "noise", "v3")
RELAXATIONS = ("none", "dpmsolver-2", "unipc-bh1", "unipc-bh2", "linear", "exp")
AFS_KINDS = ("none", "zero_x0", "mean_x0")
MAX_ORDER = 4
#: short names of the shipped searched schedules -> package-data file (fewstep.models.shipped_file);
#: the same files are configs/usf/<name with _>.json in the repository
#: (all ten of issue 13: benchmarks/usf_search.py --part ship; its results say at what budget)
SHIPPED = {f"digits{cfg}-nfe{n}": f"usf_digits{cfg.replace('-', '_')}_nfe{n}.json"
           for cfg in ("", "-cfg2") for n in (3, 4, 5, 6, 8)}


def _number(where: str, value, *, integer: bool = False, lo: float | None = None, hi: float | None = None):
    """``value`` checked as a finite (integer) number in ``[lo, hi]``; ``ValueError`` naming ``where``."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value) == int(value)
    if ok:
        value = int(value) if integer else float(value)
        ok = math.isfinite(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        bounds = "" if lo is None and hi is None else f" in [{'-inf' if lo is None else lo}, " \
            f"{'inf' if hi is None else hi}]"
        raise ValueError(f"{where} must be {kind}{bounds}, got {value!r}")
    return value


def _choice(where: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{where}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
    return value


def _keys(where: str, data: Mapping, allowed) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    bad = sorted(set(data) - set(allowed))
    if bad:
        raise ValueError(f"{where} has unknown key(s) {bad}; allowed: {', '.join(allowed)}")


@dataclass
class USFCorrector:
    """The corrector of a step (UniPC-style, no extra evaluation; USF's ``pseudo`` corrector): once
    the model has been evaluated at the step's target point, the step is redone from the same start
    with order ``order``, the new point first among the derivative points (then the step's own
    points), and the target state replaced. ``relaxation`` (of the first derivative; ``unipc-bh1``/
    ``unipc-bh2`` make it UniPC's corrector form), ``pseudo`` (divided-difference derivatives, as
    DPM-Solver-v3's ``corrector_pseudo``)."""

    order: int = 2
    relaxation: str = "none"
    relaxation_coefficient: float = 0.0
    pseudo: bool = False

    DEFAULTS = {"relaxation": "none", "relaxation_coefficient": 0.0, "pseudo": False}

    def to_dict(self) -> dict:
        out = {"order": self.order}
        out.update({k: getattr(self, k) for k, v in self.DEFAULTS.items() if getattr(self, k) != v})
        return out

    @classmethod
    def from_dict(cls, data: Mapping, where: str) -> "USFCorrector":
        _keys(where, data, ("order", *cls.DEFAULTS))
        return cls(order=_number(f"{where}.order", data.get("order", 2), integer=True, lo=2, hi=MAX_ORDER + 1),
                   relaxation=_choice(f"{where}.relaxation", data.get("relaxation", "none"), RELAXATIONS),
                   relaxation_coefficient=_number(f"{where}.relaxation_coefficient",
                                                  data.get("relaxation_coefficient", 0.0)),
                   pseudo=_bool(f"{where}.pseudo", data.get("pseudo", False)))


def _bool(where: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


@dataclass
class USFStep:
    """One step of a schedule (from point ``j`` to ``j + 1``; offsets count back from point ``j``).

    * ``prediction``: ``data`` (DPM-Solver++), ``noise`` (DPM-Solver) or ``v3`` (DPM-Solver-v3 with EMS).
    * ``order``: Taylor order ``n`` (1..4) of the expansion in lambda.
    * ``start``: the step starts from the state at point ``j - start`` (0: multistep; > 0: singlestep
      stages, which start from an earlier point and use points ahead of it).
    * ``points``: back offsets of the points the derivatives are estimated from (newest first, at
      least ``order - 1``; all of them enter the Taylor system, paper USF Sec. 3 / v3 Eq. 14).
      ``first_derivative_points``: estimate the first derivative from only the first ``q`` of them.
    * ``relaxation`` of the first derivative (``dpmsolver-2``/``unipc-bh2``: ``h(e^h - 1)/(2(e^h - 1 - h))``,
      ``unipc-bh1``: ``h^2/(2(e^h - 1 - h))``, ``linear``: ``1 + c h``, ``exp``: ``1 + c (e^h - 1)``, with
      ``h -> -h`` in the data space); ``d2_scale`` multiplies the second derivative (0.5: the
      official/diffusers DPM-Solver++ 3M); ``pseudo``: divided differences (DPM-Solver-v3 Sec. 3.3).
    * ``corrector``: a :class:`USFCorrector` or None.
    """

    prediction: str = "data"
    order: int = 1
    start: int = 0
    points: tuple[int, ...] = ()
    first_derivative_points: int | None = None
    relaxation: str = "none"
    relaxation_coefficient: float = 0.0
    d2_scale: float = 1.0
    pseudo: bool = False
    corrector: USFCorrector | None = None

    DEFAULTS = {"start": 0, "points": (), "first_derivative_points": None, "relaxation": "none",
                "relaxation_coefficient": 0.0, "d2_scale": 1.0, "pseudo": False, "corrector": None}

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"prediction": self.prediction, "order": self.order}
        for k, v in self.DEFAULTS.items():
            val = getattr(self, k)
            if k == "points" and val:
                out[k] = list(val)
            elif k == "corrector" and val is not None:
                out[k] = val.to_dict()
            elif k not in ("points", "corrector") and val != v:
                out[k] = val
        return out

    @classmethod
    def from_dict(cls, data: Mapping, where: str) -> "USFStep":
        _keys(where, data, ("prediction", "order", *cls.DEFAULTS))
        points = data.get("points", [])
        if not isinstance(points, (list, tuple)):
            raise ValueError(f"{where}.points must be a list of back offsets, got {points!r}")
        q = data.get("first_derivative_points")
        corr = data.get("corrector")
        return cls(
            prediction=_choice(f"{where}.prediction", data.get("prediction", "data"), PREDICTIONS),
            order=_number(f"{where}.order", data.get("order", 1), integer=True, lo=1, hi=MAX_ORDER),
            start=_number(f"{where}.start", data.get("start", 0), integer=True, lo=0),
            points=tuple(_number(f"{where}.points[{i}]", p, integer=True, lo=0) for i, p in enumerate(points)),
            first_derivative_points=None if q is None else _number(f"{where}.first_derivative_points", q,
                                                                   integer=True, lo=1),
            relaxation=_choice(f"{where}.relaxation", data.get("relaxation", "none"), RELAXATIONS),
            relaxation_coefficient=_number(f"{where}.relaxation_coefficient", data.get("relaxation_coefficient", 0.0)),
            d2_scale=_number(f"{where}.d2_scale", data.get("d2_scale", 1.0)),
            pseudo=_bool(f"{where}.pseudo", data.get("pseudo", False)),
            corrector=None if corr is None else USFCorrector.from_dict(corr, f"{where}.corrector"),
        )

    def derivative_offsets(self) -> list[int]:
        """Back offsets of every point the step reads besides its start (the predictor's)."""
        return list(self.points)


@dataclass
class USFSchedule:
    """A solver schedule (see the module docstring). Construct from a dict/JSON with
    :meth:`from_dict`/:meth:`load` (validated, with an error per bad field) or directly (then call
    :meth:`validate`). ``ems``: which EMS the v3 steps were made with (``name``, ``sha256`` of the
    statistics, ``num_grid``); ``info``: free metadata (model, guidance, search settings, scores)."""

    timesteps: tuple[float, ...]
    steps: tuple[USFStep, ...]
    t_end: float | str = "zero"
    afs: str = "none"
    afs_mean: Any = None
    round_model_times: bool = False
    ems: dict | None = None
    info: dict = field(default_factory=dict)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """``K``: steps (and points before the end point)."""
        return len(self.timesteps)

    @property
    def nfe(self) -> int:
        """Model evaluations: ``K``, one less with the analytical first step."""
        return self.num_steps - (self.afs != "none")

    @property
    def uses_v3(self) -> bool:
        """Whether any step (or corrector) works in the DPM-Solver-v3 space (needs EMS)."""
        return any(s.prediction == "v3" for s in self.steps)

    @property
    def ends_at_zero(self) -> bool:
        return self.t_end == "zero"

    # ---- validation --------------------------------------------------------------------------
    def validate(self) -> "USFSchedule":
        """Check the structure (not the model's time range: :meth:`check_schedule`); ``ValueError``
        naming the field, the value and what is allowed. Returns ``self``."""
        k = len(self.timesteps)
        if k < 1:
            raise ValueError("timesteps must list at least one point")
        ts = [_number(f"timesteps[{i}]", t, lo=0.0) for i, t in enumerate(self.timesteps)]
        for i in range(1, k):
            if not ts[i] < ts[i - 1]:
                raise ValueError(f"timesteps must be strictly decreasing (noise to data): timesteps[{i}]={ts[i]} "
                                 f">= timesteps[{i - 1}]={ts[i - 1]}")
        if self.t_end != "zero":
            end = _number("t_end", self.t_end, lo=0.0)
            if not end < ts[-1]:
                raise ValueError(f"t_end={end} must be 'zero' or a time below timesteps[-1]={ts[-1]}")
        if len(self.steps) != k:
            raise ValueError(f"steps has {len(self.steps)} entries but timesteps has {k} points: one step per point "
                             f"(step j moves from timesteps[j] to the next point, the last one to t_end)")
        _choice("afs", self.afs, AFS_KINDS)
        if self.afs == "mean_x0" and self.afs_mean is None:
            raise ValueError("afs='mean_x0' needs afs_mean (the data mean: a number or a nested list of the sample "
                             "shape)")
        if self.afs_mean is not None:
            arr = np.asarray(self.afs_mean, dtype=np.float64)
            if not np.all(np.isfinite(arr)):
                raise ValueError("afs_mean must be finite numbers")
        if k - (self.afs != "none") < 1:
            raise ValueError("the schedule must evaluate the model at least once (one step with afs, or two)")
        _bool("round_model_times", self.round_model_times)
        for j, step in enumerate(self.steps):
            self._check_step(j, step)
        return self

    def _check_step(self, j: int, step: USFStep) -> None:
        where = f"steps[{j}]"
        if not isinstance(step, USFStep):
            raise ValueError(f"{where} must be a USFStep, got {type(step).__name__}")
        _choice(f"{where}.prediction", step.prediction, PREDICTIONS)
        _number(f"{where}.order", step.order, integer=True, lo=1, hi=MAX_ORDER)
        _choice(f"{where}.relaxation", step.relaxation, RELAXATIONS)
        if j - step.start < 0:
            raise ValueError(f"{where}.start={step.start} points before the first point (at most {j})")
        seen = set()
        for off in step.points:
            if off == step.start:
                raise ValueError(f"{where}.points lists the start offset {off} (the expansion point is always used)")
            if off in seen:
                raise ValueError(f"{where}.points lists offset {off} twice")
            if j - off < 0:
                raise ValueError(f"{where}.points has offset {off}: point {j - off} does not exist (the history at "
                                 f"step {j} has points 0..{j})")
            seen.add(off)
        if step.order - 1 > len(step.points):
            raise ValueError(f"{where}.order={step.order} needs {step.order - 1} derivative point(s) but points lists "
                             f"{len(step.points)} ({list(step.points)}); the history at step {j} supports order <= "
                             f"{j + 1}")
        q = step.first_derivative_points
        if q is not None and not (1 <= q <= len(step.points)) or (q is not None and step.order < 2):
            raise ValueError(f"{where}.first_derivative_points={q} must be in 1..{len(step.points)} (and order >= 2)")
        if step.order < 2 and (step.relaxation != "none" or step.pseudo):
            raise ValueError(f"{where}: relaxation/pseudo act on derivatives and need order >= 2 (order={step.order})")
        if step.order < 3 and step.d2_scale != 1.0:
            raise ValueError(f"{where}.d2_scale={step.d2_scale} acts on the second derivative and needs order >= 3")
        last = j == len(self.timesteps) - 1
        if last and self.ends_at_zero and step.order != 1:
            raise ValueError(f"{where}.order={step.order}: the last step ends at sigma = 0 (t_end='zero'), where only "
                             "order 1 is defined (the expansion in lambda diverges); use order 1 or a finite t_end")
        c = step.corrector
        if c is not None:
            if last:
                raise ValueError(f"{where}.corrector: the last step has no evaluation at its end point to correct with")
            if c.order - 2 > len(step.points):
                raise ValueError(f"{where}.corrector.order={c.order} needs the new point and {c.order - 2} of the "
                                 f"step's points, which lists {len(step.points)}")

    def check_schedule(self, noise_schedule) -> None:
        """``ValueError`` unless every point lies in ``noise_schedule``'s time range with a finite
        half log-SNR (flow models: below ``t = N``)."""
        lo, hi = float(noise_schedule.t_min), float(noise_schedule.t_max)
        pts = list(self.timesteps) + ([] if self.ends_at_zero else [self.t_end])
        for i, t in enumerate(pts):
            name = f"timesteps[{i}]" if i < self.num_steps else "t_end"
            if not lo - 1e-9 <= float(t) <= hi + 1e-9:
                raise ValueError(f"{name}={t} is outside the model's time range [{lo:g}, {hi:g}]")
            lam = float(noise_schedule.lambda_(float(t)))
            if not math.isfinite(lam):
                raise ValueError(f"{name}={t} has an infinite half log-SNR on this noise schedule (alpha or sigma is "
                                 "0 there); move it inside the range")

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON-able dict of the file format (defaults left out of the steps)."""
        out = {"format": FORMAT, "version": VERSION, "nfe": self.nfe,
               "timesteps": [float(t) for t in self.timesteps],
               "t_end": self.t_end if self.ends_at_zero else float(self.t_end), "afs": self.afs}
        if self.afs_mean is not None:
            out["afs_mean"] = np.asarray(self.afs_mean, dtype=np.float64).tolist()
        if self.round_model_times:
            out["round_model_times"] = True
        if self.ems is not None:
            out["ems"] = dict(self.ems)
        out["steps"] = [s.to_dict() for s in self.steps]
        if self.info:
            out["info"] = copy.deepcopy(self.info)
        return out

    def to_json(self) -> str:
        """Human-readable JSON: one line per step."""
        d = self.to_dict()
        steps = d.pop("steps")
        info = d.pop("info", None)
        head = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items())
        lines = ",\n".join("    " + json.dumps(s) for s in steps)
        text = "{\n" + head + ',\n  "steps": [\n' + lines + "\n  ]"
        if info is not None:
            text += ',\n  "info": ' + json.dumps(info, indent=2).replace("\n", "\n  ")
        return text + "\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    KEYS = ("format", "version", "nfe", "timesteps", "t_end", "afs", "afs_mean", "round_model_times", "ems",
            "steps", "info")

    @classmethod
    def from_dict(cls, data: Mapping) -> "USFSchedule":
        """Parse and validate the file format; ``ValueError`` naming the bad field."""
        _keys("schedule", data, cls.KEYS)
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"format={data.get('format')!r}: not a fewstep USF schedule (expected {FORMAT!r})")
        version = data.get("version", VERSION)
        if version != VERSION:
            raise ValueError(f"version={version!r} is not supported by this fewstep (reads version {VERSION})")
        for key in ("timesteps", "steps"):
            if key not in data:
                raise ValueError(f"schedule lacks {key!r}")
            if not isinstance(data[key], (list, tuple)):
                raise ValueError(f"{key} must be a list, got {type(data[key]).__name__}")
        t_end = data.get("t_end", "zero")
        if t_end != "zero":
            t_end = _number("t_end", t_end, lo=0.0)
        ems = data.get("ems")
        if ems is not None and not isinstance(ems, Mapping):
            raise ValueError(f"ems must be an object (name, sha256, num_grid) or null, got {ems!r}")
        sched = cls(
            timesteps=tuple(_number(f"timesteps[{i}]", t, lo=0.0) for i, t in enumerate(data["timesteps"])),
            steps=tuple(USFStep.from_dict(s, f"steps[{j}]") for j, s in enumerate(data["steps"])),
            t_end=t_end, afs=data.get("afs", "none"), afs_mean=data.get("afs_mean"),
            round_model_times=data.get("round_model_times", False), ems=None if ems is None else dict(ems),
            info=dict(data.get("info") or {}),
        ).validate()
        if "nfe" in data and data["nfe"] != sched.nfe:
            raise ValueError(f"nfe={data['nfe']!r} does not match the schedule, which evaluates the model "
                             f"{sched.nfe} times ({sched.num_steps} steps, afs={sched.afs!r})")
        return sched

    @classmethod
    def load(cls, source) -> "USFSchedule":
        """A schedule from a :class:`USFSchedule` (copied), a dict, a JSON file path or a shipped
        name (:data:`SHIPPED`, e.g. ``"digits-nfe5"``)."""
        if isinstance(source, USFSchedule):
            return copy.deepcopy(source).validate()
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"schedule must be a USFSchedule, a dict, a JSON path or a shipped name, got "
                            f"{type(source).__name__}")
        path = resolve_schedule_path(source)
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"schedule file {path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"schedule file {path}: {err}") from None

    def key(self) -> str:
        """A canonical string of the decisions (times to 1e-6), for de-duplicating candidates."""
        d = self.to_dict()
        d.pop("info", None)
        d["timesteps"] = [round(t, 6) for t in d["timesteps"]]
        return json.dumps(d, sort_keys=True)


def resolve_schedule_path(source: str | os.PathLike) -> Path:
    """A schedule file path or a shipped name -> the file; ``FileNotFoundError`` naming both."""
    if isinstance(source, str) and source in SHIPPED:
        from ..models import shipped_file

        return shipped_file(SHIPPED[source])
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"schedule {str(source)!r} is neither a file nor a shipped name "
                                f"({', '.join(sorted(SHIPPED))})")
    return path


def ems_fingerprint(ems) -> str:
    """sha256 (first 16 hex digits) of an EMS's grid and statistics ``lambdas, l, s, b``: recorded in
    schedules with v3 steps, so a schedule run with recomputed EMS warns."""
    h = hashlib.sha256()
    for arr in (ems.lambdas, ems.l, ems.s, ems.b):
        h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def ems_record(ems, name: str | None = None) -> dict:
    """The ``ems`` entry of a schedule: ``name`` (a shipped name or path, when known), ``sha256``, ``num_grid``."""
    rec = {"sha256": ems_fingerprint(ems), "num_grid": int(ems.num_grid)}
    if name is not None:
        rec["name"] = str(name)
    return rec


def multistep_step(prediction: str, order: int, **kw) -> USFStep:
    """A multistep step: expansion at the current point, the ``order - 1`` previous points."""
    return USFStep(prediction=prediction, order=order, points=tuple(range(1, order)), **kw)


# ------------------------------------------------------------------------------------------------
# export of hand-set schedulers
# ------------------------------------------------------------------------------------------------
def schedule_from_scheduler(scheduler, num_inference_steps: int | None = None, *, ems_name: str | None = None,
                            **set_timesteps_kwargs) -> USFSchedule:
    """The USF schedule that reproduces ``scheduler`` (a fewstep :class:`DPMSolverPPScheduler`, ODE
    multistep or singlestep, or :class:`DPMSolverV3Scheduler`) at ``num_inference_steps`` (or the
    explicit ``timesteps=``/``sigmas=`` of ``set_timesteps``): its points, orders, derivative points,
    relaxations (2M midpoint = ``dpmsolver-2``), 3M's halved second derivative, v3's EMS snapping and
    corrector. Executing the result with :class:`USFScheduler` gives the scheduler's samples (up to
    float rounding). ``ems_name``: how to record the v3 scheduler's EMS (a shipped name or path; the
    statistics' fingerprint is recorded always). ``scheduler`` is not modified. ``TypeError`` for
    other schedulers, ``ValueError`` for SDE variants (no deterministic schedule)."""
    from .dpm_v3 import DPMSolverV3Scheduler
    from .dpmpp import DPMSolverPPScheduler

    if isinstance(scheduler, DPMSolverV3Scheduler):
        export = _export_v3
    elif isinstance(scheduler, DPMSolverPPScheduler):
        if scheduler.config.algorithm_type != "dpmsolver++":
            raise ValueError(f"algorithm_type={scheduler.config.algorithm_type!r} is stochastic: an SDE solver has no "
                             "deterministic schedule to export")
        export = _export_dpmpp
    else:
        raise TypeError(f"cannot export {type(scheduler).__name__}: schedule_from_scheduler takes fewstep's "
                        "DPMSolverPPScheduler (ODE) and DPMSolverV3Scheduler")
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    steps = export(sched)
    n = len(sched.timesteps)
    end = "zero" if sched._sigmas[n] == 0 else float(sched.schedule.t_of_lambda(float(sched._lambdas[n])))
    ems = None
    if isinstance(sched, DPMSolverV3Scheduler) and sched.uses_ems:
        ems = ems_record(sched.ems, ems_name if ems_name is not None else sched.config.ems_file)
    info = {"exported_from": type(scheduler).__name__, "num_inference_steps": n, "settings": _settings(sched)}
    return USFSchedule(timesteps=tuple(_exact_times(sched)), steps=tuple(steps), t_end=end,
                       round_model_times=bool(sched._rounds_timesteps), ems=ems, info=info).validate()


def _settings(sched) -> dict:
    """The scheduler's config entries that differ from its class defaults (JSON-able)."""
    import inspect

    params = inspect.signature(type(sched).__init__).parameters
    out = {}
    for k, v in dict(sched.config).items():
        if k.startswith("_") or k not in params or isinstance(v, np.ndarray):
            continue
        default = params[k].default
        if isinstance(v, float) and isinstance(default, float) and (v == default or (v != v and default != default)):
            continue
        if v != default:
            out[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
    return out


def _exact_times(sched) -> list[float]:
    """The exact times of the scheduler's evaluation points: where its noise levels are (model
    times may be rounded copies)."""
    n = len(sched.timesteps)
    lam = np.asarray(sched._lambdas[:n], dtype=np.float64)
    model_t = np.asarray(sched.schedule.t_of_model_time(sched.timesteps.double().cpu().numpy()), dtype=np.float64)
    level_t = np.asarray(sched.schedule.t_of_lambda(lam), dtype=np.float64)
    # integer (rounded) model times that carry their own levels are stored as they are, bit-exactly
    model_lam = np.asarray(sched.schedule.lambda_(model_t), dtype=np.float64)
    same = np.abs(model_lam - lam) <= 1e-12 * np.maximum(1, abs(lam))
    return [float(m) if ok else float(t) for m, t, ok in zip(model_t, level_t, same)]


def _export_dpmpp(sched) -> list[USFStep]:
    c = sched.config
    n = len(sched.timesteps)
    midpoint = sched._solver_type == "midpoint"
    steps = []
    if c.method == "singlestep":  # the stages of DPMSolverPPScheduler._singlestep_update
        for i in range(n):
            _, stage, order = sched._plan_steps[i]
            if order == 1 or stage == 0:
                steps.append(USFStep("data", 1))
            elif order == 2:  # 2S: from the interval start, the midpoint ahead
                steps.append(USFStep("data", 2, start=1, points=(0,), relaxation="dpmsolver-2" if midpoint else "none"))
            elif stage == 1:  # 3S second stage: Taylor order 2 to the second intermediate point
                steps.append(USFStep("data", 2, start=1, points=(0,)))
            elif midpoint:  # 3S last stage, official "dpmsolver": order 2 through the second intermediate point
                steps.append(USFStep("data", 2, start=2, points=(0,)))
            else:  # 3S last stage, "taylor": both intermediate points
                steps.append(USFStep("data", 3, start=2, points=(1, 0)))
        return steps
    for i in range(n):  # the order rules of DPMSolverPPScheduler._multistep_update
        order = min(c.solver_order, i + 1)
        if i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"):
            order = 1
        elif i == n - 2 and c.lower_order_final and n < 15:
            order = min(order, 2)
        if not math.isfinite(sched._lambdas[i + 1]):
            order = 1
        kw = {}
        if order == 2 and midpoint:
            kw["relaxation"] = "dpmsolver-2"
        if order == 3 and not c.exact_third_order:
            kw["d2_scale"] = 0.5
        steps.append(multistep_step("data", order, **kw))
    return steps


def _export_v3(sched) -> list[USFStep]:
    """The orders and correctors of DPMSolverV3Scheduler._update. Without EMS (degenerate
    statistics l = 1, s = 0, b = 0) v3 is the data space, and its corrector, which keeps
    ``N = sigma eps - x`` fixed, keeps the evaluated ``x0``: the data space's corrector."""
    c = sched.config
    n = len(sched.timesteps)
    space = "v3" if sched.uses_ems else "data"
    steps = []
    for i in range(n):
        order = min(c.solver_order, i + 1)
        if c.lower_order_final:
            order = min(order, n - i)
        corrector = None
        if i < n - 1 and c.use_corrector and sched._corrector_active(sched._point(i + 1)):
            # corrected when the model has been evaluated at point i + 1
            c_order = min(order + int(c.corrector_pseudo), i + 2)
            if c_order > 1:
                corrector = USFCorrector(order=c_order, pseudo=bool(c.corrector_pseudo))
        steps.append(multistep_step(space, order, pseudo=bool(c.predictor_pseudo) and order > 1, corrector=corrector))
    return steps


def fields_of(cls) -> list[str]:
    """Field names of a schedule dataclass (for docs and tests)."""
    return [f.name for f in fields(cls)]
