"""Masks beside the original weight: re-exported from :mod:`torchslim.core.masks`.

The convention (``weight_orig`` + ``weight_mask`` + a forward pre-hook) lives in
``core`` so that ``measure`` and ``export`` use it without importing ``prune``;
this module keeps the names prune's own modules (and users) import from here.
"""

from torchslim.core.masks import (
    apply_mask_,
    effective_weight,
    finalize_,
    get_mask,
    global_sparsity,
    has_masks,
    is_masked,
    layer_sparsity,
    masked_layers,
    masked_tensors,
)

__all__ = [
    "apply_mask_",
    "effective_weight",
    "finalize_",
    "get_mask",
    "global_sparsity",
    "has_masks",
    "is_masked",
    "layer_sparsity",
    "masked_layers",
    "masked_tensors",
]
