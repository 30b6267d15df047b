"""Channel rules for layers with weights: conv, linear, and per-channel layers (BatchNorm, LayerNorm, PReLU)."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

from torchslim.prune.structured.coupling import ChannelBuilder, Tracked
from torchslim.prune.structured.cost import conv_macs, linear_macs
from torchslim.prune.structured.registry import register_builtin_rule
from torchslim.prune.structured.rules.elementwise import passthrough
from torchslim.prune.structured.tracing import norm_dim, shape_of


@register_builtin_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(b: ChannelBuilder, node: fx.Node, m: nn.modules.conv._ConvNd) -> Any:
    name = str(node.target)
    x = node.args[0] if node.args else node.kwargs.get("input")
    t = b.tracked(x)
    if t is not None and t.dim != 1:
        b.freeze(t, f"reaches {name!r} on a dimension other than its channels")
    in_vars = b.vars_on(x, 1, "model input or untracked tensor")
    out_shape = shape_of(node)
    frozen = f"{name!r} is excluded by the config" if b.excluded(name) else None
    macs = conv_macs(m, out_shape)
    type_name = type(m).__name__
    bias = m.bias.numel() if m.bias is not None else 0
    if m.groups == 1:
        b.slot((name, "in"), in_vars, type_name)
        out_vars = b.new_slot((name, "out"), m.out_channels, type_name, frozen)
        b.cost_macs(macs, ((name, "in"), (name, "out")))
        b.cost_params(name, [(m.weight.numel(), ((name, "in"), (name, "out"))), (bias, ((name, "out"),))])
        return Tracked(1, out_vars)
    g = m.groups
    ipg, opg = m.in_channels // g, m.out_channels // g
    groups = b.new_slot((name, "groups"), g, type_name, frozen)
    for j in range(g):
        for i in range(ipg):
            if j * ipg + i < len(in_vars):
                b.uf.union(in_vars[j * ipg + i], groups[j])
    b.cost_macs(macs, ((name, "groups"),))
    b.cost_params(name, [(m.weight.numel() + bias, ((name, "groups"),))])
    return Tracked(1, [groups[j] for j in range(g) for _ in range(opg)])


@register_builtin_rule(nn.Linear)
def _linear(b: ChannelBuilder, node: fx.Node, m: nn.Linear) -> Any:
    name = str(node.target)
    x = node.args[0] if node.args else node.kwargs.get("input")
    shape = shape_of(x)
    if shape is None:
        b.unknown(node, m)
        return None
    last = len(shape) - 1
    t = b.tracked(x)
    frozen = f"{name!r} is excluded by the config" if b.excluded(name) else None
    type_name = type(m).__name__
    if t is not None and t.dim != last:
        # Channels on another dimension pass through untouched, but then the
        # linear's own outputs cannot be followed: keep them.
        b.slot((name, "in"), b.fresh(m.in_features, "untracked"), type_name)
        b.new_slot((name, "out"), m.out_features, type_name, f"outputs of {name!r} cannot be followed")
        b.cost_params(name, [(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0), ())])
        return Tracked(t.dim, t.vars)
    in_vars = b.vars_on(x, last, "model input or untracked tensor")
    b.slot((name, "in"), in_vars, type_name)
    out_vars = b.new_slot((name, "out"), m.out_features, type_name, frozen)
    b.cost_macs(linear_macs(m, shape), ((name, "in"), (name, "out")))
    b.cost_params(name, [(m.weight.numel(), ((name, "in"), (name, "out"))),
                         (m.bias.numel() if m.bias is not None else 0, ((name, "out"),))])
    return Tracked(last, out_vars)


def per_channel_layer(b: ChannelBuilder, node: fx.Node, m: nn.Module, dim: int, n_params: int) -> Any:
    """Rule for a channel-wise layer with one entry per channel along ``dim`` (BatchNorm, PReLU, a scale).

    Its entries become the slot ``(name, "out")``, tied to the channels of the input,
    so pruning a conv before it removes the same entries; a surgery for role ``"out"``
    must slice them. The output carries the input's channels.

    Args:
        b: the builder passed to the rule.
        node: the layer's fx node.
        m: the layer.
        dim: the channel dimension of the input (negative counts from the end).
        n_params: parameters of the layer that shrink with its channels.

    Returns:
        What the output carries: the input's channels, or None when the input has none to prune.
    """
    name = str(node.target)
    x = node.args[0]
    shape = shape_of(x)
    t = b.tracked(x)
    if shape is None:
        b.unknown(node, m)
        return None
    dim = norm_dim(dim, len(shape))
    if t is not None and t.dim != dim:
        return t  # channel-wise along another dimension: passes through
    vars = b.vars_on(x, dim, "model input or untracked tensor")
    vars = b.slot((name, "out"), vars, type(m).__name__)
    if b.excluded(name):
        for v in vars:
            b.uf.freeze(v, f"{name!r} is excluded by the config")
    b.cost_params(name, [(n_params, ((name, "out"),))])
    return Tracked(dim, vars) if t is not None else None


@register_builtin_rule(nn.modules.batchnorm._BatchNorm)
def _batchnorm(b: ChannelBuilder, node: fx.Node, m: nn.modules.batchnorm._BatchNorm) -> Any:
    n = sum(p.numel() for p in (m.weight, m.bias) if p is not None)
    return per_channel_layer(b, node, m, 1, n)


@register_builtin_rule(nn.PReLU)
def _prelu(b: ChannelBuilder, node: fx.Node, m: nn.PReLU) -> Any:
    if m.num_parameters == 1:
        return passthrough(b, node)
    return per_channel_layer(b, node, m, 1, m.num_parameters)


@register_builtin_rule(nn.LayerNorm)
def _layernorm(b: ChannelBuilder, node: fx.Node, m: nn.LayerNorm) -> Any:
    name = str(node.target)
    x = node.args[0]
    shape = shape_of(x)
    t = b.tracked(x)
    if t is None or shape is None:
        return None
    nd = len(m.normalized_shape)
    if t.dim < len(shape) - nd:
        return t  # normalizes other dimensions
    if nd != 1:
        b.freeze(t, f"{name!r} normalizes over several dimensions including the channels")
        return t
    vars = b.slot((name, "out"), t.vars, type(m).__name__)
    if not b.allow_layernorm:
        for v in vars:
            b.uf.freeze(v, f"LayerNorm {name!r} normalizes over these channels (allow_layernorm=True prunes them, "
                           "changing its statistics)")
    if b.excluded(name):
        for v in vars:
            b.uf.freeze(v, f"{name!r} is excluded by the config")
    n = sum(p.numel() for p in (m.weight, m.bias) if p is not None)
    b.cost_params(name, [(n, ((name, "out"),))])
    return Tracked(t.dim, vars)
