"""The USF schedule search (Liu et al., ICLR 2024, Sec. 4, "S^3"): an evolutionary search over
solver schedules at a fixed number of model evaluations, seeded by fewstep's hand-set schedulers,
scored by a cheap proxy, optionally with a performance predictor that ranks proposals before they
are evaluated.

* Proxy (default): RMSE of the final samples to a many-step reference solve from the same start
  noise on a small fixed batch (:meth:`SearchProblem.reference`); ``proxy="fd"``: the problem's FD
  (FD-digits for the digits teacher) on a few hundred samples.
* Proposals follow the public USF code's mutation space (``utils/search_utils.py``, ``evo_search.yml``):
  parents drawn from the ``rank_bar`` best, crossover with probability 0.3 (deep, per-step, with
  0.5), then per step with probability 0.3 each: move the next point (Gaussian in lambda, scaled by
  the local gap), a new Taylor order ``{1: .2, 2: .4, 3: .3, 4: .1}``, a new prediction space
  ``{noise: .3, data: .3, v3: .4}`` (v3 only with EMS), a relaxation of the first derivative (linear
  coefficient random walk ``sigma = 0.03``, or a named one), the first derivative from 1 or 2 points,
  a corrector ``{none: .5, pseudo: .5}`` (never on the last step); the analytical first step
  ``{none: .3, zero_x0: .3, mean_x0: .4}`` with probability 0.3 (toggling it adds or removes a point,
  the NFE stays fixed). Every proposal is repaired into a valid schedule and de-duplicated.
* Predictor (``predictor=True``): extremely randomised trees on fixed-length schedule features fitted
  to ``log(score)`` of everything evaluated so far; each generation proposes ``pool`` times more
  candidates than it evaluates and evaluates the predicted best (plus a random ``explore`` share).
* State: a JSON log of every evaluated candidate, written atomically after every generation; every
  random draw of generation ``g`` comes from ``default_rng([seed, g])``, so a resumed search equals
  an uninterrupted one. Under ``accelerate launch`` the candidates of a generation are scored in
  parallel (round-robin) and the results gathered.

The mutation space and the predictor are in :mod:`fewstep.samplers.search_space`. Hyperparameters and
their reasons: docs/usf.md ("The search").
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .._io import atomic_write_json
from .search_problem import Batch, SearchProblem
from .search_space import STEP_FEATURES, Predictor, SearchSpace, _Space  # noqa: F401  (public via this module)
from .usf_schedule import (
    USFCorrector,
    USFSchedule,
    schedule_from_scheduler,
)

LOG_FORMAT = "fewstep-usf-search-log"
LOG_VERSION = 1
PROXIES = ("rmse", "fd")
HOLDOUT_SEED_OFFSET = 10_000  # held-out noise: seed + this, never the search batch


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
@dataclass
class SearchSettings:
    """Everything that determines a search's results (a resumed search must match).

    ``nfe``: model evaluations of every candidate; ``population``: candidates per generation;
    ``batch``: search-batch size (start noise seeded by ``seed``); ``proxy``: ``rmse`` or ``fd``
    (``fd_samples`` per candidate); ``reference_steps``: of the reference solve; ``predictor``,
    ``pool``, ``explore``, ``min_train``: the S^3 predictor (off by default); ``v3``: allow v3 steps
    (needs the problem's EMS); ``holdout``: size of the held-out report batch; ``validate_top``: at
    the end, the best this many are scored again on a validation batch (seed + 5000) and the best
    there is chosen (0: the best on the search batch)."""

    nfe: int = 5
    population: int = 16
    batch: int = 64
    seed: int = 0
    proxy: str = "rmse"
    fd_samples: int = 300
    reference_steps: int = 1000
    predictor: bool = False
    pool: int = 4
    explore: float = 0.25
    min_train: int = 24
    v3: bool = True
    holdout: int = 200
    validate_top: int = 8
    space: SearchSpace = field(default_factory=SearchSpace)

    def check(self) -> "SearchSettings":
        """``ValueError`` naming the setting for out-of-range values."""
        checks = [("nfe", 2 <= self.nfe <= 20, "2..20"), ("population", self.population >= 1, ">= 1"),
                  ("batch", self.batch >= 1, ">= 1"), ("reference_steps", self.reference_steps >= 10, ">= 10"),
                  ("fd_samples", self.fd_samples >= 10, ">= 10"), ("pool", self.pool >= 1, ">= 1"),
                  ("explore", 0.0 <= self.explore <= 1.0, "in [0, 1]"), ("min_train", self.min_train >= 2, ">= 2"),
                  ("holdout", self.holdout >= 0, ">= 0"), ("validate_top", self.validate_top >= 0, ">= 0")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; allowed: {allowed}")
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy={self.proxy!r} is not allowed; allowed: {', '.join(PROXIES)}")
        return self

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "SearchSettings":
        data = dict(data)
        space = {k: ({int(a) if a.isdigit() else a: b for a, b in v.items()} if isinstance(v, dict) else v)
                 for k, v in data.pop("space", {}).items()}
        return cls(**data, space=SearchSpace(**space))


# ------------------------------------------------------------------------------------------------
# the hand-set schedulers (seeds and report rows)
# ------------------------------------------------------------------------------------------------
def handset_schedulers(problem: SearchProblem, nfe: int, diffusers_rows: bool = True) -> list[tuple[str, Callable]]:
    """``[(name, factory)]`` of the hand-set schedulers at ``nfe`` evaluations on the problem's
    config: fewstep DPM-Solver++ (DDIM, 2M, 3M, heun 2M, exact 3M, singlestep 2S/3S) on the grids
    that start at ``t_max`` (trailing, time_power 1.3 and 2, logsnr with and without
    ``lambda_min_clipped=-5.1``, karras), DPM-Solver-v3 with the problem's EMS, and (``diffusers_rows``)
    diffusers' UniPC bh2, DEIS and DPMSolverMultistep 2M/3M on the trailing grid. ``factory()``
    returns a fresh scheduler; they run for ``nfe`` steps."""
    from ..schedule import NoiseSchedule
    from .dpm_v3 import DPMSolverV3Scheduler
    from .dpmpp import DPMSolverPPScheduler

    cfg = dict(problem.scheduler_config)
    spacings = NoiseSchedule.from_config(cfg).spacings
    grids = {"trailing": {"timestep_spacing": "trailing"}}
    if "time_power" in spacings:
        grids["power1.3"] = {"timestep_spacing": "time_power", "timestep_power": 1.3}
        grids["power2"] = {"timestep_spacing": "time_power", "timestep_power": 2.0}
    grids["logsnr"] = {"timestep_spacing": "logsnr", "round_timesteps": False}
    grids["logsnr-clip"] = {"timestep_spacing": "logsnr", "round_timesteps": False, "lambda_min_clipped": -5.1}
    grids["karras"] = {"timestep_spacing": "karras", "round_timesteps": False}

    def pp(**kw):
        return lambda: DPMSolverPPScheduler.from_config(cfg, **kw)

    rows = [("ddim trailing", pp(solver_order=1, timestep_spacing="trailing"))]
    for gname, g in grids.items():
        for order in (2, 3):
            rows.append((f"dpmpp-{order}m {gname}", pp(solver_order=order, **g)))
    rows.append(("dpmpp-2m-heun trailing", pp(solver_order=2, solver_type="heun", timestep_spacing="trailing")))
    rows.append(("dpmpp-3m-exact trailing", pp(solver_order=3, exact_third_order=True, timestep_spacing="trailing")))
    for order in (2, 3):
        for gname in ("trailing", "logsnr-clip"):
            rows.append((f"dpmpp-{order}s {gname}", pp(solver_order=order, method="singlestep", **grids[gname])))
    if problem.ems is not None:
        for order in (2, 3):
            for gname in ("trailing", "power1.3", "logsnr-clip"):
                if gname not in grids:
                    continue
                g = {k: v for k, v in grids[gname].items() if k != "round_timesteps"}
                rows.append((f"v3-o{order} {gname}",
                             lambda order=order, g=g: DPMSolverV3Scheduler.from_config(cfg, ems=problem.ems,
                                                                                      solver_order=order, **g)))
    if diffusers_rows:
        from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

        tr = {"timestep_spacing": "trailing"}
        rows += [("diffusers unipc-bh2 o2", lambda: UniPCMultistepScheduler.from_config(cfg, solver_order=2, **tr)),
                 ("diffusers unipc-bh2 o3", lambda: UniPCMultistepScheduler.from_config(cfg, solver_order=3, **tr)),
                 ("diffusers deis o2", lambda: DEISMultistepScheduler.from_config(cfg, solver_order=2, **tr)),
                 ("diffusers dpmpp-2m", lambda: DPMSolverMultistepScheduler.from_config(cfg, solver_order=2, **tr)),
                 ("diffusers dpmpp-3m", lambda: DPMSolverMultistepScheduler.from_config(cfg, solver_order=3, **tr))]
    return rows


def seed_schedules(problem: SearchProblem, settings: SearchSettings) -> list[tuple[str, USFSchedule]]:
    """The initial population: every fewstep hand-set scheduler of :func:`handset_schedulers` exported
    at the search's NFE, plus USF combinations of them: a UniPC-style corrector (order + 1, bh2
    relaxation) on 2M/3M, and the analytical first step (one more point) on 2M/3M."""
    out = []
    for name, factory in handset_schedulers(problem, settings.nfe, diffusers_rows=False):
        if name.startswith("v3") and not settings.v3:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append((name, schedule_from_scheduler(factory(), settings.nfe, ems_name=problem.ems_name)))
    by_name = dict(out)
    for base in ("dpmpp-2m trailing", "dpmpp-3m trailing", "dpmpp-2m power1.3", "dpmpp-3m power1.3"):
        if base not in by_name:
            continue
        s = copy.deepcopy(by_name[base])
        last = len(s.steps) - 1
        s.steps = tuple(dataclasses.replace(st, corrector=USFCorrector(order=st.order + 1, relaxation="unipc-bh2"))
                        if j < last else st for j, st in enumerate(s.steps))
        out.append((base.replace("dpmpp", "unipc-like"), s))
    afs_kinds = ["zero_x0"] + (["mean_x0"] if problem.mean_x0 is not None else [])
    pp = {n: f for n, f in handset_schedulers(problem, settings.nfe, diffusers_rows=False)}
    for base in ("dpmpp-2m trailing", "dpmpp-3m trailing", "dpmpp-2m power1.3"):
        if base not in pp:
            continue
        for kind in afs_kinds:
            s = schedule_from_scheduler(pp[base](), settings.nfe + 1)
            s.afs = kind
            out.append((f"{base} afs-{kind}", s))
    space = _Space(problem, settings)
    result = []
    for name, s in out:
        s = space.normalize(s)
        if s is not None:
            s.info = {"seed": name}
            result.append((name, s))
    return result


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def make_usf(problem: SearchProblem, schedule):
    """A :class:`USFScheduler` for ``schedule`` on the problem's config (EMS warnings silenced)."""
    from .usf import USFScheduler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return USFScheduler.from_config(dict(problem.scheduler_config), schedule=schedule, ems=problem.ems)


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root-mean-square difference over the batch and every dimension (float64)."""
    return float(((x.double() - ref.double()) ** 2).mean().sqrt())


def score_schedule(problem: SearchProblem, schedule: USFSchedule, batch: Batch, ref: torch.Tensor | None,
                   proxy: str = "rmse") -> tuple[float, str | None]:
    """``(score, error)``: the proxy of ``schedule`` on ``batch`` (RMSE to ``ref``, or the problem's FD);
    ``inf`` with the error message when sampling fails or produces non-finite values."""
    try:
        x = problem.sample(make_usf(problem, schedule), batch)
        value = rmse(x, ref) if proxy == "rmse" else float(problem.fd_fn(x, batch))
    except (FloatingPointError, ValueError, RuntimeError, np.linalg.LinAlgError) as err:
        return math.inf, f"{type(err).__name__}: {err}"[:300]
    if not math.isfinite(value):
        return math.inf, "non-finite samples"
    return value, None


def _parallel(fn: Callable[[Any], Any], items: list, acc) -> list:
    """``[fn(item) for item in items]``, the items dealt round-robin over the processes of ``acc``
    (an ``accelerate.Accelerator`` or None) and the results gathered in order on every process."""
    if acc is None or acc.num_processes == 1:
        return [fn(item) for item in items]
    from accelerate.utils import gather_object

    mine = [(i, fn(item)) for i, item in enumerate(items) if i % acc.num_processes == acc.process_index]
    gathered = gather_object(mine)
    out = [None] * len(items)
    for i, value in gathered:
        out[i] = value
    return out


def sharded_reference(problem: SearchProblem, batch: Batch, steps: int, acc, chunk: int = 32) -> torch.Tensor:
    """:meth:`SearchProblem.reference` of ``batch`` in chunks of ``chunk`` rows, the chunks dealt over
    the processes (a row's result does not depend on the chunking of the others)."""
    chunks = [slice(i, min(i + chunk, len(batch))) for i in range(0, len(batch), chunk)]
    parts = _parallel(lambda sl: problem.reference(batch.rows(sl), steps).cpu(), chunks, acc)
    return torch.cat(parts).to(batch.noise.device)


# ------------------------------------------------------------------------------------------------
# the search
# ------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """The best schedule, every evaluated candidate (log entries), and the cost."""

    best: USFSchedule
    best_score: float
    candidates: list[dict]
    evaluations: int
    seconds: float
    generations: int
    log: dict


def _settings_key(problem: SearchProblem, settings: SearchSettings) -> dict:
    from .usf_schedule import ems_fingerprint

    return {"settings": settings.to_dict(), "problem": problem.name, "guidance_scale": problem.guidance_scale,
            "ems": None if problem.ems is None else ems_fingerprint(problem.ems)}


def run_search(problem: SearchProblem, settings: SearchSettings, *, budget_evals: int | None = None,
               budget_minutes: float | None = None, log_path: str | os.PathLike | None = None,
               out_path: str | os.PathLike | None = None, resume: bool = False, progress: bool = False,
               accelerator=None, stop_after_generations: int | None = None,
               seeds: Sequence[tuple[str, USFSchedule]] = ()) -> SearchResult:
    """Search schedules for ``problem`` (see the module docstring).

    Args:
        problem, settings: what to search on and how (:class:`SearchSettings`).
        budget_evals, budget_minutes: stop at the first generation boundary past either (at least
            one must be given; minutes count every run of a resumed search).
        log_path: the JSON log of every candidate (written after every generation); with ``resume``
            an existing log is continued (its settings must match), without it an existing log is an
            error. ``out_path``: the best schedule so far, written after every generation.
        accelerator: an ``accelerate.Accelerator`` to score candidates over its processes.
        stop_after_generations: end after that many generations of this call (tests: an interrupt).
        seeds: extra ``(name, schedule)`` seeds evaluated in generation 0 next to the hand-set ones
            (e.g. an earlier search's best, or a hand-tuned grid); each must have ``settings.nfe``
            evaluations and fit the search space (``ValueError`` naming it otherwise).
    """
    settings.check()
    if budget_evals is None and budget_minutes is None:
        raise ValueError("give a budget: budget_evals (evaluations) or budget_minutes")
    if settings.proxy == "fd" and problem.fd_fn is None:
        raise ValueError(f"proxy='fd' needs an FD for the model ({problem.name} has none; FD-digits exists for "
                         "the digits teacher); use proxy='rmse'")
    main = accelerator is None or accelerator.is_main_process
    log_path = Path(log_path) if log_path is not None else None
    key = _settings_key(problem, settings)
    log = None
    if log_path is not None and log_path.exists():
        if not resume:
            raise ValueError(f"search log {log_path} exists: pass resume=True (--resume) to continue it, or "
                                  "remove it")
        log = json.loads(log_path.read_text())
        if log.get("format") != LOG_FORMAT or log.get("key") != key:
            raise ValueError(f"search log {log_path} was written with other settings; resume needs the same "
                             f"(log: {log.get('key')}, now: {key})")
    if log is None:
        log = {"format": LOG_FORMAT, "version": LOG_VERSION, "key": key, "generation": -1, "seconds": 0.0,
               "reference_seconds": 0.0, "candidates": []}
    space = _Space(problem, settings)
    extra = []
    for name, sched in seeds:
        if sched.uses_v3 and space.ems is None:
            raise ValueError(f"seed schedule {name!r} has DPM-Solver-v3 steps, but this search has no EMS or "
                             "v3 is off (settings.v3=False / --no-v3)")
        norm = space.normalize(copy.deepcopy(sched))
        if norm is None:
            raise ValueError(f"seed schedule {name!r} ({sched.nfe} evaluations, v3: {sched.uses_v3}) does not fit "
                             f"this search: it needs nfe={settings.nfe}, distinct times and, for v3 steps, the "
                             "problem's EMS with v3 allowed")
        norm.info = {"seed": name}
        extra.append((name, norm))
    batch = problem.make_batch(settings.fd_samples if settings.proxy == "fd" else settings.batch, settings.seed)
    t_start = time.perf_counter()
    seconds_before = float(log["seconds"])
    ref = None
    if settings.proxy == "rmse":
        ref = _cached_reference(problem, batch, settings, key, _side_file(log_path, "reference"), accelerator, log,
                                "reference_seconds")
    seen = {USFSchedule.from_dict(c["schedule"]).key() for c in log["candidates"]}
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=budget_evals, initial=len(log["candidates"]), desc=f"search nfe={settings.nfe}", unit="eval")

    def elapsed_minutes() -> float:
        return (seconds_before + time.perf_counter() - t_start) / 60.0

    def evaluate(entries: list[dict]) -> None:
        def one(entry):
            t0 = time.perf_counter()
            value, err = score_schedule(problem, USFSchedule.from_dict(entry["schedule"]), batch, ref, settings.proxy)
            return value, err, time.perf_counter() - t0

        for entry, (value, err, sec) in zip(entries, _parallel(one, entries, accelerator)):
            entry["score"] = value if math.isfinite(value) else None
            if err:
                entry["error"] = err
            entry["seconds"] = round(sec, 4)
            entry["id"] = len(log["candidates"])
            log["candidates"].append(entry)
        if bar is not None:
            bar.update(len(entries))
            best = _best(log["candidates"])
            if best is not None:
                bar.set_postfix(best=f"{best['score']:.4g}")

    def checkpoint() -> None:
        log["seconds"] = seconds_before + time.perf_counter() - t_start
        if main and log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(log_path, log, indent=1)
        if main and out_path is not None:
            best = _chosen(log)
            if best is not None:
                _best_schedule(best, log, problem, settings).save(out_path)

    generations_run = 0
    if log["generation"] < 0:  # generation 0: the seeds
        entries = []
        for name, s in [*seed_schedules(problem, settings), *extra]:
            k = s.key()
            if k in seen:
                continue
            seen.add(k)
            entries.append({"generation": 0, "origin": f"seed:{name}", "parents": [], "schedule": s.to_dict()})
        evaluate(entries)
        log["generation"] = 0
        generations_run += 1
        checkpoint()

    def budget_left() -> bool:
        if budget_evals is not None and len(log["candidates"]) >= budget_evals:
            return False
        return budget_minutes is None or elapsed_minutes() < budget_minutes

    while budget_left() and (stop_after_generations is None or generations_run < stop_after_generations):
        g = log["generation"] + 1
        rng = np.random.default_rng([settings.seed, g])
        entries = _propose(space, log["candidates"], settings, rng, seen, g)
        if not entries:
            break  # the space is exhausted around the population
        log.pop("chosen", None)  # a validated choice of an earlier run is stale now
        evaluate(entries)
        log["generation"] = g
        generations_run += 1
        checkpoint()
    if bar is not None:
        bar.close()
    best = _best(log["candidates"])
    if best is None:
        raise RuntimeError("no candidate produced finite samples")
    finished = stop_after_generations is None or generations_run < stop_after_generations
    if settings.validate_top > 0 and finished:
        best = _validate(problem, settings, key, log, log_path, accelerator)
        log["chosen"] = best["id"]
        checkpoint()
    return SearchResult(best=_best_schedule(best, log, problem, settings), best_score=best["score"],
                        candidates=log["candidates"], evaluations=len(log["candidates"]),
                        seconds=float(log["seconds"]), generations=log["generation"], log=log)


VALIDATION_SEED_OFFSET = 5_000  # the validation batch of the final choice: seed + this


def _side_file(log_path: Path | None, what: str) -> Path | None:
    return None if log_path is None else log_path.with_name(f"{log_path.name}.{what}.pt")


def _cached_reference(problem, batch, settings, key, cache: Path | None, acc, log, seconds_key: str) -> torch.Tensor:
    """The reference of ``batch``, cached in ``cache`` (next to the log) so a resumed search does not
    solve it again; the solve time goes to ``log[seconds_key]``."""
    digest = hashlib.sha256(json.dumps([key, len(batch)], sort_keys=True).encode()).hexdigest()[:16]
    if cache is not None and cache.exists():
        data = torch.load(cache, map_location="cpu", weights_only=True)
        if data.get("key") == digest:
            return data["ref"].to(batch.noise.device)
    t0 = time.perf_counter()
    ref = sharded_reference(problem, batch, settings.reference_steps, acc)
    log[seconds_key] = round(time.perf_counter() - t0, 2)
    if cache is not None and (acc is None or acc.is_main_process):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save({"key": digest, "ref": ref.cpu()}, tmp)
        os.replace(tmp, cache)
    return ref


def _validate(problem, settings, key, log, log_path, acc) -> dict:
    """Score the ``validate_top`` best candidates (by search score) on the validation batch (seed +
    5000) and return the best there: the search batch's score is biased towards schedules that fit
    its noise. Scores are kept in the entries (``validation``)."""
    top = sorted((c for c in log["candidates"] if c.get("score") is not None),
                 key=lambda c: (c["score"], c["id"]))[: settings.validate_top]
    size = settings.fd_samples if settings.proxy == "fd" else settings.batch
    vbatch = problem.make_batch(size, settings.seed + VALIDATION_SEED_OFFSET)
    vref = None
    if settings.proxy == "rmse":
        vref = _cached_reference(problem, vbatch, settings, key, _side_file(log_path, "validation"), acc, log,
                                 "validation_seconds")
    todo = [c for c in top if "validation" not in c]

    def one(entry):
        return score_schedule(problem, USFSchedule.from_dict(entry["schedule"]), vbatch, vref, settings.proxy)[0]

    for entry, value in zip(todo, _parallel(one, todo, acc)):
        entry["validation"] = value if math.isfinite(value) else None
    valid = [c for c in top if c.get("validation") is not None]
    return min(valid, key=lambda c: (c["validation"], c["id"])) if valid else top[0]


def _chosen(log: dict) -> dict | None:
    """The validated choice when the search has finished, else the best on the search batch."""
    if "chosen" in log:
        return log["candidates"][log["chosen"]]
    return _best(log["candidates"])


def _best(candidates: list[dict]) -> dict | None:
    scored = [c for c in candidates if c.get("score") is not None]
    return min(scored, key=lambda c: (c["score"], c["id"])) if scored else None


def _best_schedule(entry: dict, log: dict, problem: SearchProblem, settings: SearchSettings) -> USFSchedule:
    s = USFSchedule.from_dict(entry["schedule"])
    s.info = {"model": problem.name, "guidance_scale": problem.guidance_scale, "nfe": settings.nfe,
              "search": {"proxy": settings.proxy, "score": entry["score"], "candidate": entry["id"],
                         "validation": entry.get("validation"), "origin": entry["origin"],
                         "evaluations": len(log["candidates"]),
                         "generations": log["generation"], "minutes": round(float(log["seconds"]) / 60.0, 2),
                         "batch": settings.batch, "seed": settings.seed, "reference_steps": settings.reference_steps,
                         "predictor": settings.predictor}}
    return s


def _propose(space: _Space, candidates: list[dict], settings: SearchSettings, rng: np.random.Generator,
             seen: set, generation: int) -> list[dict]:
    """One generation's new candidates (see the module docstring)."""
    scored = sorted((c for c in candidates if c.get("score") is not None), key=lambda c: (c["score"], c["id"]))
    if not scored:
        return []
    parents = scored[: space.cfg.rank_bar]
    schedules = {c["id"]: USFSchedule.from_dict(c["schedule"]) for c in parents}
    use_predictor = settings.predictor and len(scored) >= settings.min_train
    want = settings.population * (settings.pool if use_predictor else 1)
    proposals, keys = [], set()
    tries = 0
    while len(proposals) < want and tries < 50 * want:
        tries += 1
        if len(parents) > 1 and rng.random() < space.cfg.p_crossover:
            a, b = rng.choice(len(parents), 2, replace=False)
            pa, pb = parents[int(a)], parents[int(b)]
            child = space.crossover(schedules[pa["id"]], schedules[pb["id"]], rng)
            origin, ids = "crossover", [pa["id"], pb["id"]]
        else:
            pa = parents[int(rng.integers(len(parents)))]
            child, origin, ids = schedules[pa["id"]], "mutation", [pa["id"]]
        child = space.normalize(space.mutate(child, rng))
        if child is None:
            continue
        k = child.key()
        if k in seen or k in keys:
            continue
        keys.add(k)
        child.info = {}
        proposals.append({"generation": generation, "origin": origin, "parents": ids, "schedule": child.to_dict()})
    if use_predictor and proposals:
        feats = np.stack([space.features(USFSchedule.from_dict(c["schedule"])) for c in scored])
        model = Predictor(settings.seed + generation).fit(feats, np.asarray([c["score"] for c in scored]))
        pred = model.predict(np.stack([space.features(USFSchedule.from_dict(p["schedule"])) for p in proposals]))
        for p, v in zip(proposals, pred):
            p["predicted"] = float(v)
        order = list(np.argsort(pred, kind="stable"))
        n_explore = int(round(settings.explore * settings.population))
        chosen = order[: settings.population - n_explore]
        rest = order[settings.population - n_explore:]
        if n_explore and rest:
            chosen += list(rng.choice(rest, min(n_explore, len(rest)), replace=False))
        proposals = [proposals[int(i)] for i in sorted(chosen)]
    for p in proposals:
        seen.add(USFSchedule.from_dict(p["schedule"]).key())
    return proposals


# ------------------------------------------------------------------------------------------------
# the held-out report
# ------------------------------------------------------------------------------------------------
def holdout_report(problem: SearchProblem, schedules: dict[str, USFSchedule], settings: SearchSettings,
                   accelerator=None, with_fd: bool = False, diffusers_rows: bool = True) -> dict:
    """RMSE to the reference (and FD when ``with_fd`` and the problem has one) on held-out noise
    (seed ``settings.seed + 10000``, ``settings.holdout`` samples; never the search batch) of the
    given ``schedules`` and of every hand-set scheduler (:func:`handset_schedulers`), run natively.
    Returns ``{"rows": {name: {...}}, "best_handset": name, "n": ..., "seed": ...}``."""
    n = settings.holdout
    seed = settings.seed + HOLDOUT_SEED_OFFSET
    batch = problem.make_batch(n, seed)
    t0 = time.perf_counter()
    ref = sharded_reference(problem, batch, settings.reference_steps, accelerator)
    ref_seconds = time.perf_counter() - t0
    items = [(name, "usf", s) for name, s in schedules.items()]
    items += [(name, "hand-set", f) for name, f in handset_schedulers(problem, settings.nfe, diffusers_rows)]

    def one(item):
        name, group, obj = item
        t1 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if group == "usf":
                    x = problem.sample(make_usf(problem, obj), batch)
                else:
                    x = problem.sample(obj(), batch, settings.nfe)
            row = {"group": group if not name.startswith("diffusers") else "diffusers", "rmse": rmse(x, ref)}
            if with_fd and problem.fd_fn is not None:
                row["fd"] = float(problem.fd_fn(x, batch))
        except (FloatingPointError, ValueError, RuntimeError) as err:
            row = {"group": group, "rmse": None, "error": f"{type(err).__name__}: {err}"[:200]}
        row["seconds"] = round(time.perf_counter() - t1, 3)
        return row

    rows = dict(zip([i[0] for i in items], _parallel(one, items, accelerator)))
    hand = {k: v for k, v in rows.items() if v["group"] != "usf" and v.get("rmse") is not None}
    best_hand = min(hand, key=lambda k: hand[k]["rmse"]) if hand else None
    return {"rows": rows, "best_handset": best_hand, "n": n, "seed": seed, "reference_steps": settings.reference_steps,
            "reference_seconds": round(ref_seconds, 2)}


def format_report(report: dict) -> str:
    """A plain-text table of :func:`holdout_report`, sorted by RMSE, with the ratio to the best
    hand-set scheduler."""
    rows = report["rows"]
    best = report["best_handset"]
    base = rows[best]["rmse"] if best else None
    fd = any("fd" in r for r in rows.values())
    width = max(len(k) for k in rows)
    lines = [f"held-out noise: n={report['n']}, seed={report['seed']}, reference: {report['reference_steps']} steps",
             f"{'schedule':<{width}}  {'group':<9}  {'rmse':>9}  {'/best':>6}" + ("  {:>8}".format("fd") if fd else "")]
    for name, r in sorted(rows.items(), key=lambda kv: (kv[1]["rmse"] is None, kv[1]["rmse"] or 0)):
        if r["rmse"] is None:
            lines.append(f"{name:<{width}}  {r['group']:<9}  failed: {r.get('error', '')}")
            continue
        ratio = f"{r['rmse'] / base:6.3f}" if base else "     -"
        line = f"{name:<{width}}  {r['group']:<9}  {r['rmse']:9.5f}  {ratio}"
        if fd:
            line += f"  {r.get('fd', float('nan')):8.3f}"
        lines.append(line)
    return "\n".join(lines)
