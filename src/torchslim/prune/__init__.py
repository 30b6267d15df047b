"""Pruning: importance scores, selection, schedules, masks and their finalization.

Four parts kept apart (STYLE item 4):

* importance -- :mod:`torchslim.prune.importance`: criteria ``scores = f(module, name, context)``
  registered by name (``l1``, ``l2``, ``taylor``, ``snip``, ``random``, or your own);
* selection -- :mod:`torchslim.prune.masking`: pure ``mask = f(scores, ..., previous_mask)``
  (count, threshold, Han's rule, global with a minimum kept per layer, N:M);
* schedules -- one-shot ``prune_``, :func:`prune_iteratively` (with rewinding),
  :func:`gradual_pruning_hook` (AGP during ``fit``);
* masks -- :mod:`torchslim.prune.masks`, beside the weight, finalized with :func:`finalize_`.

``prune_(model, UnstructuredPruning(...), data)`` adds or updates masks in place;
:func:`sensitivity_analysis` measures each layer alone; :func:`pruning_summary`
gives a report its table and one-line description. :func:`check_pruning` (names,
N:M divisibility) checks a config against a model before anything trains.
"""

from torchslim.prune.api import prune_, register_pruning_handler
from torchslim.prune.importance import (
    CRITERIA,
    GRADIENT_CRITERIA,
    ImportanceContext,
    compute_scores,
    get_criterion,
    register_criterion,
    unit_mean_scores,
)
from torchslim.prune.magnitude import MagnitudePruning, as_unstructured, magnitude_scores
from torchslim.prune.masking import (
    global_masks,
    han_threshold,
    is_n_m_sparse,
    keep_at_least,
    layer_prune_count,
    mask_by_count,
    mask_by_han,
    mask_by_threshold,
    mask_n_m,
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
from torchslim.prune.schedule import AGPSchedule, GradualSchedule, at_sparsity, gradual_pruning_hook
from torchslim.prune.selection import first_and_last, name_matches, resolve_override, select_layers
from torchslim.prune.unstructured import (
    UnstructuredPruning,
    check_n_m,
    check_n_m_divisible,
    check_unstructured_names,
    importance_context,
    pruning_layers,
)
from torchslim.prune.iterative import (  # noqa: I001  (needs schedule and unstructured first)
    IterativeSchedule,
    WeightSnapshot,
    prune_iteratively,
    rewind_,
    snapshot_weights,
)
from torchslim.prune.sensitivity import SensitivityConfig, SensitivityResult, sensitivity_analysis
from torchslim.prune.report import describe_pruning, pruning_summary, sparsity_table
from torchslim.prune.checks import check_layer_names, check_pruning


__all__ = [
    "AGPSchedule",
    "GradualSchedule",
    "CRITERIA",
    "GRADIENT_CRITERIA",
    "ImportanceContext",
    "IterativeSchedule",
    "MagnitudePruning",
    "SensitivityConfig",
    "SensitivityResult",
    "UnstructuredPruning",
    "WeightSnapshot",
    "apply_mask_",
    "as_unstructured",
    "at_sparsity",
    "check_layer_names",
    "check_n_m",
    "check_n_m_divisible",
    "check_pruning",
    "check_unstructured_names",
    "compute_scores",
    "describe_pruning",
    "effective_weight",
    "finalize_",
    "first_and_last",
    "get_criterion",
    "get_mask",
    "global_masks",
    "global_sparsity",
    "gradual_pruning_hook",
    "han_threshold",
    "importance_context",
    "is_masked",
    "is_n_m_sparse",
    "keep_at_least",
    "layer_prune_count",
    "layer_sparsity",
    "magnitude_scores",
    "mask_by_count",
    "mask_by_han",
    "mask_by_threshold",
    "mask_n_m",
    "masked_layers",
    "name_matches",
    "prune_",
    "prune_iteratively",
    "pruning_layers",
    "pruning_summary",
    "register_criterion",
    "register_pruning_handler",
    "resolve_override",
    "rewind_",
    "select_layers",
    "sensitivity_analysis",
    "snapshot_weights",
    "sparsity_table",
    "unit_mean_scores",
]
