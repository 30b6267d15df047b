"""Importance: one score per removable unit of every channel group.

A unit owns slices of several tensors (see :mod:`torchslim.prune.structured.graph`):
rows of the layers that write it (*producer* weights), columns of the layers
that read it (*consumer* weights), BatchNorm scales, heads' projections. A
unit's score aggregates all of them, so coupled layers decide together:

* ``"l1"`` / ``"l2"``: the L1 / L2 norm of all the unit's producer and consumer
  weights (Li et al.'s filter norm, extended to the whole coupled group).
* ``"bn"``: the sum of the unit's BatchNorm ``|gamma|`` (network slimming,
  Liu et al. 2017); groups without a BatchNorm fall back to ``"l1"``.
* ``"taylor"``: first-order Taylor estimate of the loss change when the unit
  is removed (Molchanov et al. 2019): removing it zeroes its consumer columns,
  so per batch ``s = sum(w * dL/dw)`` over those columns, which equals the
  unit's activation x gradient summed over its readers; the score is ``s**2``
  averaged over ``batches`` batches of ``data``.
* ``"random"``: uniform, seeded (a baseline).

Higher scores are more important. :func:`unit_scores` returns one tensor per
group, in ``graph.groups`` order.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchslim.errors import ConfigError, ModelError
from torchslim.prune.structured.graph import DependencyGraph, SlotKey

Method = Literal["l1", "l2", "bn", "taylor", "random"]
# (kind, tensor, view): ``view(tensor)`` is 2-D with one row per slot index.
View = tuple[str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _cols(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(0, 1).reshape(w.shape[1], -1)


def slot_views(model: nn.Module, slot: SlotKey) -> list[View]:
    """The tensors behind one slot and how to read one row per index.

    Kinds: ``"producer"`` (writes the channel), ``"consumer"`` (reads it),
    ``"bn"`` (a BatchNorm scale) and ``"scale"`` (other per-channel parameters).
    """
    target, role = slot
    if role.startswith("dim"):
        dim = int(role[3:])
        obj: Any = model
        for part in target.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, nn.Parameter):
            return []
        return [("scale", obj, lambda w, d=dim: w.movedim(d, 0).reshape(w.shape[d], -1))]
    m = model.get_submodule(target)
    if role == "out" and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return [("producer", m.weight, _rows)]
    if role == "in":
        return [("consumer", m.weight, _cols)]
    if role == "groups":
        return [("producer", m.weight, lambda w, g=m.groups: w.reshape(g, -1))]
    if role == "heads":
        h, hd, e = m.num_heads, m.head_dim, m.embed_dim
        return [
            ("producer", m.in_proj_weight, lambda w: w.reshape(3, h, hd, e).transpose(0, 1).reshape(h, -1)),
            ("consumer", m.out_proj.weight, lambda w: w.reshape(e, h, hd).transpose(0, 1).reshape(h, -1)),
        ]
    if role == "out" and getattr(m, "weight", None) is not None:
        kind = "bn" if isinstance(m, nn.modules.batchnorm._BatchNorm) else "scale"
        return [(kind, m.weight, lambda w: w.reshape(w.shape[0], -1))]
    return []


def _aggregate(graph: DependencyGraph, per_slot: dict[SlotKey, torch.Tensor]) -> list[torch.Tensor]:
    """Sum per-index values over every slot index each unit owns."""
    out = []
    for group in graph.groups:
        scores = torch.zeros(len(group.units), dtype=torch.float64)
        for slot in group.slots:
            values = per_slot.get(slot)
            if values is None:
                continue
            for u, unit in enumerate(group.units):
                idx = unit.get(slot)
                if idx:
                    scores[u] += float(values[idx].sum())
        out.append(scores)
    return out


def _norm_scores(model: nn.Module, graph: DependencyGraph, p: int, kinds: tuple[str, ...]) -> list[torch.Tensor]:
    per_slot: dict[SlotKey, torch.Tensor] = {}
    with torch.no_grad():
        for slot in graph.slot_sizes:
            total = None
            for kind, tensor, view in slot_views(model, slot):
                if kind in kinds:
                    v = view(tensor.detach()).abs().double().pow(p).sum(1).cpu()
                    total = v if total is None else total + v
            if total is not None:
                per_slot[slot] = total
    scores = _aggregate(graph, per_slot)
    return [s.pow(1.0 / p) for s in scores]


def _taylor_scores(model: nn.Module, graph: DependencyGraph, data: Any, batches: int, batch_size: int,
                   seed: int) -> list[torch.Tensor]:
    if data is None or not hasattr(data, "x") or not hasattr(data, "y"):
        raise ConfigError("importance 'taylor' needs data: pass data= (an object with tensors x and y) to prune_channels")
    n = len(data.y)
    if n == 0:
        raise ConfigError("importance 'taylor' needs a non-empty data set")
    consumers: list[tuple[SlotKey, torch.Tensor, Callable]] = []
    for slot in graph.slot_sizes:
        consumers += [(slot, t, view) for kind, t, view in slot_views(model, slot) if kind == "consumer"]
    params = list({id(t): t for _, t, _ in consumers}.values())
    if not params:
        return [torch.zeros(len(g.units), dtype=torch.float64) for g in graph.groups]
    device = params[0].device
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    totals = [torch.zeros(len(g.units), dtype=torch.float64) for g in graph.groups]
    modes = [(m, m.training) for m in model.modules()]
    grad_flags = [(t, t.requires_grad) for t in params]
    model.eval()  # fixed BatchNorm statistics and no dropout: the score of the deployed model
    try:
        for t in params:
            t.requires_grad_(True)
        used = 0
        for b in range(batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            if len(idx) == 0:
                break
            x, y = data.x[idx].to(device), data.y[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            grads = dict(zip(map(id, params), torch.autograd.grad(loss, params, allow_unused=True)))
            per_slot: dict[SlotKey, torch.Tensor] = {}
            for slot, t, view in consumers:
                g = grads[id(t)]
                if g is None:
                    continue
                v = (view(t.detach()) * view(g)).sum(1).double().cpu()
                per_slot[slot] = per_slot[slot] + v if slot in per_slot else v
            for total, s in zip(totals, _aggregate(graph, per_slot)):
                total += s.pow(2)
            used += 1
    finally:
        for m, training in modes:
            m.training = training
        for t, flag in grad_flags:
            t.requires_grad_(flag)
    return [t / max(used, 1) for t in totals]


def unit_scores(
    model: nn.Module,
    graph: DependencyGraph,
    method: Method = "l2",
    *,
    data: Any = None,
    batches: int = 4,
    batch_size: int = 64,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Score every unit of every group of ``graph`` (built on ``model``).

    Args:
        model: the model the graph was built on.
        graph: from :func:`torchslim.prune.structured.build_dependency_graph`.
        method: ``"l1"``, ``"l2"``, ``"bn"``, ``"taylor"`` or ``"random"`` (see module docstring).
        data: for ``"taylor"``: anything with tensors ``x`` (inputs) and ``y`` (labels).
        batches: batches of ``data`` the Taylor scores are averaged over.
        batch_size: samples per batch for Taylor.
        seed: picks the Taylor batches and the random scores.

    Returns:
        One float64 tensor per group (``len(group.units)`` scores, higher = more important).

    Example:
        >>> import torch, torchslim as ts
        >>> from torchslim.prune.structured import build_dependency_graph
        >>> model = ts.models.create("fmnist_student", width=4, fc=8)
        >>> graph = build_dependency_graph(model, torch.randn(1, 1, 28, 28))
        >>> [s.shape[0] for s in unit_scores(model, graph, "l1")]
        [4, 8, 8]
    """
    if method in ("l1", "l2"):
        return _norm_scores(model, graph, 1 if method == "l1" else 2, ("producer", "consumer"))
    if method == "bn":
        bn = _norm_scores(model, graph, 1, ("bn",))
        l1 = _norm_scores(model, graph, 1, ("producer", "consumer"))
        has_bn = [any(graph.slot_types.get(s, "").startswith("BatchNorm") for s in g.slots) for g in graph.groups]
        return [b if flag else fallback for b, fallback, flag in zip(bn, l1, has_bn)]
    if method == "taylor":
        return _taylor_scores(model, graph, data, batches, batch_size, seed)
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        return [torch.rand(len(g.units), generator=gen, dtype=torch.float64) for g in graph.groups]
    raise ModelError(f"unknown importance {method!r}; known: l1, l2, bn, taylor, random")
