"""Channel rules for ops that join, split or index tensors: cat, stack, chunk/split/unbind, getitem.

Concatenating along the channels lays the inputs' channels side by side
(a DenseNet-style concat); along another dimension it ties them like an add.
Splitting or slicing the channels freezes them.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from torchslim.prune.structured.coupling import ChannelBuilder, Tracked
from torchslim.prune.structured.registry import register_node_rule
from torchslim.prune.structured.tracing import describe, node_arg, norm_dim, shape_of


@register_node_rule(torch.cat, torch.concat)
def _cat(b: ChannelBuilder, node: fx.Node) -> Any:
    tensors = list(node_arg(node, 0, "tensors"))
    out_shape = shape_of(node)
    if out_shape is None:
        return None
    dim = norm_dim(node_arg(node, 1, "dim", 0), len(out_shape))
    tracked = [b.tracked(a) for a in tensors]
    first = next((t for t in tracked if t is not None), None)
    if first is None:
        return None
    if first.dim != dim:
        return _elementwise_on(b, node, tensors, first.dim)
    vars: list[int] = []
    for a, t in zip(tensors, tracked):
        if t is not None and t.dim != dim:
            b.freeze(t, f"concatenated on another dimension in {describe(node)}")
        vars += b.vars_on(a, dim, "concatenated with an untracked tensor")
    return Tracked(dim, vars)


def _elementwise_on(b: ChannelBuilder, node: fx.Node, tensors: list[Any], d: int) -> Any:
    """Tie the channels of same-rank ``tensors`` on dimension ``d`` (cat/stack along other dimensions)."""
    out: list[int] | None = None
    for a in tensors:
        t = b.tracked(a)
        if t is not None and t.dim != d:
            b.freeze(t, f"combined on another dimension in {describe(node)}")
        vars = b.vars_on(a, d, f"combined in {describe(node)} with an untracked tensor")
        if out is None:
            out = list(vars)
        else:
            for x, y in zip(out, vars):
                b.uf.union(x, y)
    return Tracked(d, out) if out else None


@register_node_rule(torch.stack)
def _stack(b: ChannelBuilder, node: fx.Node) -> Any:
    tensors = list(node_arg(node, 0, "tensors"))
    first = next((b.tracked(a) for a in tensors if b.tracked(a) is not None), None)
    if first is None:
        return None
    k = norm_dim(node_arg(node, 1, "dim", 0), len(shape_of(node)))
    t = _elementwise_on(b, node, tensors, first.dim)
    return Tracked(t.dim + (1 if k <= t.dim else 0), t.vars) if t else None


@register_node_rule(torch.chunk, torch.split, torch.unbind, "chunk", "split", "unbind")
def _split(b: ChannelBuilder, node: fx.Node) -> Any:
    """chunk / split / unbind: fine along other dimensions, unsupported along the channels."""
    x = node.args[0]
    t = b.tracked(x)
    if t is None:
        return None
    n = len(shape_of(x))
    unbind = node.target in (torch.unbind, "unbind")
    dim = norm_dim(node_arg(node, 1 if unbind else 2, "dim", 0), n)
    if dim == t.dim:
        b.freeze(t, f"{describe(node)} splits the channels")
        b.report(node, None, "split of the channel dimension")
        return None
    meta = node.meta.get("tensor_meta")
    count = len(meta) if isinstance(meta, (tuple, list)) else 1
    d = t.dim - (1 if unbind and dim < t.dim else 0)
    return tuple(Tracked(d, t.vars) for _ in range(count))


@register_node_rule(operator.getitem)
def _getitem(b: ChannelBuilder, node: fx.Node) -> Any:
    src, idx = node.args[0], node.args[1]
    info = b.info.get(src) if isinstance(src, fx.Node) else None
    if isinstance(info, (tuple, list)):
        return info[idx] if isinstance(idx, int) and -len(info) <= idx < len(info) else None
    if not isinstance(info, Tracked):
        return None
    shape = shape_of(src)
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
        b.freeze(info, f"indexed with a tensor in {describe(node)}")
        b.report(node, None, "advanced indexing of a tensor with channels")
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(shape) - consumed)
        else:
            expanded.append(i)
    p = q = 0
    d_out = None
    for i in expanded:
        if i is None:
            q += 1
            continue
        if p == info.dim:
            if not (isinstance(i, slice) and i == slice(None)):
                b.freeze(info, f"{describe(node)} selects some channels")
                b.report(node, None, "slicing of the channel dimension")
                return None
            d_out = q
        if isinstance(i, slice):
            q += 1
        p += 1
    if d_out is None:
        d_out = q + (info.dim - p)
    return Tracked(d_out, info.vars)
