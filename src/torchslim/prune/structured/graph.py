"""The dependency graph: which channels of which layers must be removed together.

This module is the stable import path; the implementation is split by concern:

* :mod:`~torchslim.prune.structured.tracing`: the torch.fx tracer (:func:`trace`);
* :mod:`~torchslim.prune.structured.coupling`: channel variables, the union-find,
  :class:`ChannelGroup`, :class:`DependencyGraph` and :func:`build_dependency_graph`;
* :mod:`~torchslim.prune.structured.rules`: what each layer, function and method
  does to channels (conv, linear, norms, attention, elementwise, reshape, cat, ...);
* :mod:`~torchslim.prune.structured.registry`: the rule tables and
  :func:`register_channel_rule` for a layer type of your own;
* :mod:`~torchslim.prune.structured.cost`: the MACs and parameters left after a cut.
"""

from torchslim.prune.structured import rules  # noqa: F401  (fills the rule tables)
from torchslim.prune.structured.coupling import (
    ChannelBuilder,
    ChannelGroup,
    DependencyGraph,
    FrozenGroup,
    SlotKey,
    Tracked,
    UnionFind,
    Unsupported,
    build_dependency_graph,
)
from torchslim.prune.structured.registry import register_channel_rule
from torchslim.prune.structured.rules import passthrough, per_channel_layer
from torchslim.prune.structured.tracing import trace

__all__ = [
    "ChannelBuilder",
    "ChannelGroup",
    "DependencyGraph",
    "FrozenGroup",
    "SlotKey",
    "Tracked",
    "UnionFind",
    "Unsupported",
    "build_dependency_graph",
    "passthrough",
    "per_channel_layer",
    "register_channel_rule",
    "trace",
]
