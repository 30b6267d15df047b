"""Masks that sit beside the original weight, in ``torch.nn.utils.prune``'s convention.

A pruned parameter ``weight`` becomes a trainable ``weight_orig`` plus a
``weight_mask`` buffer; a forward pre-hook recomputes ``weight = weight_orig *
weight_mask``. Gradients of pruned entries are therefore exactly zero, the
optimizer keeps working on ``weight_orig`` unchanged, and a pruned weight
cannot come back through momentum or weight decay while the mask is there.
Masks are updated in place (so an optimizer built earlier stays valid) and
made permanent with :func:`finalize_`.

This module is the one home of that convention: ``prune`` computes masks,
``measure`` counts through them and ``export`` stores them, all through these
functions, so none of them needs to import another.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

from torchslim.errors import ConfigError


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    """True when ``module.<name>`` carries a pruning mask."""
    return hasattr(module, f"{name}_mask") and hasattr(module, f"{name}_orig")


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The current mask of ``module.<name>``, or None when it is not pruned."""
    return getattr(module, f"{name}_mask") if is_masked(module, name) else None


def effective_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The weight the module computes with (``orig * mask`` when masked)."""
    if is_masked(module, name):
        return getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask")
    return getattr(module, name)


def apply_mask_(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Set the mask of ``module.<name>``: add one, or update the existing one in place.

    Entries the mask removes are also zeroed in ``<name>_orig`` so that the stored
    original agrees with what the model computes.
    """
    param = getattr(module, f"{name}_orig") if is_masked(module, name) else getattr(module, name)
    if mask.shape != param.shape:
        raise ConfigError(f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(param.shape)}")
    mask = mask.to(dtype=param.dtype, device=param.device)
    if is_masked(module, name):
        getattr(module, f"{name}_mask").copy_(mask)
    else:
        torch_prune.custom_from_mask(module, name, mask)
    with torch.no_grad():
        getattr(module, f"{name}_orig").mul_(getattr(module, f"{name}_mask"))
        # The pre-hook only refreshes `weight` at the next forward; refresh it now
        # so that reading module.weight right after pruning is already correct.
        setattr(module, name, getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask"))


def masked_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(full_name, module, attr)`` of every masked tensor, one per state-dict path.

    ``full_name`` is the plain state-dict name the tensor has once finalized
    (``"features.0.weight"``); shared modules appear once per path, as in
    ``model.state_dict()``.
    """
    out = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for pname in list(module._parameters):
            if pname.endswith("_orig") and is_masked(module, pname[: -len("_orig")]):
                attr = pname[: -len("_orig")]
                out.append((f"{prefix}.{attr}" if prefix else attr, module, attr))
    return out


def has_masks(model: nn.Module) -> bool:
    """True when any tensor of ``model`` carries a pruning mask."""
    return any(
        pname.endswith("_orig") and is_masked(m, pname[: -len("_orig")])
        for m in model.modules()
        for pname in m._parameters
    )


def finalize_(model: nn.Module) -> None:
    """Make every mask in ``model`` permanent: plain parameters with zeros, no hooks."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs whose weight carries a mask."""
    return [(n, m) for n, m in model.named_modules() if is_masked(m)]


def layer_sparsity(model: nn.Module, layers: list[tuple[str, nn.Module]] | None = None) -> dict[str, dict[str, float]]:
    """Per-layer weight sparsity, read back from the weights the model computes with.

    Returns ``{name: {"zeros": int, "total": int, "sparsity": float}}`` for the given
    layers, or by default for every Linear/Conv layer.
    """
    if layers is None:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    out = {}
    for name, module in layers:
        w = effective_weight(module)
        zeros = int((w == 0).sum())
        out[name] = {"zeros": zeros, "total": w.numel(), "sparsity": zeros / max(w.numel(), 1)}
    return out


def global_sparsity(model: nn.Module, layers: list[tuple[str, nn.Module]] | None = None) -> float:
    """Fraction of zero weights over the given layers (default: every Linear/Conv layer)."""
    stats = layer_sparsity(model, layers)
    total = sum(s["total"] for s in stats.values())
    return sum(s["zeros"] for s in stats.values()) / max(total, 1)
