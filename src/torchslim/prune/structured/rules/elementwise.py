"""Channel rules for channel-wise ops: elementwise arithmetic, activations, pooling, reductions, softmax.

Binary ops tie the channels of their operands (a residual add merges the
channels of both branches); a parameter used only elementwise (``x * self.scale``)
is sliced with the channels it meets. Reductions and softmax over the channels
freeze them.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from torchslim.prune.structured.coupling import ChannelBuilder, Tracked
from torchslim.prune.structured.registry import register_builtin_rule, register_node_rule
from torchslim.prune.structured.tracing import describe, flat_nodes, get_attr_value, node_arg, norm_dim, shape_of

_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
           operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
           torch.minimum, torch.where, "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_",
           "maximum", "minimum"}

_UNARY_FUNCTIONS = [F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.leaky_relu, F.hardswish,
                    F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
                    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp,
                    torch.square, torch.sqrt, torch.rsqrt, operator.neg, torch.nn.functional.relu_]

_UNARY_METHODS = ["relu", "relu_", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clamp_", "clamp_min",
                  "clamp_max", "square", "sqrt", "rsqrt", "contiguous", "float", "double", "half", "bfloat16",
                  "to", "type_as", "clone", "detach", "pow"]

_SPATIAL_FUNCTIONS = [F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                      F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                      F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate]

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
                nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout,
                nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)


@register_builtin_rule(*_ACTIVATIONS)
@register_node_rule(*_UNARY_FUNCTIONS, *_UNARY_METHODS, torch.pow, operator.pow)
def passthrough(b: ChannelBuilder, node: fx.Node, *_: Any) -> Any:
    """Rule for a shape-preserving, channel-wise op on its first argument (activations, dropout, casts).

    Usable as a module rule too (``register_channel_rule(MyActivation)(passthrough)``):
    the output carries the input's channels unchanged.
    """
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    t = b.tracked(x)
    if t is None:
        return None
    if shape_of(node) != shape_of(x):
        b.unknown(node)
        return None
    return t


@register_builtin_rule(*_POOLS)
@register_node_rule(*_SPATIAL_FUNCTIONS)
def _spatial(b: ChannelBuilder, node: fx.Node, *_: Any) -> Any:
    """Pooling and resizing: channels on dimension 1 pass, the others change."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    t = b.tracked(x)
    if t is None:
        return None
    if t.dim == 1:
        return t
    b.unknown(node, None, "pooling over the channel dimension")
    return None


@register_node_rule(*_BINARY, elementwise=True)
def _elementwise(b: ChannelBuilder, node: fx.Node) -> Any:
    """Broadcasting n-ary ops: the channels of every operand on the same dimension are tied."""
    out_shape = shape_of(node)
    tensors = [a for a in flat_nodes(node.args, node.kwargs) if shape_of(a) is not None]
    if out_shape is None:
        b.unknown(node)
        return None
    d_out = None
    for a in tensors:
        t = b.tracked(a)
        if t is not None:
            d_out = t.dim + len(out_shape) - len(shape_of(a))
            break
    if d_out is None:
        return None
    out_vars: list[int] | None = None
    for a in tensors:
        shape = shape_of(a)
        d = d_out - (len(out_shape) - len(shape))
        t = b.tracked(a)
        if t is not None and t.dim != d:
            b.freeze(t, f"combined on another dimension in {describe(node)}")
        if d < 0 or shape[d] == 1:
            continue
        if t is not None and t.dim == d:
            vars = t.vars
        elif a.op == "get_attr" and b.attr_ok.get(a.target, False):
            key = (str(a.target), f"dim{d}")
            tensor = get_attr_value(b.gm, a.target)
            vars = b.new_slot(key, shape[d], "Parameter" if isinstance(tensor, nn.Parameter) else "Tensor",
                              f"{a.target!r} is excluded by the config" if b.excluded(str(a.target)) else None)
            b.cost_params(str(a.target), [(tensor.numel(), (key,))] if isinstance(tensor, nn.Parameter) else [])
        else:
            vars = b.fresh(shape[d], f"combined in {describe(node)} with a tensor whose channels cannot be pruned")
        if out_vars is None:
            out_vars = list(vars)
        else:
            for x, y in zip(out_vars, vars):
                b.uf.union(x, y)
    return Tracked(d_out, out_vars) if out_vars is not None else None


@register_node_rule(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
def _reduce(b: ChannelBuilder, node: fx.Node) -> Any:
    x = node.args[0]
    t = b.tracked(x)
    if t is None:
        return None
    n = len(shape_of(x))
    dims = node_arg(node, 1, "dim", None)
    keepdim = bool(node_arg(node, 2, "keepdim", False))
    if dims is None:
        dims = list(range(n))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [norm_dim(d, n) for d in dims]
    if t.dim in dims:
        b.freeze(t, f"{describe(node)} reduces over the channels")
        b.report(node, None, "reduction over the channel dimension")
        return None
    return Tracked(t.dim if keepdim else t.dim - sum(d < t.dim for d in dims), t.vars)


def _softmax_dim(b: ChannelBuilder, node: fx.Node, x: Any, dim: int | None) -> Any:
    t = b.tracked(x)
    if t is None:
        return None
    if dim is None or norm_dim(dim, len(shape_of(x))) == t.dim:
        b.freeze(t, f"{describe(node)} normalizes over the channels")
        b.report(node, None, "softmax over the channel dimension")
        return None
    return t


@register_node_rule(F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax")
def _softmax(b: ChannelBuilder, node: fx.Node) -> Any:
    return _softmax_dim(b, node, node.args[0], node_arg(node, 1, "dim"))


@register_builtin_rule(nn.Softmax, nn.LogSoftmax)
def _softmax_module(b: ChannelBuilder, node: fx.Node, m: nn.Module) -> Any:
    return _softmax_dim(b, node, node.args[0], m.dim)


@register_node_rule(getattr, "size", "dim", "numel")
def _meta(b: ChannelBuilder, node: fx.Node) -> Any:
    """Reading sizes and attributes: no tensor, no channels."""
    return None
