"""Counting: parameters, nonzero parameters, MACs and in-memory bytes.

Masked models (``weight_orig`` + ``weight_mask``, see :mod:`torchslim.core.masks`)
are counted as what they compute: a masked weight counts once, with its pruned
entries as zeros, and the mask buffer is bookkeeping, not part of the model.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from torchslim.core.masks import finalize_, has_masks, is_masked
from torchslim.errors import ModelError


def _call_args(example_inputs: Any) -> tuple[tuple, dict]:
    """A tensor → one positional arg; a tuple/list → positional args; a dict → keyword args."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def finalized_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every mask made permanent (the model is untouched)."""
    model_copy = copy.deepcopy(model)
    finalize_(model_copy)
    return model_copy


def _mask_buffer_ids(model: nn.Module) -> set[int]:
    return {
        id(m._buffers[f"{pname[: -len('_orig')]}_mask"])
        for m in model.modules()
        for pname in m._parameters
        if pname.endswith("_orig") and is_masked(m, pname[: -len("_orig")])
    }


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, dense: a masked weight counts all its entries, once.

    Shared (tied) parameters count once; mask buffers are not parameters.

    Example:
        >>> import torch.nn as nn
        >>> count_parameters(nn.Linear(10, 5))
        55
    """
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of nonzero entries of the parameters the model computes with.

    For a masked weight that is ``weight_orig * weight_mask``; shared parameters
    count once.

    Example:
        >>> import torch, torch.nn as nn
        >>> layer = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     layer.weight[0] = 0
        >>> count_nonzero(layer)
        6
    """
    seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for module in model.modules():
            for pname, param in module._parameters.items():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                base = pname[: -len("_orig")] if pname.endswith("_orig") else None
                if base is not None and is_masked(module, base):
                    param = param * module._buffers[f"{base}_mask"]
                total += int(torch.count_nonzero(param))
    return total


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # The CPU fused attention kernel has no formula in FlopCounterMode; count it like the CUDA ones.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Ops FlopCounterMode misses, with their formulas (on shapes).
_EXTRA_FORMULAS = {getattr(torch.ops.aten, name): _sdpa_cpu_flops
                   for name in ("_scaled_dot_product_flash_attention_for_cpu",) if hasattr(torch.ops.aten, name)}


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    """Set ``torch.backends.mha``'s fast path for the block, then restore it."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (whole batch).

    Counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``
    (MACs = FLOPs / 2), which counts matrix multiplies and convolutions (the
    ops that dominate): elementwise ops, BatchNorm, pooling and bias adds are
    not counted, as in fvcore and most papers. Attention is counted too: the
    pass runs with ``torch.backends.mha`` fast path off (restored afterwards),
    so ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` run as
    their projections plus scaled-dot-product attention (Q·Kᵀ and weights·V,
    each ``B·heads·L_q·L_k·head_dim`` MACs), not as one fused kernel the
    counter cannot see. The count is dense: zeros left
    by unstructured pruning still cost MACs on dense kernels; only channel
    pruning makes this number smaller.

    The pass runs under ``torch.no_grad`` in eval mode (the model's modes are
    restored); a masked model is measured on a finalized deep copy.

    Args:
        model: the model.
        example_inputs: a tensor (batch dimension first), a tuple of positional
            inputs, or a dict of keyword inputs.

    Example:
        >>> import torch, torch.nn as nn
        >>> count_macs(nn.Linear(10, 5), torch.randn(1, 10))
        50
    """
    args, kwargs = _call_args(example_inputs)
    target = finalized_copy(model) if has_masks(model) else model
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        with eval_mode(target), torch.no_grad(), _mha_fastpath(False), counter:
            target(*args, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot count MACs: the model failed on the example inputs: {type(exc).__name__}: {exc}") from exc
    return int(counter.get_total_flops()) // 2


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers held densely in memory.

    What a finalized copy would hold: a masked weight counts once and its mask
    buffer not at all. Shared tensors count once.

    Example:
        >>> import torch.nn as nn
        >>> dense_bytes(nn.Linear(10, 5))  # 55 float32
        220
    """
    masks = _mask_buffer_ids(model)
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in masks:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
