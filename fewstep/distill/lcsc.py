"""LCSC: linear combinations of saved checkpoints, with coefficients found by evolutionary search.

Liu et al., "Linear Combination of Saved Checkpoints Makes Consistency and Diffusion Models Better"
(ICLR 2025, arXiv 2404.02241). Given K checkpoints ``theta_1 .. theta_K`` saved along one training
run, the merged model is (paper Eq. 3)::

    theta(alpha) = sum_i alpha_i theta_i,      sum_i alpha_i = 1  (alpha_i may be negative)

EMA is the special case ``alpha_i`` proportional to ``gamma^(K-i)``; LCSC searches ``alpha`` directly
for the lowest value of a generation metric (the fitness). The authors never released their search
code; this module is a documented (mu + lambda) evolution strategy (see :class:`SearchConfig`).

* Inputs (:func:`checkpoint_refs`): trainer run folders (every checkpoint of
  :func:`fewstep.distill.list_checkpoints`), diffusers model folders (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, or a pipeline folder's ``unet/``) and ``.safetensors`` files.
* :func:`merge` builds ``theta(alpha)`` *streaming*: checkpoints are read one at a time and
  accumulated in place into the candidate's tensors (a model's own ``state_dict()``), so memory is
  one model plus one checkpoint, whatever K is.
* :func:`search`: the evolutionary search with any fitness ``f(model) -> float`` (lower is better):
  :class:`DigitsFDFitness` (FD-digits at a fixed NFE on fixed noise) or :class:`TrajectoryFitness`
  (mean squared distance to a reference sample from the same noise, e.g. the teacher's 50-step ODE
  solution). Every candidate is logged to ``search_log.json`` (atomic rewrite per candidate); an
  interrupted search resumes to exactly the uninterrupted result (the random draws of generation
  ``g`` come from ``(seed, g)`` and logged fitness values are reused).

Reading checkpoints, merging and the template/export live in :mod:`fewstep.distill.lcsc_merge` (re-exported
here). See docs/lcsc.md for the CLI (``fewstep lcsc``), the hyperparameters and measured results.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .._io import atomic_write_json
from .lcsc_merge import (  # noqa: F401  (the merge half of LCSC, public through this module)
    DIFFUSERS_WEIGHTS,
    RAW_WEIGHTS,
    CheckpointRef,
    Template,
    check_alpha,
    checkpoint_refs,
    load_template,
    merge,
    read_state,
    save_merged,
)

SEARCH_LOG = "search_log.json"


# ------------------------------------------------------------------------------------------------
# fitness functions (lower is better)
# ------------------------------------------------------------------------------------------------
def fixed_noise(n: int, seed: int, shape=(1, 8, 8)) -> torch.Tensor:
    """Standard normal start noise ``(n, *shape)`` from ``torch.Generator().manual_seed(seed)``."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(int(seed)))


