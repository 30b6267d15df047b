"""Selection: how many units each group loses, and which.

Within a group the lowest-scoring units go first. How many go is set by a
ratio (per group, or one global ranking of normalized scores) or, for a MACs or
parameter target, by the smallest global cut whose estimated cost meets it.
Every group keeps at least one unit and at least ``1 - max_ratio`` of its
original size, and its kept count is rounded to a multiple of ``round_to``
(or left whole when it is smaller than that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from torchslim.prune.selection import name_matches
from torchslim.prune.structured.graph import DependencyGraph


@dataclass(frozen=True)
class GroupLimit:
    """Per-group bounds: ``size`` units now (``original`` before the first step), remove at most
    ``max_remove``; ``ratio`` overrides the global one."""

    size: int
    max_remove: int
    ratio: float | None
    original: int


def group_limits(graph: DependencyGraph, original_sizes: dict, max_ratio: float,
                 overrides: dict[str, float]) -> list[GroupLimit]:
    """Bounds for every group of ``graph``.

    ``original_sizes`` maps ``group.slots`` to the group's size before the first
    step, so ``max_ratio`` bounds the total over all steps. An override applies
    to a group when any of its layer names matches it. Precedence (as in
    :func:`torchslim.prune.selection.name_matches` overrides elsewhere): an exact
    layer name wins over every ``re:`` pattern; among patterns the first matching
    one, in the dict's order, wins.
    """
    limits = []
    for group in graph.groups:
        n = len(group.units)
        n0 = original_sizes.get(group.slots, n)
        ratio = next((overrides[name] for name in group.names if name in overrides), None)
        if ratio is None:
            ratio = next((r for pattern, r in overrides.items()
                          if pattern.startswith("re:") and any(name_matches(name, pattern) for name in group.names)), None)
        cap = max_ratio if ratio is None else min(max_ratio, ratio)
        min_keep = max(1, math.ceil(round((1.0 - cap) * n0, 6)))
        limits.append(GroupLimit(n, max(0, n - min_keep), ratio, n0))
    return limits


def _keep_options(size: int, max_remove: int, round_to: int, whole: bool) -> list[int]:
    """Kept counts allowed: multiples of ``round_to`` within the limit, and ``size`` itself when ``whole``."""
    options = [k for k in range(round_to, size + 1, round_to) if size - k <= max_remove]
    if whole or not options:
        options.append(size)
    return options


def round_removal(size: int, remove: int, max_remove: int, round_to: int, whole: bool = True) -> int:
    """Units to remove once the kept count is a multiple of ``round_to`` (nearest, within the limits).

    ``whole`` allows keeping all ``size`` units even when that is no multiple (a layer
    never cut); otherwise a layer already cut to an odd width gets back onto a multiple.

    Example:
        >>> round_removal(64, 27, 60, 8)   # keep 37 -> 40
        24
    """
    remove = min(remove, max_remove)
    if round_to <= 1:
        return max(remove, 0)
    options = _keep_options(size, max_remove, round_to, whole)
    best = min(options, key=lambda k: (abs(k - (size - max(remove, 0))), -k))
    return size - best


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores (ties: the earlier index goes first), sorted."""
    if count <= 0:
        return []
    order = torch.argsort(scores, stable=True)
    return sorted(int(i) for i in order[:count])


