"""Channel rules for ops that move or merge dimensions: flatten, view/reshape, transpose, permute, squeeze.

Channels follow their dimension; after a flatten one channel covers several
positions (a conv's channel x its spatial positions feeding a linear). A
reshape that splits the channel dimension, or fixes its size, freezes it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from torchslim.prune.structured.coupling import ChannelBuilder, Tracked
from torchslim.prune.structured.registry import register_builtin_rule, register_node_rule
from torchslim.prune.structured.tracing import describe, node_arg, norm_dim, shape_of


def _expand(vars: list[int], sizes: tuple[int, ...], pos: int) -> list[int]:
    """Variables of a flattened dimension made of ``sizes`` where ``sizes[pos]`` carries ``vars``."""
    outer, inner = math.prod(sizes[:pos]), math.prod(sizes[pos + 1:])
    return [v for _ in range(outer) for v in vars for _ in range(inner)]


def _flatten_dims(b: ChannelBuilder, node: fx.Node, x: Any, start: int, end: int) -> Any:
    t = b.tracked(x)
    shape = shape_of(x)
    if t is None or shape is None:
        return None
    n = len(shape)
    start, end = norm_dim(start, n), norm_dim(end, n)
    if t.dim < start:
        return t
    if t.dim > end:
        return Tracked(t.dim - (end - start), t.vars)
    return Tracked(start, _expand(t.vars, shape[start:end + 1], t.dim - start))


@register_node_rule(torch.flatten, "flatten")
def _flatten(b: ChannelBuilder, node: fx.Node) -> Any:
    return _flatten_dims(b, node, node.args[0], node_arg(node, 1, "start_dim", 0), node_arg(node, 2, "end_dim", -1))


@register_builtin_rule(nn.Flatten)
def _flatten_module(b: ChannelBuilder, node: fx.Node, m: nn.Flatten) -> Any:
    return _flatten_dims(b, node, node.args[0], m.start_dim, m.end_dim)


def _dim_groups(a: tuple[int, ...], c: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Match the dimensions of shape ``a`` to those of ``c`` as runs with equal products."""
    i = j = 0
    groups = []
    while i < len(a) or j < len(c):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i); pa = a[i]; i += 1  # noqa: E702
        if j < len(c):
            gj.append(j); pb = c[j]; j += 1  # noqa: E702
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i); pa *= a[i]; i += 1  # noqa: E702
            elif pb < pa and j < len(c):
                gj.append(j); pb *= c[j]; j += 1  # noqa: E702
            else:
                return None
        groups.append((gi, gj))
    return groups


@register_node_rule(torch.reshape, "view", "reshape")
def _reshape(b: ChannelBuilder, node: fx.Node) -> Any:
    x = node.args[0]
    t = b.tracked(x)
    in_shape, out_shape = shape_of(x), shape_of(node)
    if t is None:
        return None
    if in_shape is None or out_shape is None:
        b.unknown(node)
        return None
    groups = _dim_groups(in_shape, out_shape)
    group = next((g for g in groups or [] if t.dim in g[0]), None)
    reason = None
    if group is None or len(group[1]) != 1:
        reason = "reshape that splits the channel dimension"
    else:
        d_out = group[1][0]
        sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        if d_out < len(sizes) and isinstance(sizes[d_out], int) and sizes[d_out] != -1:
            reason = (f"reshape to the fixed size {sizes[d_out]} on the channel dimension "
                      "(write -1 or x.size(...) there to let it shrink)")
    if reason is not None:
        b.freeze(t, f"{describe(node)}: {reason}")
        b.report(node, None, reason)
        return None
    gi = group[0]
    sizes_in = tuple(in_shape[k] for k in gi)
    return Tracked(d_out, _expand(t.vars, sizes_in, gi.index(t.dim)))


@register_node_rule(torch.transpose, "transpose")
def _transpose(b: ChannelBuilder, node: fx.Node) -> Any:
    t = b.tracked(node.args[0])
    if t is None:
        return None
    n = len(shape_of(node.args[0]))
    d0, d1 = norm_dim(node_arg(node, 1, "dim0"), n), norm_dim(node_arg(node, 2, "dim1"), n)
    d = d1 if t.dim == d0 else d0 if t.dim == d1 else t.dim
    return Tracked(d, t.vars)


@register_node_rule(torch.permute, "permute")
def _permute(b: ChannelBuilder, node: fx.Node) -> Any:
    t = b.tracked(node.args[0])
    if t is None:
        return None
    n = len(shape_of(node.args[0]))
    dims = node.args[1:] if node.op == "call_method" else (node.args[1],) if len(node.args) > 1 else (node.kwargs["dims"],)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    dims = [norm_dim(d, n) for d in dims]
    return Tracked(dims.index(t.dim), t.vars)


@register_node_rule(torch.unsqueeze, torch.squeeze, "unsqueeze", "squeeze")
def _squeeze_like(b: ChannelBuilder, node: fx.Node) -> Any:
    """unsqueeze / squeeze: find where the channel dimension went from the shapes."""
    t = b.tracked(node.args[0])
    if t is None:
        return None
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    c = in_shape[t.dim]
    before = sum(1 for s in in_shape[:t.dim] if s != 1)
    seen = 0
    for i, s in enumerate(out_shape):
        if s != 1:
            if seen == before and s == c:
                return Tracked(i, t.vars)
            seen += 1
    b.unknown(node)
    return None