class _DigitsSamples:
    """Samples of a digits pipeline (teacher or student) at ``nfe`` steps from fixed noise: ``n`` labels
    balanced over 0..9, noise from ``noise_seed``, multistep re-noising from ``renoise_seed``. The
    pipeline's ``unet`` is the candidate (merged in place by :func:`search`)."""

    def __init__(self, pipeline, nfe: int = 1, num_samples: int = 500, noise_seed: int = 7,
                 renoise_seed: int | None = None, guidance_scale: float = 1.0, chunk: int = 500):
        if not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
        if not isinstance(num_samples, int) or num_samples < 10 or num_samples % 10:
            raise ValueError(f"num_samples must be a positive multiple of 10 (balanced classes), got {num_samples!r}")
        self.pipeline, self.nfe, self.n = pipeline, nfe, num_samples
        self.noise_seed = int(noise_seed)
        self.renoise_seed = int(renoise_seed) if renoise_seed is not None else self.noise_seed + 10_000
        self.guidance_scale, self.chunk = float(guidance_scale), int(chunk)
        self.labels = torch.arange(10).repeat_interleave(num_samples // 10)
        self.noise = fixed_noise(num_samples, self.noise_seed)

    @torch.no_grad()
    def samples(self, pipeline=None, steps: int | None = None) -> torch.Tensor:
        """Images in [0, 1] ``(n, 1, 8, 8)`` of ``pipeline`` (default: this one) at ``steps`` (default ``nfe``)."""
        pipe = pipeline if pipeline is not None else self.pipeline
        gen = torch.Generator().manual_seed(self.renoise_seed)
        out = []
        for i in range(0, self.n, self.chunk):
            res = pipe(self.labels[i:i + self.chunk], num_inference_steps=steps or self.nfe,
                       guidance_scale=self.guidance_scale, latents=self.noise[i:i + self.chunk],
                       generator=gen, output_type="pt")
            out.append(res.images)
        return torch.cat(out)

    def describe(self) -> dict:
        return {"nfe": self.nfe, "num_samples": self.n, "noise_seed": self.noise_seed,
                "renoise_seed": self.renoise_seed, "guidance_scale": self.guidance_scale}


class DigitsFDFitness(_DigitsSamples):
    """FD-digits (:func:`fewstep.eval.fd_digits.fd_digits`, against the 360 held-out test digits) of the
    pipeline's samples at ``nfe`` steps on fixed noise (see :class:`_DigitsSamples`). Call it with no
    argument (or the model, ignored: the pipeline holds it) for the FD; :meth:`score` also gives the
    class accuracy. Use a ``noise_seed`` for the search and different ones for reported numbers."""

    name = "fd"

    def __init__(self, pipeline, nfe: int = 1, num_samples: int = 500, noise_seed: int = 7, **kw):
        from fewstep.eval.fd_digits import DigitsFeatures, reference_stats

        super().__init__(pipeline, nfe, num_samples, noise_seed, **kw)
        self.extractor = DigitsFeatures()
        self.reference = reference_stats(self.extractor)

    def score(self, pipeline=None, steps: int | None = None) -> dict:
        """``{"fd", "acc"}`` of ``pipeline`` (default: this one) at ``steps`` (default ``nfe``)."""
        from fewstep.eval.fd_digits import fd_digits

        r = fd_digits(self.samples(pipeline, steps), labels=self.labels, extractor=self.extractor,
                      reference=self.reference)
        return {"fd": float(r["fd"]), "acc": float(r["accuracy"])}

    def __call__(self, model=None) -> float:
        return self.score()["fd"]


class TrajectoryFitness(_DigitsSamples):
    """Mean squared distance (per pixel, images in [0, 1]) between the pipeline's ``nfe``-step samples
    and ``reference`` samples from the same noise and labels -- e.g. the teacher's 50-step DDIM
    solution (:meth:`teacher_reference`): the error to a reference trajectory's end point."""

    name = "trajectory"

    def __init__(self, pipeline, reference: torch.Tensor, nfe: int = 1, num_samples: int = 500,
                 noise_seed: int = 7, **kw):
        super().__init__(pipeline, nfe, num_samples, noise_seed, **kw)
        if tuple(reference.shape) != tuple(self.noise.shape):
            raise ValueError(f"reference must have shape {tuple(self.noise.shape)} (one image per noise sample), "
                             f"got {tuple(reference.shape)}")
        self.reference = reference.float()

    @classmethod
    def teacher_reference(cls, num_samples: int = 500, noise_seed: int = 7, steps: int = 50) -> torch.Tensor:
        """The digits teacher's deterministic DDIM solution (``steps`` steps, unguided) from the noise
        and labels :class:`TrajectoryFitness` uses with the same ``num_samples`` / ``noise_seed``."""
        from diffusers import DDIMScheduler

        from fewstep.models import load_digits_pipeline

        return _DigitsSamples(load_digits_pipeline(scheduler=DDIMScheduler), steps, num_samples,
                              noise_seed).samples()

    def __call__(self, model=None) -> float:
        return float((self.samples() - self.reference).square().mean())


# ------------------------------------------------------------------------------------------------
# the evolutionary search
# ------------------------------------------------------------------------------------------------
@dataclass
class SearchConfig:
    """Hyperparameters of the (mu + lambda) evolution strategy over ``alpha`` (defaults in brackets).

    * ``population`` [16] -- mu: candidates kept after every generation (the best ones: elitist
      survivor selection from parents and children together), also the size of the initial population.
    * ``offspring`` [16] -- lambda: children per generation.
    * ``budget`` [400] -- total fitness evaluations, the initial population included.
    * ``mutation_std`` [0.05] -- sigma of the Gaussian mutation added to every coefficient of a child.
    * ``crossover`` [0.5] -- probability that a child is a uniform crossover of two parents (each
      coefficient from either, 50/50) before the mutation; otherwise a copy of one parent.
    * ``max_l1`` [3.0] -- cap on ``||alpha||_1``: a child beyond it is pulled towards the uniform
      average ``1/K`` until ``||alpha||_1 = max_l1`` (bounds the extrapolation; EMA has norm 1).
    * ``ema_gammas`` [0.5, 0.7, 0.8, 0.9, 0.95] -- decays of the EMA-profile seeds
      ``alpha_i ~ gamma^(K-i)`` of the initial population.
    * ``seed`` [0] -- generation ``g`` draws from ``numpy.random.default_rng([seed, g])``.

    Every child is renormalised to ``sum alpha = 1``. The initial population is: the last checkpoint
    (one-hot), the uniform average, the uniform average of the last half, the EMA profiles, then
    mutations of these up to ``population``. Parents are drawn uniformly from the current population.
    """

    population: int = 16
    offspring: int = 16
    budget: int = 400
    mutation_std: float = 0.05
    crossover: float = 0.5
    max_l1: float = 3.0
    ema_gammas: tuple = (0.5, 0.7, 0.8, 0.9, 0.95)
    seed: int = 0

    def __post_init__(self):
        for key, low in (("population", 1), ("offspring", 1), ("budget", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{key} = {v!r} must be an integer >= {low}")
        if self.budget < self.population:
            raise ValueError(f"budget = {self.budget} must be >= population = {self.population} "
                             "(the initial population is evaluated first)")
        if not (math.isfinite(self.mutation_std) and self.mutation_std > 0):
            raise ValueError(f"mutation_std = {self.mutation_std!r} must be a number > 0")
        if not 0 <= self.crossover <= 1:
            raise ValueError(f"crossover = {self.crossover!r} must be in [0, 1]")
        if not (math.isfinite(self.max_l1) and self.max_l1 >= 1):
            raise ValueError(f"max_l1 = {self.max_l1!r} must be >= 1 (||alpha||_1 >= |sum alpha| = 1)")
        self.ema_gammas = tuple(float(g) for g in self.ema_gammas)
        if any(not 0 < g < 1 for g in self.ema_gammas):
            raise ValueError(f"ema_gammas = {list(self.ema_gammas)} must lie in (0, 1)")


def _normalise(a: np.ndarray, max_l1: float) -> np.ndarray:
    """``a`` rescaled to sum 1 (a zero sum: shifted instead) and pulled towards ``1/K`` to ``||a||_1 <= max_l1``."""
    k = a.shape[0]
    s = a.sum()
    a = a / s if abs(s) > 1e-8 else a + (1.0 - s) / k
    if np.abs(a).sum() <= max_l1:
        return a
    u = np.full(k, 1.0 / k)
    lo, hi = 0.0, 1.0  # ||u + t (a - u)||_1 is convex in t, = 1 at t = 0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.abs(u + mid * (a - u)).sum() <= max_l1 else (lo, mid)
    return u + lo * (a - u)


def initial_population(k: int, cfg: SearchConfig) -> list[np.ndarray]:
    """The generation-0 candidates (see :class:`SearchConfig`)."""
    seeds = [np.eye(k)[k - 1], np.full(k, 1.0 / k)]
    half = np.zeros(k)
    half[k // 2:] = 1.0
    seeds.append(half / half.sum())
    for g in cfg.ema_gammas:
        w = g ** np.arange(k - 1, -1, -1, dtype=np.float64)
        seeds.append(w / w.sum())
    uniq: list[np.ndarray] = []
    for s in seeds:
        if not any(np.allclose(s, u) for u in uniq):
            uniq.append(s)
    rng = np.random.default_rng([cfg.seed, 0])
    pop = uniq[:cfg.population]
    base = list(pop)
    while len(pop) < cfg.population:
        parent = base[int(rng.integers(len(base)))]
        pop.append(_normalise(parent + rng.normal(0.0, cfg.mutation_std, k), cfg.max_l1))
    return pop


def children(population: list[np.ndarray], count: int, cfg: SearchConfig, generation: int) -> list[np.ndarray]:
    """``count`` children of ``population`` for ``generation`` >= 1: uniform crossover (probability
    ``cfg.crossover``), Gaussian mutation, renormalisation; deterministic in ``(cfg.seed, generation)``."""
    rng = np.random.default_rng([cfg.seed, generation])
    k = population[0].shape[0]
    out = []
    for _ in range(count):
        a = population[int(rng.integers(len(population)))]
        if rng.random() < cfg.crossover and len(population) > 1:
            b = population[int(rng.integers(len(population)))]
            child = np.where(rng.random(k) < 0.5, a, b)
        else:
            child = a.copy()
        out.append(_normalise(child + rng.normal(0.0, cfg.mutation_std, k), cfg.max_l1))
    return out


@dataclass
class SearchResult:
    """What :func:`search` found: ``alpha`` and ``fitness`` of the best candidate, ``evaluations``
    (fitness calls, cached ones included), ``seconds`` (wall time of the evaluations, summed over
    resumed sessions), ``generations`` (per generation: best and median fitness of the population
    after selection) and the log path."""

    alpha: list[float]
    fitness: float
    evaluations: int
    seconds: float
    generations: list[dict] = field(default_factory=list)
    log: Path | None = None


def search(refs: Sequence[CheckpointRef], model: torch.nn.Module, fitness: Callable[[torch.nn.Module], float],
           config: SearchConfig | None = None, log_dir: str | os.PathLike | None = None, resume: bool = False,
           progress: bool = True, reader: Callable[[CheckpointRef], dict] = read_state,
           fitness_info: dict | None = None, accelerator=None) -> SearchResult:
    """Search ``alpha`` minimising ``fitness(model)`` where ``model`` holds ``merge(refs, alpha)``.

    ``model`` is overwritten in place for every candidate (its ``state_dict()`` tensors); at the end it
    holds the best candidate. ``log_dir``: where ``search_log.json`` is written (every candidate: id,
    generation, alpha, fitness, seconds) after each evaluation, atomically; with ``resume`` an existing
    log is continued -- its search settings (but ``budget``, which may grow), fitness description and
    checkpoints must match -- and the result equals that of an uninterrupted search. ``accelerator``: an
    ``accelerate.Accelerator`` with several processes evaluates each generation's candidates
    round-robin across them (every process holds its own model; the log is written by the main
    process). ``fitness_info``: a JSON description of the fitness recorded in (and checked against)
    the log.
    """
    from tqdm.auto import tqdm

    cfg = config or SearchConfig()
    k = len(refs)
    if k < 1:
        raise ValueError("search needs at least one checkpoint")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    main = rank == 0
    header = {"config": asdict(cfg), "checkpoints": [r.name for r in refs],
              "fitness": fitness_info or {"name": getattr(fitness, "name", type(fitness).__name__)}}
    header = json.loads(json.dumps(header))
    log_path = Path(log_dir) / SEARCH_LOG if log_dir is not None else None
    rows: list[dict] = []
    if log_path is not None and log_path.exists():
        if not resume:
            raise ValueError(f"{log_path} exists: pass resume=True (--resume) to continue that search, or choose "
                             "a new output folder")
        old = json.loads(log_path.read_text())
        same = {**header, "config": {**header["config"], "budget": None}}  # a larger budget extends a search
        bad = [key for key in header if (old.get(key) if key != "config" else {**old["config"], "budget": None})
               != same[key]]
        if bad:
            raise ValueError(f"cannot resume {log_path}: the {' and '.join(bad)} differ from this search")
        rows = old["candidates"]
    cache = {(r["generation"], r["index"]): r for r in rows}
    if log_path is not None and main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()

    def write():
        if log_path is not None and main:
            atomic_write_json(log_path, {**header, "candidates": rows, "generations": history}, indent=1)

    bar = tqdm(total=cfg.budget, initial=min(len(cache), cfg.budget), desc="lcsc", disable=not (progress and main))
    history: list[dict] = []

    def evaluate(gen: int, cands: list[np.ndarray]) -> list[float]:
        todo = []
        for i, a in enumerate(cands):
            hit = cache.get((gen, i))
            if hit is not None:
                if not np.allclose(hit["alpha"], a, rtol=0, atol=1e-12):
                    raise ValueError(f"cannot resume: candidate {gen}/{i} of the log differs from this search's")
            else:
                todo.append(i)
        def record(i, f, sec):
            row = {"id": len(rows), "generation": gen, "index": i, "alpha": cands[i].tolist(),
                   "fitness": f if math.isfinite(f) else None, "seconds": round(sec, 4)}
            rows.append(row)
            cache[(gen, i)] = row
            bar.update(1)

        results = {}
        for i in todo[rank::world]:
            t0 = time.time()
            merge(refs, cands[i], out=state, reader=reader)
            try:
                with torch.no_grad():
                    f = float(fitness(model))
            except FloatingPointError:
                f = math.inf
            results[i] = (f if math.isfinite(f) else math.inf, time.time() - t0)
            if world == 1:  # logged at once: an interrupt loses at most the running evaluation
                record(i, *results[i])
                write()
        if world > 1:
            from accelerate.utils import gather_object

            for part in gather_object([results]):
                for i, (f, sec) in sorted(part.items()):
                    results[i] = (f, sec)
            for i in todo:
                record(i, *results[i])
            write()
        out = []
        for i in range(len(cands)):
            f = cache[(gen, i)]["fitness"]
            out.append(math.inf if f is None else f)
        return out

    pop = initial_population(k, cfg)
    fit = evaluate(0, pop)
    used = len(pop)
    gen = 0

    def select(cands, fits):
        order = sorted(range(len(cands)), key=lambda i: (fits[i], i))[:cfg.population]
        return [cands[i] for i in order], [fits[i] for i in order]

    pop, fit = select(pop, fit)
    history.append({"generation": 0, "evaluations": used, "best": fit[0], "median": float(np.median(fit))})
    write()
    while used < cfg.budget:
        gen += 1
        kids = children(pop, min(cfg.offspring, cfg.budget - used), cfg, gen)
        kfit = evaluate(gen, kids)
        used += len(kids)
        pop, fit = select(pop + kids, fit + kfit)
        history.append({"generation": gen, "evaluations": used, "best": fit[0], "median": float(np.median(fit))})
        write()
    bar.close()
    merge(refs, pop[0], out=state, reader=reader)
    seconds = sum(r["seconds"] for r in rows)
    return SearchResult(pop[0].tolist(), fit[0], used, seconds, history, log_path)


def plot_search(logs, out: str | os.PathLike) -> Path | None:
    """Fitness over the search from ``search_log.json`` files (one path, or ``{label: path}`` for several
    searches on one figure): every candidate (dots, by evaluation), the population's best and median
    after each generation, and the first candidate (the last checkpoint) as a dotted line. None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    logs = logs if isinstance(logs, dict) else {"": logs}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lo, hi, name = math.inf, -math.inf, ""
    for label, log in logs.items():
        data = json.loads(Path(log).read_text())
        name = f"{data['fitness'].get('name', '')}, NFE {data['fitness'].get('nfe', '?')}"
        prefix = f"{label}: " if label else ""
        pts = [(r["id"] + 1, r["fitness"]) for r in data["candidates"] if r["fitness"] is not None]
        if pts:
            ax.scatter(*zip(*pts), s=4, alpha=0.25)
        hist = data.get("generations", [])
        ev = [h["evaluations"] for h in hist]
        line = ax.plot(ev, [h["best"] for h in hist], label=f"{prefix}population best")[0]
        ax.plot(ev, [h["median"] for h in hist], ls="--", color=line.get_color(), label=f"{prefix}population median")
        if data["candidates"] and data["candidates"][0]["fitness"] is not None:
            first = data["candidates"][0]["fitness"]
            ax.axhline(first, ls=":", lw=0.8, color=line.get_color(), label=f"{prefix}last checkpoint")
            hi = max(hi, first)
        if hist:
            lo = min(lo, min(h["best"] for h in hist))
            hi = max(hi, max(h["median"] for h in hist))
    if math.isfinite(lo) and math.isfinite(hi):
        pad = 0.1 * (hi - lo + 1e-9)
        ax.set_ylim(lo - pad, hi + 3 * pad)
    ax.set_xlabel("fitness evaluations")
    ax.set_ylabel(f"fitness ({name}; lower is better)")
    ax.set_title("LCSC search")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


