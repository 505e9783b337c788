"""Signatures of fewstep <= 0.1 kept for old callers (served with a DeprecationWarning by the
modules that had them, through :func:`fewstep._imports.moved_names`).

The DPM-Solver++ updates took positional floats; use :mod:`fewstep.samplers.dpmpp_update`, whose
functions take :class:`Point` records (``alpha_s`` was never an argument, no update reads it, and it
is NaN in the records built here).
"""

from __future__ import annotations

import math

from .dpmpp_update import Point, first_order, second_order, third_order_multistep, third_order_singlestep


def first_order_update(x, m0, lam_s, lam_t, a_t, s_t, s_s, noise=None):
    """Deprecated: :func:`fewstep.samplers.dpmpp_update.first_order`."""
    return first_order(x, Point(lam_s, math.nan, s_s), Point(lam_t, a_t, s_t), m0, noise)


def second_order_update(x, m0, lam_s, m1, lam_1, lam_t, a_t, s_t, s_s, solver_type="midpoint", noise=None):
    """Deprecated: :func:`fewstep.samplers.dpmpp_update.second_order`."""
    return second_order(x, Point(lam_s, math.nan, s_s), Point(lam_t, a_t, s_t), [(lam_s, m0), (lam_1, m1)],
                        solver_type, noise)


def third_order_multistep_update(x, ms, lams, lam_t, a_t, s_t, s_s, noise=None, d2_weight=1.0):
    """Deprecated: :func:`fewstep.samplers.dpmpp_update.third_order_multistep`."""
    return third_order_multistep(x, Point(lams[0], math.nan, s_s), Point(lam_t, a_t, s_t), list(zip(lams, ms)),
                                 noise, d2_weight)


def third_order_singlestep_update(x, m0, lam_s, m1, lam_1, m2, lam_2, lam_t, a_t, s_t, s_s, solver_type="midpoint"):
    """Deprecated: :func:`fewstep.samplers.dpmpp_update.third_order_singlestep`."""
    return third_order_singlestep(x, Point(lam_s, math.nan, s_s), Point(lam_t, a_t, s_t),
                                  [(lam_s, m0), (lam_1, m1), (lam_2, m2)], solver_type)


def dlogalpha_dlambda(schedule, alpha, sigma):
    """Deprecated: ``schedule.dlogalpha_dlambda(alpha, sigma)`` (a method of every schedule kind)."""
    return schedule.dlogalpha_dlambda(alpha, sigma)