def normalize(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Divide each group's scores by their mean, so groups of different scale compare globally."""
    out = []
    for s in scores:
        mean = float(s.mean()) if len(s) else 0.0
        out.append(s / mean if mean > 0 else torch.zeros_like(s))
    return out


def by_ratio(scores: list[torch.Tensor], limits: list[GroupLimit], ratio: float, scope: str,
             round_to: int) -> dict[int, list[int]]:
    """Remove ``ratio`` of the units: of each group (``scope="layer"``) or of all, ranked together (``"global"``).

    Groups with an override ratio are cut by their own ratio and left out of the global ranking.
    """
    counts: dict[int, int] = {}
    pool = []
    for g, lim in enumerate(limits):
        if lim.ratio is not None or scope == "layer":
            r = lim.ratio if lim.ratio is not None else ratio
            counts[g] = round(r * lim.size)
        else:
            pool.append(g)
    if pool:
        counts.update(_global_counts(scores, limits, pool, round(ratio * sum(limits[g].size for g in pool))))
    return _choose(scores, limits, counts, round_to)


def _global_counts(scores: list[torch.Tensor], limits: list[GroupLimit], pool: list[int], k: int) -> dict[int, int]:
    ranked = sorted((float(scores[g][u]), g, u) for g in pool for u in range(limits[g].size))
    counts = {g: 0 for g in pool}
    taken = 0
    for _, g, _ in ranked:
        if taken >= k:
            break
        if counts[g] < limits[g].max_remove:
            counts[g] += 1
            taken += 1
    return counts


def _choose(scores: list[torch.Tensor], limits: list[GroupLimit], counts: dict[int, int],
            round_to: int) -> dict[int, list[int]]:
    out = {}
    for g, c in counts.items():
        lim = limits[g]
        c = round_removal(lim.size, c, lim.max_remove, round_to, lim.size == lim.original)
        if c > 0:
            out[g] = lowest(scores[g], c)
    return out


def by_target(scores: list[torch.Tensor], limits: list[GroupLimit], round_to: int,
              cost: Callable[[dict[int, list[int]]], float], target: float,
              scope: str = "global") -> tuple[dict[int, list[int]], float]:
    """The smallest cut whose ``cost`` is at most ``target``, then as much given back as still fits.

    ``scope="global"`` cuts the lowest normalized scores of all groups first;
    ``"layer"`` cuts the same fraction of every group, the fraction found by
    bisection. A group's ``ratio`` override caps its cut either way. Rounding
    to ``round_to`` makes the cost fall in jumps, so the cut found usually
    undershoots the target; rounding quanta are then put back one by one, the
    most important first, while the cost stays within the target.

    Returns:
        ``(removed, cost)``; when even the largest allowed cut misses the target,
        that cut and its cost (above ``target``).
    """
    pool = list(range(len(limits)))
    sizes = sum(lim.size for lim in limits)
    total = sum(lim.max_remove for lim in limits) if scope == "global" else sizes

    def counts_for(k: int) -> dict[int, int]:
        if scope == "global":
            counts = _global_counts(scores, limits, pool, k)
        else:
            counts = {g: round(k / max(sizes, 1) * lim.size) for g, lim in enumerate(limits)}
        return {g: round_removal(limits[g].size, c, limits[g].max_remove, round_to, limits[g].size == limits[g].original)
                for g, c in counts.items()}

    def plan(counts: dict[int, int]) -> dict[int, list[int]]:
        return {g: lowest(scores[g], c) for g, c in counts.items() if c > 0}

    lo, hi = 0, total
    best = counts_for(hi)
    best_cost = cost(plan(best))
    if best_cost > target:
        return plan(best), best_cost
    while lo < hi:  # smallest k meeting the target (cost falls as k grows, up to rounding)
        mid = (lo + hi) // 2
        counts = counts_for(mid)
        c = cost(plan(counts))
        if c <= target:
            hi, best, best_cost = mid, counts, c
        else:
            lo = mid + 1
    best, best_cost = _give_back(scores, limits, round_to, cost, target, best, best_cost)
    return plan(best), best_cost


def _allowed_removals(lim: GroupLimit, round_to: int) -> list[int]:
    keeps = _keep_options(lim.size, lim.max_remove, max(round_to, 1), lim.size == lim.original)
    return sorted({lim.size - k for k in keeps})


def _give_back(scores, limits, round_to, cost, target, counts, current):
    """Restore the most important removable quanta while the cost stays within ``target``."""
    counts = dict(counts)
    allowed = {g: _allowed_removals(limits[g], round_to) for g in counts}
    while True:
        best = None
        for g, c in counts.items():
            smaller = [a for a in allowed[g] if a < c]
            if not smaller:
                continue
            trial = {**counts, g: smaller[-1]}
            trial_cost = cost({h: lowest(scores[h], n) for h, n in trial.items() if n > 0})
            if trial_cost <= target:
                # The most important quantum comes back first. (Importance per unit of cost
                # was tried too: it undershot the target more and lost accuracy on lenet5.)
                restored = torch.argsort(scores[g], stable=True)[smaller[-1]:c]
                value = float(scores[g][restored].mean())
                if best is None or value > best[0]:
                    best = (value, g, smaller[-1], trial_cost)
        if best is None:
            return counts, current
        _, g, n, current = best
        counts[g] = n
