"""Pruning: importance scores, selection, masks and their finalization.

``prune_(model, MagnitudePruning(...))`` adds masks in place; ``finalize_``
makes them permanent; ``layer_sparsity`` reads per-layer sparsity back.
"""

from torchslim.prune.magnitude import (
    MagnitudePruning,
    magnitude_scores,
    mask_by_count,
    mask_by_threshold,
    prune_,
)
from torchslim.prune.masks import (
    apply_mask_,
    effective_weight,
    finalize_,
    get_mask,
    global_sparsity,
    is_masked,
    layer_sparsity,
    masked_layers,
)
from torchslim.prune.schedule import AGPSchedule, gradual_pruning_hook
from torchslim.prune.selection import name_matches, select_layers

__all__ = [
    "AGPSchedule",
    "gradual_pruning_hook",
    "MagnitudePruning",
    "apply_mask_",
    "effective_weight",
    "finalize_",
    "get_mask",
    "global_sparsity",
    "is_masked",
    "layer_sparsity",
    "magnitude_scores",
    "mask_by_count",
    "mask_by_threshold",
    "masked_layers",
    "name_matches",
    "prune_",
    "select_layers",
]
