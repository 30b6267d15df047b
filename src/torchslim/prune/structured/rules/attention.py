"""Channel rule for multi-head attention: its heads are the prunable units, its embedding stays."""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
import torch.nn as nn

from torchslim.prune.structured.coupling import ChannelBuilder
from torchslim.prune.structured.cost import attention_macs
from torchslim.prune.structured.modules import PrunedMultiheadAttention
from torchslim.prune.structured.registry import register_builtin_rule
from torchslim.prune.structured.tracing import shape_of


@register_builtin_rule(nn.MultiheadAttention, PrunedMultiheadAttention)
def _attention(b: ChannelBuilder, node: fx.Node, m: nn.Module) -> Any:
    name = str(node.target)
    b.freeze_args(node, f"embed_dim of attention {name!r} is not pruned (its heads are)")
    if isinstance(m, nn.MultiheadAttention) and (not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn):
        b.report(node, m, "only attention with one in_proj, no bias_k/bias_v and no add_zero_attn has prunable heads")
        return (None, None)
    heads_frozen = f"{name!r} is excluded by the config" if b.excluded(name) else None
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0):
            heads_frozen = f"attention weights of {name!r} are used, and they depend on every head"
    heads = b.new_slot((name, "heads"), m.num_heads, type(m).__name__, heads_frozen)
    if heads_frozen:
        for v in heads:
            b.uf.freeze(v, heads_frozen)
    q, k = shape_of(node.args[0]), shape_of(node.args[1] if len(node.args) > 1 else node.kwargs.get("key"))
    if q is not None and k is not None and len(q) == 3:
        b.cost_macs(attention_macs(m, q, k), ((name, "heads"),))
    n_bias = m.in_proj_bias.numel() if m.in_proj_bias is not None else 0
    b.cost_params(name, [(m.in_proj_weight.numel() + n_bias + m.out_proj.weight.numel(), ((name, "heads"),))])
    return (None, None)
