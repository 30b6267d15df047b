"""Structured pruning: remove whole channels so the model is genuinely smaller and faster.

Four parts, kept apart:

* coupling (:mod:`~torchslim.prune.structured.graph`): a torch.fx dependency graph
  that finds which channels of which layers must be removed together, from one
  channel rule per layer type and op (:mod:`~torchslim.prune.structured.rules`;
  add one for your own layer with :func:`register_channel_rule`);
* importance (:mod:`~torchslim.prune.structured.importance`): L1/L2 norm, BatchNorm
  gamma, Taylor or random scores per removable unit;
* selection (:mod:`~torchslim.prune.structured.selection`): a ratio (global or per
  layer) or a MACs / parameter target, channel counts rounded to a multiple;
* surgery (:mod:`~torchslim.prune.structured.surgery`): per-layer-type functions that
  rebuild layers with fewer channels.

:func:`prune_channels` ties them together, returns the pruned model with a report
(:class:`ChannelPruningResult`), and records what it removed as JSON
(:mod:`~torchslim.prune.structured.history`) so the pruned model saves without pickle.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.prune.structured import ChannelPruning, prune_channels
    >>> model = ts.models.create("fmnist_student", width=8, fc=16)
    >>> result = prune_channels(model, torch.randn(1, 1, 28, 28), ChannelPruning(ratio=0.5))
    >>> result.model.features[0].out_channels, result.report.macs_after < result.report.macs_before
    (4, True)
"""

from torchslim.prune.structured.api import (
    ChannelPruning,
    ChannelPruningResult,
    PruningReport,
    check_channel_names,
    finetune,
    prune_channels,
)
from torchslim.prune.structured.graph import (
    ChannelBuilder,
    ChannelGroup,
    DependencyGraph,
    FrozenGroup,
    Tracked,
    Unsupported,
    build_dependency_graph,
    passthrough,
    per_channel_layer,
    register_channel_rule,
)
from torchslim.prune.structured.history import HISTORY_ATTR, check_history, get_history, replay_history_
from torchslim.prune.structured.importance import unit_scores
from torchslim.prune.structured.modules import PrunedMultiheadAttention
from torchslim.prune.structured.surgery import SURGERY, apply_ops_, masked_reference, register_surgery

__all__ = [
    "HISTORY_ATTR",
    "SURGERY",
    "ChannelBuilder",
    "ChannelGroup",
    "ChannelPruning",
    "ChannelPruningResult",
    "DependencyGraph",
    "FrozenGroup",
    "PrunedMultiheadAttention",
    "PruningReport",
    "Tracked",
    "Unsupported",
    "apply_ops_",
    "build_dependency_graph",
    "check_channel_names",
    "check_history",
    "finetune",
    "get_history",
    "masked_reference",
    "passthrough",
    "per_channel_layer",
    "prune_channels",
    "register_channel_rule",
    "register_surgery",
    "replay_history_",
    "unit_scores",
]
