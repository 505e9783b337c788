"""The mutation space of the USF schedule search (Liu et al., ICLR 2024, Sec. 4) and its S^3
predictor: :class:`SearchSpace` (the proposal probabilities of the public USF code's
``evo_search.yml`` plus fewstep's additions), ``_Space`` (mutation, crossover, repair into a valid
schedule, snapping onto the EMS grid, predictor features) and :class:`Predictor`. The search loop
that uses them is :mod:`fewstep.samplers.search`; the reasons for every probability are in
docs/usf.md ("The search").
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .search_problem import SearchProblem
from .usf_schedule import MAX_ORDER, RELAXATIONS, USFCorrector, USFSchedule, USFStep, ems_record

if TYPE_CHECKING:
    from .search import SearchSettings


@dataclass
class SearchSpace:
    """Mutation probabilities of the public USF search code (``evo_search.yml``) and fewstep's
    additions (named relaxations, ``d2_scale``, the end point); see the module docstring."""

    rank_bar: int = 15
    p_crossover: float = 0.3
    p_deep_crossover: float = 0.5
    p_time: float = 0.3
    time_sigma: float = 0.3  # in units of half the lambda gap between the neighbours
    p_end: float = 0.05
    p_order: float = 0.3
    orders: dict = field(default_factory=lambda: {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1})
    p_prediction: float = 0.3
    predictions: dict = field(default_factory=lambda: {"noise": 0.3, "data": 0.3, "v3": 0.4})
    p_relaxation: float = 0.3
    relaxations: dict = field(default_factory=lambda: {"none": 0.2, "dpmsolver-2": 0.2, "unipc-bh1": 0.1,
                                                       "linear": 0.4, "exp": 0.1})
    relaxation_sigma: float = 0.03
    p_first_derivative: float = 0.3
    p_d2_scale: float = 0.1
    p_corrector: float = 0.3
    p_afs: float = 0.3
    afs: dict = field(default_factory=lambda: {"none": 0.3, "zero_x0": 0.3, "mean_x0": 0.4})


# ------------------------------------------------------------------------------------------------
# proposals
# ------------------------------------------------------------------------------------------------
def _draw(rng: np.random.Generator, probs: dict):
    keys = list(probs)
    p = np.asarray([probs[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


class _Space:
    """Mutation, crossover, repair and normalisation of candidates for one problem and NFE."""

    MIN_GAP = 1e-3  # smallest lambda distance between neighbouring points

    def __init__(self, problem: SearchProblem, settings: "SearchSettings"):
        from ..schedule import NoiseSchedule

        self.problem, self.settings, self.cfg = problem, settings, settings.space
        self.ns = NoiseSchedule.from_config(dict(problem.scheduler_config))
        self.ems = problem.ems if settings.v3 else None
        preds = dict(self.cfg.predictions)
        if self.ems is None:
            preds.pop("v3", None)
        self.predictions = preds
        afs = dict(self.cfg.afs)
        if problem.mean_x0 is None:
            afs.pop("mean_x0", None)
        self.afs = afs
        self.t_min = float(self.ns.t_min)
        self.mean_list = None if problem.mean_x0 is None else np.asarray(problem.mean_x0, dtype=np.float64).tolist()

    # ---- helpers -----------------------------------------------------------------------------
    def lam(self, t) -> float:
        return float(self.ns.lambda_(float(t)))

    def t_of(self, lam: float) -> float:
        return float(min(max(float(self.ns.t_of_lambda(lam)), self.t_min), float(self.ns.t_max)))

    # ---- mutation ----------------------------------------------------------------------------
    def mutate(self, s: USFSchedule, rng: np.random.Generator) -> USFSchedule:
        cfg = self.cfg
        s = copy.deepcopy(s)
        times, steps = list(s.timesteps), list(s.steps)
        if rng.random() < cfg.p_afs and len(self.afs) > 1:
            kind = _draw(rng, self.afs)
            if (kind == "none") != (s.afs == "none"):
                if kind == "none":  # one point less: drop an interior point and its step
                    if len(times) > 2:
                        k = int(rng.integers(1, len(times)))
                        del times[k]
                        del steps[k - 1]
                else:  # one point more: split a gap after point 0
                    end_lam = self.lam(self.t_min) if s.ends_at_zero else self.lam(s.t_end)
                    lams = [self.lam(t) for t in times] + [end_lam]
                    k = int(rng.integers(0, len(times)))
                    new = lams[k] + rng.uniform(0.2, 0.8) * (lams[k + 1] - lams[k])
                    times.insert(k + 1, self.t_of(new))
                    steps.insert(k + 1, USFStep(_draw(rng, self.predictions), 1))
            s.afs = kind
        s.afs_mean = self.mean_list if s.afs == "mean_x0" else None
        # the end point
        if rng.random() < cfg.p_end:
            s.t_end = self.t_min if s.ends_at_zero else "zero"
        k = len(times)
        end_lam = self.lam(self.t_min) + 1.0 if s.ends_at_zero else self.lam(s.t_end)
        for j in range(k):
            st = steps[j]
            if j + 1 < k and rng.random() < cfg.p_time:  # move point j + 1 between its neighbours
                lo = self.lam(times[j])
                hi = self.lam(times[j + 2]) if j + 2 < k else end_lam
                mid = self.lam(times[j + 1])
                new = mid + rng.normal(0.0, cfg.time_sigma) * 0.5 * (hi - lo)
                margin = 0.05 * (hi - lo)
                times[j + 1] = self.t_of(min(max(new, lo + margin), hi - margin))
            if rng.random() < cfg.p_order:
                order = int(_draw(rng, cfg.orders))
                if order != st.order:
                    st = dataclasses.replace(st, order=order, start=0, points=tuple(range(1, order)),
                                             first_derivative_points=None)
            if rng.random() < cfg.p_prediction:
                st = dataclasses.replace(st, prediction=_draw(rng, self.predictions))
            if st.order >= 2 and rng.random() < cfg.p_relaxation:
                kind = _draw(rng, cfg.relaxations)
                coef = 0.0
                if kind in ("linear", "exp"):
                    base = st.relaxation_coefficient if st.relaxation == kind else (0.5 * rng.choice([-1, 1])
                                                                                   if kind == "exp" else 0.0)
                    coef = float(base + rng.normal(0.0, cfg.relaxation_sigma))
                st = dataclasses.replace(st, relaxation=kind, relaxation_coefficient=coef)
            if st.order >= 3 and rng.random() < cfg.p_first_derivative:
                q = int(rng.integers(1, 3))
                st = dataclasses.replace(st, first_derivative_points=None if q >= len(st.points) else q)
            if st.order >= 3 and rng.random() < cfg.p_d2_scale:
                st = dataclasses.replace(st, d2_scale=0.5 if st.d2_scale == 1.0 else 1.0)
            if rng.random() < cfg.p_corrector:
                if rng.random() < 0.5:
                    st = dataclasses.replace(st, corrector=None)
                else:
                    relax = _draw(rng, {"none": 0.5, "unipc-bh2": 0.25, "unipc-bh1": 0.25})
                    st = dataclasses.replace(st, corrector=USFCorrector(order=st.order + 1, relaxation=relax))
            steps[j] = st
        s.timesteps, s.steps = tuple(times), tuple(steps)
        return s

    def crossover(self, a: USFSchedule, b: USFSchedule, rng: np.random.Generator) -> USFSchedule:
        """USF's crossover: each decision group (times with the end point, AFS, the steps) from one
        parent; with ``p_deep_crossover`` the steps are mixed step by step."""
        if a.num_steps != b.num_steps:
            return copy.deepcopy(a if rng.random() < 0.5 else b)
        child = copy.deepcopy(a)
        src = b if rng.random() < 0.5 else a
        child.timesteps, child.t_end = src.timesteps, src.t_end
        src = b if rng.random() < 0.5 else a
        child.afs, child.afs_mean = src.afs, src.afs_mean
        if rng.random() < self.cfg.p_deep_crossover:
            child.steps = tuple(copy.deepcopy(x if rng.random() < 0.5 else y) for x, y in zip(a.steps, b.steps))
        else:
            child.steps = copy.deepcopy((b if rng.random() < 0.5 else a).steps)
        return child

    # ---- validity ----------------------------------------------------------------------------
    def repair(self, s: USFSchedule) -> USFSchedule:
        """Clip every decision into what the history and the end point allow."""
        k = s.num_steps
        steps = []
        for j, st in enumerate(s.steps):
            if st.prediction not in self.predictions:
                st = dataclasses.replace(st, prediction="data")
            start = st.start if st.start <= j else 0
            points = tuple(o for o in st.points if o != start and j - o >= 0)
            order = min(st.order, 1 + len(points), MAX_ORDER)
            last = j == k - 1
            if last and s.ends_at_zero:
                order = 1
            if start == 0 and len(points) < order - 1:
                points = tuple(range(1, order))
            if start == 0:  # points nothing reads are dropped: one key per behaviour
                corr_needs = st.corrector.order - 2 if st.corrector is not None else 0
                points = points[: max(order - 1, corr_needs)]
            if order < 2:
                st = dataclasses.replace(st, relaxation="none", relaxation_coefficient=0.0, pseudo=False)
            q = st.first_derivative_points
            if q is not None and (order < 2 or q >= len(points)):
                q = None
            d2 = st.d2_scale if order >= 3 else 1.0
            corr = st.corrector
            if corr is not None:
                c_order = min(corr.order, len(points) + 2)
                corr = None if last or c_order < 2 else dataclasses.replace(corr, order=c_order)
            steps.append(dataclasses.replace(st, order=order, start=start, points=points,
                                             first_derivative_points=q, d2_scale=d2, corrector=corr))
        s = copy.deepcopy(s)
        s.steps = tuple(steps)
        if s.afs not in self.afs:
            s.afs = "zero_x0"
        s.afs_mean = self.mean_list if s.afs == "mean_x0" else None
        return s

    def normalize(self, s: USFSchedule) -> USFSchedule | None:
        """Repair, snap v3 schedules onto the EMS grid (the stored times are the ones run), set the
        EMS record; None when the schedule is invalid (merged points, wrong NFE)."""
        s = self.repair(s)
        if s.nfe != self.settings.nfe:
            return None
        times = list(s.timesteps)
        lams = [self.lam(t) for t in times] + ([] if s.ends_at_zero else [self.lam(s.t_end)])
        if any(b - a < self.MIN_GAP for a, b in zip(lams, lams[1:])) or not all(map(math.isfinite, lams)):
            return None
        s.ems = None
        if s.uses_v3:
            try:
                idx = self.ems.index_of(np.asarray(lams))
            except ValueError:
                return None
            if len(np.unique(idx)) != len(idx):
                return None
            snapped = [float(t) for t in self.ems.timesteps[idx]]
            s.timesteps = tuple(snapped[: len(times)])
            if not s.ends_at_zero:
                s.t_end = snapped[-1]
            s.ems = ems_record(self.ems, self.problem.ems_name)
        try:
            s.validate()
            s.check_schedule(self.ns)
        except ValueError:
            return None
        return s

    # ---- predictor features ------------------------------------------------------------------
    def features(self, s: USFSchedule) -> np.ndarray:
        """Fixed-length features: the AFS kind, the end point, then per step (padded to NFE + 1)
        the position of its point in lambda and its decisions."""
        lam0, lam1 = self.lam(self.ns.t_max), self.lam(self.t_min)
        glob = [float(s.afs == a) for a in ("none", "zero_x0", "mean_x0")] + [float(s.ends_at_zero)]
        rows = []
        for j in range(self.settings.nfe + 1):
            if j < s.num_steps:
                u = (self.lam(s.timesteps[j]) - lam0) / (lam1 - lam0)
                rows.append(_step_features(s.steps[j], u))
            else:
                rows.append([0.0] * STEP_FEATURES)
        return np.asarray(glob + [v for r in rows for v in r], dtype=np.float64)


def _step_features(st: USFStep, u: float) -> list[float]:
    """A step's predictor features: present, its point's position ``u`` in lambda, its decisions."""
    c = st.corrector
    return [1.0, u, float(st.order), float(st.start), float(len(st.points)), float(st.first_derivative_points or 0),
            st.d2_scale, *[float(st.prediction == p) for p in ("data", "noise", "v3")],
            *[float(st.relaxation == r) for r in RELAXATIONS], st.relaxation_coefficient,
            float(c is not None), float(c.order if c else 0), float(c is not None and c.relaxation != "none")]


STEP_FEATURES = len(_step_features(USFStep(), 0.0))


class Predictor:
    """The S^3 idea (Liu et al. 2024, Sec. 4.2), small: extremely randomised trees (scikit-learn,
    100 trees, fixed seed) on :meth:`_Space.features`, fitted to ``log(score)``; ranks proposals
    before they are evaluated."""

    def __init__(self, seed: int):
        self.seed = seed
        self.model = None

    def fit(self, features: np.ndarray, scores: np.ndarray) -> "Predictor":
        from sklearn.ensemble import ExtraTreesRegressor

        self.model = ExtraTreesRegressor(n_estimators=100, min_samples_leaf=2, random_state=self.seed, n_jobs=1)
        self.model.fit(features, np.log(scores))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.exp(self.model.predict(features))
