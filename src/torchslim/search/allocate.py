"""Allocation: from the per-group tables to a whole front of plans in one pass (a Lagrangian sweep).

For a trade-off λ (accuracy points per unit of log-latency), every group independently
picks the kept count minimising ``drop + λ · log(1 + latency change)`` (the tables' latency
changes compose by multiplication, so their logarithms add); sweeping λ from 0 (keep everything that costs accuracy)
to large (cut everything as far as allowed) traces the lower convex hull of the
additive predictions, one plan per distinct choice. The plans are predictions only:
each is then built and measured end to end before it may be put on a front.
"""

from __future__ import annotations

import math

import numpy as np

from torchslim.search.sensitivity import Tables
from torchslim.search.space import GroupChoice, plan_key


def _log_costs(tables: Tables) -> dict[str, dict[int, float]]:
    """log(latency ratio) per group and kept count: additive where the ratios multiply."""
    return {g: {k: math.log(max(1.0 + v, 1e-3)) for k, v in d.items()} for g, d in tables.latency.items()}


def _lambda_grid(tables: Tables, n: int) -> list[float]:
    """0, then ``n`` values spread geometrically over the slopes where some group's choice changes."""
    slopes = []
    costs = _log_costs(tables)
    for g, drops in tables.drop.items():
        lats = costs[g]
        for k1 in drops:
            for k2 in drops:
                dc = lats[k1] - lats[k2]
                dd = drops[k2] - drops[k1]
                if dc > 1e-12 and dd > 1e-12:  # k2 is faster (dc > 0 means k1 slower) and costs accuracy
                    slopes.append(dd / dc)
    if not slopes:
        return [0.0, math.inf]
    lo, hi = min(slopes) / 2, max(slopes) * 2
    return [0.0, *np.geomspace(lo, hi, n).tolist(), math.inf]


def lagrangian_plans(groups: list[GroupChoice], tables: Tables, n_lambdas: int = 48) -> list[dict[str, int]]:
    """The distinct plans of a Lagrangian sweep, from the most accurate to the fastest (predicted).

    Args:
        groups: the searchable groups.
        tables: per-group drop and latency change (:func:`~torchslim.search.sensitivity.build_tables`).
        n_lambdas: points of the sweep besides 0 and infinity.

    Example:
        >>> from torchslim.search.space import GroupChoice
        >>> from torchslim.search.sensitivity import Tables
        >>> gs = [GroupChoice("a", "a", ("a",), 4, (4, 2)), GroupChoice("b", "b", ("b",), 4, (4, 2))]
        >>> t = Tables(0.9, {"a": {4: 0.0, 2: 1.0}, "b": {4: 0.0, 2: 5.0}}, {"a": {4: 0.0, 2: -0.3}, "b": {4: 0.0, 2: -0.3}})
        >>> lagrangian_plans(gs, t)
        [{'a': 4, 'b': 4}, {'a': 2, 'b': 4}, {'a': 2, 'b': 2}]
    """
    seen: dict[tuple, dict[str, int]] = {}
    costs = _log_costs(tables)
    for lam in _lambda_grid(tables, n_lambdas):
        plan = {}
        for g in groups:
            drops, lats = tables.drop[g.label], costs[g.label]
            if math.isinf(lam):
                # The far end of the space: every group cut as far as allowed. Not the table's
                # fastest choice, which timing noise can make the uncut width on a small group.
                plan[g.label] = min(g.keeps)
            else:
                plan[g.label] = min(g.keeps, key=lambda k: (drops[k] + lam * lats[k], lats[k], -k))
        seen.setdefault(plan_key(plan), plan)
    return sorted(seen.values(), key=lambda p: (tables.predict(p)[1], tables.predict(p)[0]), reverse=True)


def pick_spread(plans: list[dict[str, int]], tables: Tables, count: int) -> list[dict[str, int]]:
    """At most ``count`` plans spread evenly over the predicted latency range (ends included)."""
    if len(plans) <= count:
        return list(plans)
    ordered = sorted(plans, key=lambda p: tables.predict(p)[1])
    idx = sorted({int(round(i)) for i in np.linspace(0, len(ordered) - 1, count)})
    return [ordered[i] for i in idx]
