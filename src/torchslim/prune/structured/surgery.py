"""Surgery: rebuild layers with fewer channels, one small function per layer type and role.

An *op* removes indices of one slot (see :mod:`torchslim.prune.structured.graph`)::

    {"target": "features.0", "role": "out", "size": 32, "removed": [3, 17]}

``size`` is the slot's size before the op, checked so that a history replayed
onto the wrong model fails loudly. Roles: ``out`` / ``in`` (output / input
channels of a conv or linear, entries of a BatchNorm, LayerNorm or PReLU),
``groups`` (whole groups of a grouped or depthwise conv), ``heads`` (attention
heads) and ``dim<k>`` (a parameter or buffer of the model, sliced along k).

:data:`SURGERY` maps ``(layer type, role)`` to ``(size, apply)``: ``size(module)``
reads the current size, ``apply(module, keep)`` slices the module in place or
returns a replacement module. Add an entry with :func:`register_surgery`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn

from torchslim.errors import ModelError
from torchslim.prune.structured.modules import PrunedMultiheadAttention

SizeFn = Callable[[nn.Module], int]
ApplyFn = Callable[[nn.Module, torch.Tensor], "nn.Module | None"]
SURGERY: dict[tuple[type, str], tuple[SizeFn, ApplyFn]] = {}


def register_surgery(module_type: type, role: str, size: SizeFn) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator: register ``apply(module, keep)`` for ``module_type`` and ``role``.

    Example:
        >>> @register_surgery(nn.GroupNorm, "out", size=lambda m: m.num_channels)  # doctest: +SKIP
        ... def _groupnorm(m, keep): ...
    """
    def decorate(fn: ApplyFn) -> ApplyFn:
        SURGERY[(module_type, role)] = (size, fn)
        return fn

    return decorate


def _lookup(module: nn.Module, role: str) -> tuple[SizeFn, ApplyFn] | None:
    for cls in type(module).__mro__:
        if (cls, role) in SURGERY:
            return SURGERY[(cls, role)]
    return None


def _sliced(t: torch.Tensor | None, keep: torch.Tensor, dim: int = 0) -> Any:
    """``t`` indexed by ``keep`` along ``dim``, a Parameter again if it was one."""
    if t is None:
        return None
    data = t.detach().index_select(dim, keep.to(t.device)).clone()
    return nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_out(m: nn.modules.conv._ConvNd, keep: torch.Tensor) -> None:
    m.weight = _sliced(m.weight, keep)
    m.bias = _sliced(m.bias, keep)
    m.out_channels = len(keep)


def _conv_in(m: nn.modules.conv._ConvNd, keep: torch.Tensor) -> None:
    if m.groups != 1:
        raise ModelError(f"cannot remove input channels of a grouped conv ({m}); remove whole groups")
    m.weight = _sliced(m.weight, keep, 1)
    m.in_channels = len(keep)


def _conv_groups(m: nn.modules.conv._ConvNd, keep: torch.Tensor) -> None:
    opg, ipg = m.out_channels // m.groups, m.in_channels // m.groups
    rows = (keep.view(-1, 1) * opg + torch.arange(opg)).reshape(-1)
    m.weight = _sliced(m.weight, rows)
    m.bias = _sliced(m.bias, rows)
    m.groups = len(keep)
    m.in_channels, m.out_channels = len(keep) * ipg, len(keep) * opg


for _conv in _CONVS:
    register_surgery(_conv, "out", size=lambda m: m.out_channels)(_conv_out)
    register_surgery(_conv, "in", size=lambda m: m.in_channels)(_conv_in)
    register_surgery(_conv, "groups", size=lambda m: m.groups)(_conv_groups)


@register_surgery(nn.Linear, "out", size=lambda m: m.out_features)
def _linear_out(m: nn.Linear, keep: torch.Tensor) -> None:
    m.weight = _sliced(m.weight, keep)
    m.bias = _sliced(m.bias, keep)
    m.out_features = len(keep)


@register_surgery(nn.Linear, "in", size=lambda m: m.in_features)
def _linear_in(m: nn.Linear, keep: torch.Tensor) -> None:
    m.weight = _sliced(m.weight, keep, 1)
    m.in_features = len(keep)


