"""The channel axis of a search: the coupled groups of a model and a plan's ChannelPruning.

A *plan* is ``{group label: kept channel count}``, the label being the layer that
writes the group's channels (as in :class:`~torchslim.prune.structured.PruningReport`).
It becomes one :class:`~torchslim.prune.structured.ChannelPruning` with ``ratio=0``
(every other group whole) and one exact-name override per cut group, so the plan
is a recipe's ``prune_channels`` stage unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from torchslim.prune.selection import name_matches
from torchslim.prune.structured import ChannelPruning, build_dependency_graph

#: Plans keep at least one channel; ChannelPruning's default max_ratio (0.9) would forbid keep < 10%.
_MAX_RATIO = 0.999


@dataclass(frozen=True)
class GroupChoice:
    """One coupled channel group the search may cut.

    Attributes:
        label: the layer writing the group's channels (its name in plans and reports).
        key: a layer name found in this group only, used as the ChannelPruning override
            (an exact name matches every group the layer touches, so the writer of a
            group that another group also reads cannot be used).
        names: every layer of the group.
        size: channels of the group now.
        keeps: allowed kept counts, largest (``size``, untouched) first.
    """

    label: str
    key: str
    names: tuple[str, ...]
    size: int
    keeps: tuple[int, ...]


def _kept_counts(size: int, fractions: list[float], round_to: int) -> tuple[int, ...]:
    """Kept counts for the fractions: rounded to multiples of ``round_to``, at least one multiple, deduplicated."""
    if round_to > 1 and size < round_to:
        return (size,)
    out = {size}
    for f in fractions:
        k = max(1, round(f * size))
        if round_to > 1:
            k = max(round_to, round_to * round(k / round_to))
        out.add(min(k, size))
    return tuple(sorted(out, reverse=True))


def channel_groups(model: nn.Module, example: Any, space: Any) -> list[GroupChoice]:
    """The groups of ``model`` the search may cut, with their allowed kept counts.

    Groups whose writer (or a layer only they contain, such as their BatchNorm) matches
    ``space.exclude``, groups with no layer of their own (so no
    override can address them alone) and groups with a single choice are left out.
    """
    graph = build_dependency_graph(model, example)
    owners: dict[str, int] = {}
    for group in graph.groups:
        for name in group.names:
            owners[name] = owners.get(name, 0) + 1
    out = []
    for group in graph.groups:
        label = next(iter(group.units[0]))[0]
        own = [n for n in group.names if owners[n] == 1]
        if not own:
            continue
        key = label if label in own else own[0]
        # Only the writer and the group's own layers exclude it: a reader (the next conv) belongs to
        # the next group too, and naming it must not freeze this one.
        if any(name_matches(n, p) for n in {label, *own} for p in space.exclude):
            continue
        keeps = _kept_counts(len(group), list(space.keep), space.round_to)
        if len(keeps) > 1:
            out.append(GroupChoice(label, key, tuple(group.names), len(group), keeps))
    return out


def plan_config(groups: list[GroupChoice], plan: dict[str, int], space: Any) -> ChannelPruning:
    """The :class:`ChannelPruning` that cuts each group of ``plan`` to its kept count, the rest whole."""
    by_label = {g.label: g for g in groups}
    overrides = {}
    for label, keep in plan.items():
        g = by_label[label]
        if keep < g.size:
            # round(ratio * size) in selection.by_ratio gives back exactly size - keep.
            overrides[g.key] = (g.size - keep) / g.size
    return ChannelPruning(ratio=0.0, importance=space.importance, overrides=overrides, max_ratio=_MAX_RATIO)


def dense_plan(groups: list[GroupChoice]) -> dict[str, int]:
    """Every group whole."""
    return {g.label: g.size for g in groups}


def plan_key(plan: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """A hashable form of a plan, for deduplication."""
    return tuple(sorted(plan.items()))


def uniform_plan(groups: list[GroupChoice], fraction: float, round_to: int = 1) -> dict[str, int]:
    """The same kept fraction in every group (rounded like the space's choices): the baseline a search must beat."""
    return {g.label: _kept_counts(g.size, [fraction], round_to)[-1] if fraction < 1 else g.size for g in groups}


def global_plan(model: nn.Module, example: Any, groups: list[GroupChoice], fraction: float,
                space: Any) -> dict[str, int]:
    """The widths a global importance ranking gives (Torch-Pruning's and NNI's global pruning), in the space.

    ``1 - fraction`` of the prunable channels removed, the least important first on
    mean-normalised ``space.importance`` scores ranked across groups
    (:class:`~torchslim.prune.structured.ChannelPruning` with ``scope="global"``); each
    searchable group's kept count is then snapped to its nearest allowed width. The search
    measures these plans beside its own, so its front is never behind what a user of those
    tools would pick by the same proxy.
    """
    from torchslim.prune.structured import prune_channels

    cfg = ChannelPruning(ratio=1.0 - fraction, scope="global", importance=space.importance,
                         exclude=list(space.exclude), max_ratio=_MAX_RATIO)
    removed = prune_channels(model, example, cfg).report.steps[0]["removed"]
    return {g.label: min(g.keeps, key=lambda k: (abs(k - (g.size - removed.get(g.label, 0))), -k)) for g in groups}
