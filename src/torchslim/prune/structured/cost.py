"""Cost: the MACs and parameters a dependency graph models, and what is left after a cut.

While the graph is built, every layer a channel rule understands adds *cost
terms* ``(value, slots)``: ``value`` MACs (or parameters) that shrink with the
product of the kept fractions of ``slots``. A conv's weight shrinks with its
input and its output channels, its bias with its outputs only; a depthwise
conv with its groups. Selection asks :func:`remaining_cost` for a planned cut,
so a MACs target is met without re-tracing the model for every candidate.

The MAC formulas below count multiply-accumulates of one forward pass the way
:func:`torchslim.measure.count_macs` does for the same layers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import torch.nn as nn

if TYPE_CHECKING:
    from torchslim.prune.structured.coupling import DependencyGraph, SlotKey

CostTerm = tuple[float, tuple["SlotKey", ...]]


def conv_macs(m: nn.modules.conv._ConvNd, out_shape: tuple[int, ...] | None) -> float:
    """MACs of conv ``m`` producing ``out_shape`` (0 when the shape is unknown)."""
    if not out_shape:
        return 0.0
    return float(math.prod(out_shape) * (m.in_channels // m.groups) * math.prod(m.kernel_size))


def linear_macs(m: nn.Linear, in_shape: tuple[int, ...]) -> float:
    """MACs of linear ``m`` on an input of ``in_shape`` (every leading dimension is a token)."""
    return float(math.prod(in_shape[:-1]) * m.in_features * m.out_features)


def attention_macs(m: nn.Module, q: tuple[int, ...], k: tuple[int, ...]) -> float:
    """MACs of multi-head attention ``m`` on query / key shapes ``q`` and ``k`` (3-d).

    The q, k, v projections, the scores, the weighted sum and the output projection;
    all of them scale with the number of heads kept.
    """
    inner = m.num_heads * m.head_dim
    seq = 1 if m.batch_first else 0
    batch = q[1 - seq]
    lq, lk = q[seq], k[seq]
    e = m.embed_dim
    return float(batch * (lq * e * inner + 2 * lk * e * inner + 2 * lq * lk * inner + lq * inner * e))


def kept_fractions(graph: "DependencyGraph", removed: dict[int, Iterable[int]]) -> dict["SlotKey", float]:
    """Fraction of every slot's indices left after removing units (slots not cut are absent)."""
    gone: dict = {}
    for g, units in removed.items():
        group = graph.groups[g]
        for u in units:
            for slot, idx in group.units[u].items():
                gone[slot] = gone.get(slot, 0) + len(idx)
    return {s: 1.0 - n / graph.slot_sizes[s] for s, n in gone.items()}


def remaining_cost(graph: "DependencyGraph", removed: dict[int, Iterable[int]], kind: str = "macs") -> float:
    """MACs (``kind="macs"``) or parameters of the graph's layers left after removing units.

    Args:
        graph: the dependency graph the cut is planned on.
        removed: group index -> indices of its units to remove.
        kind: ``"macs"`` or ``"params"``.
    """
    kept = kept_fractions(graph, removed)
    terms = graph.mac_terms if kind == "macs" else graph.param_terms
    base = graph.macs if kind == "macs" else graph.params
    saved = 0.0
    for value, slots in terms:
        frac = 1.0
        for s in slots:
            frac *= kept.get(s, 1.0)
        saved += value * (1.0 - frac)
    return base - saved
