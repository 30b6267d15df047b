"""Checks a pipeline runs before it trains: does a pruning config fit the model?

Every layer name and ``re:`` pattern in a config must match a layer of the
model, so a typo fails in seconds instead of silently pruning everything (or
nothing) after hours of training; an N:M pattern must fit every layer it prunes.
The verbs (``prune_``, :func:`~torchslim.prune.pruning_layers`, sensitivity, the
AGP hook, iterative pruning, ``prune_channels``) run the same checks themselves.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from torchslim.errors import ConfigError
from torchslim.prune.magnitude import MagnitudePruning, as_unstructured
from torchslim.prune.unstructured import UnstructuredPruning, check_unstructured_names, pruning_layers


def _unstructured(config: Any) -> UnstructuredPruning | None:
    if isinstance(config, MagnitudePruning):
        return as_unstructured(config)
    return config if isinstance(config, UnstructuredPruning) else None


def check_layer_names(model: nn.Module, config: Any, example_inputs: Any = None) -> None:
    """Raise when a layer name or pattern in ``config`` matches no layer of ``model``.

    * :class:`~torchslim.prune.UnstructuredPruning` / :class:`~torchslim.prune.MagnitudePruning`:
      ``include``, ``exclude`` and ``overrides`` against the layers of ``layer_types``;
    * :class:`~torchslim.prune.structured.ChannelPruning`: ``exclude`` against module and
      parameter names, ``overrides`` against the layers of the dependency graph when
      ``example_inputs`` are given (see :func:`~torchslim.prune.structured.check_channel_names`).

    Args:
        model: the model the config will be applied to.
        config: the pruning config.
        example_inputs: for ``ChannelPruning`` only (optional): a batch the model runs on.

    Raises:
        ConfigError: naming the config field and the pattern, and listing a few layers that exist;
            or a config this check does not know.

    Example:
        >>> import torchslim as ts
        >>> model = ts.models.create("lenet300_100")
        >>> check_layer_names(model, ts.UnstructuredPruning(exclude=["classifier.9"]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        torchslim.errors.ConfigError: exclude: 'classifier.9' matches no Linear/Conv2d layer ...: classifier.0, classifier.2, classifier.4.
    """
    unstructured = _unstructured(config)
    if unstructured is not None:
        check_unstructured_names(model, unstructured)
        return
    from torchslim.prune.structured import ChannelPruning, check_channel_names

    if isinstance(config, ChannelPruning):
        check_channel_names(model, example_inputs, config)
        return
    raise ConfigError(f"check_layer_names does not know {type(config).__name__}")


def check_pruning(model: nn.Module, config: Any, example_inputs: Any = None) -> None:
    """Every check of ``config`` against ``model`` that needs no training: names, selection and N:M.

    For ``UnstructuredPruning`` with ``n_m``, every pruned layer's input dimension must be a
    multiple of M (:func:`~torchslim.prune.check_n_m_divisible`); a selection that keeps no
    layer fails too. For ``ChannelPruning`` it is :func:`check_layer_names`.

    Raises:
        ConfigError: the first problem found, with what to change.
    """
    unstructured = _unstructured(config)
    if unstructured is None:
        check_layer_names(model, config, example_inputs)
    else:
        pruning_layers(model, unstructured)  # names, a non-empty selection, then N:M divisibility
