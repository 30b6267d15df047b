"""The pruning verb: ``prune_(model, config, data)`` dispatches on the config's type.

A plain dict maps each config type to its private handler, filled by the
:func:`register_pruning_handler` decorator next to the handler.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from torchslim.config import Config
from torchslim.errors import ConfigError

_HANDLERS: dict[type[Config], Callable[..., None]] = {}


def register_pruning_handler(config_type: type[Config]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Make the decorated ``handler(model, config, data, objective, context)`` apply ``config_type``."""
    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        _HANDLERS[config_type] = fn
        return fn

    return decorate


def prune_(model: nn.Module, config: Config, data: Any = None, *, objective: Any = None, context: Any = None) -> None:
    """Prune ``model`` in place with masks, as ``config`` says.

    The masked model keeps training normally (pruned weights stay exactly zero,
    whatever the optimizer's momentum or weight decay); call
    :func:`torchslim.prune.finalize_` to make the zeros permanent. Pruning a
    model that already has masks updates them in place and never brings back
    a removed weight.

    Args:
        model: the model, changed in place.
        config: :class:`~torchslim.prune.UnstructuredPruning` or
            :class:`~torchslim.prune.MagnitudePruning`.
        data: a split with ``x`` and ``y`` tensors; needed by gradient criteria
            (``taylor``, ``snip``), ignored by the others.
        objective: ``objective(model, x, y) -> (logits, {"loss": ...})`` for gradient
            criteria (default cross-entropy), as in :func:`torchslim.train.fit`.
        context: a ready :class:`~torchslim.prune.ImportanceContext` (skips collecting one).

    Raises:
        ConfigError: no layer matches the selection, a gradient criterion without
            data, or an N:M pattern that does not fit a layer.

    Example:
        >>> import torchslim as ts
        >>> model = ts.models.create("lenet300_100")
        >>> ts.prune_(model, ts.prune.UnstructuredPruning(sparsity=0.9, exclude_first_last=True))
        >>> round(ts.prune.global_sparsity(model, ts.prune.masked_layers(model)), 3)
        0.9
    """
    handler = next((_HANDLERS[t] for t in type(config).__mro__ if t in _HANDLERS), None)
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in _HANDLERS))
        raise ConfigError(f"prune_ does not know how to apply {type(config).__name__}; known: {known}")
    handler(model, config, data, objective, context)