@register_surgery(nn.modules.batchnorm._BatchNorm, "out", size=lambda m: m.num_features)
def _batchnorm(m: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> None:
    m.weight = _sliced(m.weight, keep)
    m.bias = _sliced(m.bias, keep)
    if m.running_mean is not None:
        m.running_mean = _sliced(m.running_mean, keep)
        m.running_var = _sliced(m.running_var, keep)
    m.num_features = len(keep)


@register_surgery(nn.LayerNorm, "out", size=lambda m: m.normalized_shape[-1])
def _layernorm(m: nn.LayerNorm, keep: torch.Tensor) -> None:
    m.weight = _sliced(m.weight, keep)
    m.bias = _sliced(m.bias, keep)
    m.normalized_shape = (len(keep),)


@register_surgery(nn.PReLU, "out", size=lambda m: m.num_parameters)
def _prelu(m: nn.PReLU, keep: torch.Tensor) -> None:
    m.weight = _sliced(m.weight, keep)
    m.num_parameters = len(keep)


def _head_rows(keep: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (keep.view(-1, 1) * head_dim + torch.arange(head_dim)).reshape(-1)


def _heads(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    """Keep some heads of an attention layer: a :class:`PrunedMultiheadAttention` with the same weights."""
    heads, hd, e = m.num_heads, m.head_dim, m.embed_dim
    inner = heads * hd
    cols = _head_rows(keep, hd)
    rows = torch.cat([cols + k * inner for k in range(3)])
    bias = m.in_proj_bias is not None
    dropout = m.dropout if isinstance(m.dropout, float) else 0.0
    new = PrunedMultiheadAttention(e, len(keep), hd, bias=bias, batch_first=m.batch_first, dropout=dropout)
    p = m.in_proj_weight
    new = new.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        new.in_proj_weight.copy_(p.index_select(0, rows.to(p.device)))
        if bias:
            new.in_proj_bias.copy_(m.in_proj_bias.index_select(0, rows.to(p.device)))
            new.out_proj.bias.copy_(m.out_proj.bias)
        new.out_proj.weight.copy_(m.out_proj.weight.index_select(1, cols.to(p.device)))
    new.train(m.training)
    return new


register_surgery(nn.MultiheadAttention, "heads", size=lambda m: m.num_heads)(_heads)
register_surgery(PrunedMultiheadAttention, "heads", size=lambda m: m.num_heads)(_heads)


# ---------------------------------------------------------------------------
# applying ops
# ---------------------------------------------------------------------------


def _keep_indices(op: dict[str, Any], size: int) -> torch.Tensor:
    removed = set(op["removed"])
    if op["size"] != size:
        raise ModelError(f"{op['target']!r} ({op['role']}) has size {size}, but the pruning op was recorded for size "
                         f"{op['size']}: the model does not match the pruning history")
    if not removed <= set(range(size)) or len(removed) >= size:
        raise ModelError(f"pruning op for {op['target']!r} ({op['role']}) removes invalid indices {sorted(removed)[:8]} of {size}")
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def _tensor_owner(model: nn.Module, target: str) -> tuple[nn.Module, str]:
    prefix, _, attr = target.rpartition(".")
    try:
        owner = model.get_submodule(prefix)
    except AttributeError:
        raise ModelError(f"the model has no module {prefix!r} (pruning op for tensor {target!r})") from None
    if attr not in owner._parameters and attr not in owner._buffers:
        raise ModelError(f"the model has no parameter or buffer {target!r} (pruning op)")
    return owner, attr


def apply_op_(model: nn.Module, op: dict[str, Any]) -> None:
    """Apply one op to ``model`` in place (a replaced layer is set on its parent)."""
    target, role = op["target"], op["role"]
    if role.startswith("dim"):
        dim = int(role[3:])
        owner, attr = _tensor_owner(model, target)
        tensor = owner._parameters.get(attr, owner._buffers.get(attr))
        keep = _keep_indices(op, tensor.shape[dim])
        if attr in owner._parameters:
            owner._parameters[attr] = _sliced(tensor, keep, dim)
        else:
            owner._buffers[attr] = _sliced(tensor, keep, dim)
        return
    try:
        module = model.get_submodule(target)
    except AttributeError:
        raise ModelError(f"the model has no module {target!r} (pruning op {role!r})") from None
    entry = _lookup(module, role)
    if entry is None:
        raise ModelError(f"no surgery for {type(module).__name__} ({target!r}) and role {role!r}")
    size, apply = entry
    replacement = apply(module, _keep_indices(op, size(module)))
    if replacement is not None:
        if not target:
            raise ModelError("cannot replace the root module during pruning")
        model.set_submodule(target, replacement)


def apply_ops_(model: nn.Module, ops: list[dict[str, Any]]) -> None:
    """Apply one pruning step (a list of ops) to ``model`` in place."""
    for op in ops:
        apply_op_(model, op)


def masked_reference(model: nn.Module, ops: list[dict[str, Any]]) -> nn.Module:
    """A copy of ``model`` that computes what ``ops`` would leave, with zeros instead of removal.

    Every removed channel is zeroed where it is read: input columns of convs and
    linears, the output-projection columns of removed attention heads. Because
    everything between a channel's writers and its readers is channel-wise, the
    physically pruned model gives the same outputs as this copy (to float
    rounding), which is what the tests check.

    Args:
        model: the model the ops were planned on (not changed).
        ops: one pruning step, e.g. ``pruned.torchslim_history[0]["ops"]``.
    """
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for op in ops:
            if op["role"] not in ("in", "heads"):
                continue
            module = ref.get_submodule(op["target"])
            removed = torch.tensor(op["removed"], dtype=torch.long)
            if op["role"] == "in":
                module.weight[:, removed] = 0
            else:
                module.out_proj.weight[:, _head_rows(removed, module.head_dim)] = 0
    return ref
