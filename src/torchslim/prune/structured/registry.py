"""Rule tables: how the dependency graph treats each module type, function and method.

Filled by decorators beside the rules (:mod:`torchslim.prune.structured.rules`),
the way :data:`~torchslim.prune.structured.SURGERY` is filled by
:func:`~torchslim.prune.structured.register_surgery`. A user adds a layer type
with :func:`register_channel_rule`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch.fx as fx
import torch.nn as nn

if TYPE_CHECKING:
    from torchslim.prune.structured.coupling import ChannelBuilder

ModuleRule = Callable[["ChannelBuilder", fx.Node, nn.Module], Any]
NodeRule = Callable[["ChannelBuilder", fx.Node], Any]

#: module type -> channel rule; looked up along the module's class hierarchy.
CHANNEL_RULES: dict[type, ModuleRule] = {}
#: function (``torch.cat``, ``operator.add``, ...) -> rule for ``call_function`` nodes.
FUNCTION_RULES: dict[Any, NodeRule] = {}
#: method name (``"view"``, ``"mean"``, ...) -> rule for ``call_method`` nodes.
METHOD_RULES: dict[str, NodeRule] = {}
#: functions and methods that combine their operands elementwise; a parameter used
#: only by these (``x * self.scale``) can be sliced with the channels it meets.
ELEMENTWISE_TARGETS: set[Any] = set()
_BUILTIN_RULE_TYPES: set[type] = set()


def register_channel_rule(module_type: type) -> Callable[[ModuleRule], ModuleRule]:
    """Decorator: register ``rule(builder, node, module)`` as the channel rule of ``module_type``.

    Mirrors :func:`~torchslim.prune.structured.register_surgery`: the rule tells the
    dependency graph how the layer reads and writes channels, surgery then cuts
    the slots the rule recorded. Layers of ``module_type`` (and subclasses without
    a rule of their own) are not traced into; without any rule such a layer is
    listed as unsupported and the channels around it are left unpruned. A layer
    of a user-registered type that the config excludes stays opaque.

    The rule returns what the layer's output carries (see :class:`ChannelBuilder`).
    For a layer with one parameter entry per channel,
    :func:`~torchslim.prune.structured.per_channel_layer` does all of it; for a
    channel-wise layer without parameters, :func:`~torchslim.prune.structured.passthrough`.

    Example:
        >>> import torch, torch.nn as nn
        >>> from torchslim.prune.structured import (ChannelPruning, per_channel_layer, prune_channels,
        ...                                         register_channel_rule, register_surgery)
        >>> class ChannelScale(nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.scale = nn.Parameter(torch.ones(n))
        ...     def forward(self, x):
        ...         return torch.einsum("nchw,c->nchw", x, self.scale)  # fx cannot see through einsum
        >>> @register_channel_rule(ChannelScale)
        ... def _scale_rule(b, node, m):
        ...     return per_channel_layer(b, node, m, dim=1, n_params=m.scale.numel())
        >>> @register_surgery(ChannelScale, "out", size=lambda m: m.scale.numel())
        ... def _scale_out(m, keep):
        ...     m.scale = nn.Parameter(m.scale.detach()[keep].clone())
        >>> model = nn.Sequential(nn.Conv2d(1, 8, 3), ChannelScale(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> small = prune_channels(model, torch.randn(1, 1, 8, 8), ChannelPruning(ratio=0.5)).model
        >>> small[1].scale.numel(), small[3].in_channels
        (4, 4)
    """
    def decorate(fn: ModuleRule) -> ModuleRule:
        CHANNEL_RULES[module_type] = fn
        _BUILTIN_RULE_TYPES.discard(module_type)  # a user's rule replaces ours, exclusion included
        return fn

    return decorate


def register_builtin_rule(*module_types: type) -> Callable[[ModuleRule], ModuleRule]:
    """:func:`register_channel_rule` for torchslim's own rules, which handle exclusion themselves."""
    def decorate(fn: ModuleRule) -> ModuleRule:
        for t in module_types:
            CHANNEL_RULES[t] = fn
            _BUILTIN_RULE_TYPES.add(t)
        return fn

    return decorate


def register_node_rule(*targets: Any, elementwise: bool = False) -> Callable[[NodeRule], NodeRule]:
    """Decorator: ``rule(builder, node)`` handles these functions (and method names, as strings)."""
    def decorate(fn: NodeRule) -> NodeRule:
        for t in targets:
            (METHOD_RULES if isinstance(t, str) else FUNCTION_RULES)[t] = fn
            if elementwise:
                ELEMENTWISE_TARGETS.add(t)
        return fn

    return decorate


def module_rule(module: nn.Module) -> tuple[ModuleRule | None, bool]:
    """The rule for ``module`` (nearest class in its hierarchy) and whether it is torchslim's own."""
    for cls in type(module).__mro__:
        if cls in CHANNEL_RULES:
            return CHANNEL_RULES[cls], cls in _BUILTIN_RULE_TYPES
    return None, False
