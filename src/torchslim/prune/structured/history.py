"""Pruning history: what structured pruning removed, as JSON-able data.

A pruned model carries ``model.torchslim_history``, a list of steps::

    [{"ops": [{"target": "features.0", "role": "out", "size": 32, "removed": [3, 17]},
              {"target": "features.1", "role": "out", "size": 32, "removed": [3, 17]},
              {"target": "features.3", "role": "in",  "size": 32, "removed": [3, 17]}]},
     ...]

Indices are relative to the layer as it was at that step. Rebuilding the
unpruned architecture from its spec and replaying the steps in order gives
the pruned shapes, so a pruned model saves as a plain state dict plus this
history; nothing is pickled.

In a ``.slim`` file each step is one ``{"type": "channels_removed", "ops": [...]}``
record of the transform log (:mod:`torchslim.core.transforms`); this module
registers that type's check and replay, so ``export`` replays channel removal
without importing ``prune`` (core imports this module on first need).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from torchslim.core.transforms import register_transform
from torchslim.errors import ModelError
from torchslim.prune.structured.surgery import apply_ops_

HISTORY_ATTR = "torchslim_history"


def get_history(model: nn.Module) -> list[dict[str, Any]]:
    """The pruning history attached to ``model`` (empty for a model never channel-pruned)."""
    return list(getattr(model, HISTORY_ATTR, None) or [])


def check_history(history: Any) -> list[dict[str, Any]]:
    """Validate the structure of a history (types only; sizes are checked on replay).

    Raises:
        ModelError: naming the first malformed step or op.
    """
    if not isinstance(history, list):
        raise ModelError(f"pruning history must be a list of steps, got {type(history).__name__}")
    for s, step in enumerate(history):
        if not isinstance(step, dict) or not isinstance(step.get("ops"), list):
            raise ModelError(f"pruning history step {s} must be a dict with a list 'ops'")
        for o, op in enumerate(step["ops"]):
            if not _op_ok(op):
                raise ModelError(f"pruning history step {s}, op {o} is malformed: {op!r}")
    return history


def _op_ok(op: Any) -> bool:
    return (isinstance(op, dict) and isinstance(op.get("target"), str) and isinstance(op.get("role"), str)
            and type(op.get("size")) is int and isinstance(op.get("removed"), list)
            and all(type(i) is int for i in op["removed"]))


def replay_history_(model: nn.Module, history: list[dict[str, Any]]) -> None:
    """Apply a pruning history to an unpruned model of the same architecture, in place.

    The weights are whatever ``model`` holds, sliced; load the pruned weights
    afterwards. The history is attached to the model.

    Raises:
        ModelError: the history does not fit the model (a layer is missing or has another size).

    Example:
        >>> import torch, torchslim as ts
        >>> from torchslim.prune.structured import ChannelPruning, prune_channels
        >>> model = ts.models.create("fmnist_student", width=4, fc=8)
        >>> small = prune_channels(model, torch.randn(1, 1, 28, 28), ChannelPruning(ratio=0.5)).model
        >>> again = ts.models.create("fmnist_student", width=4, fc=8)
        >>> replay_history_(again, small.torchslim_history)
        >>> again.load_state_dict(small.state_dict())
        <All keys matched successfully>
    """
    check_history(history)
    for s, step in enumerate(history):
        try:
            apply_ops_(model, step["ops"])
        except ModelError as exc:
            raise ModelError(f"cannot replay pruning history step {s}: {exc}") from None
    setattr(model, HISTORY_ATTR, [dict(step) for step in history])


def history_to_transforms(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The transform-log records of a pruning history: one ``channels_removed`` record per step."""
    return [{"type": "channels_removed", "ops": list(step["ops"])} for step in check_history(history)]


def _check_channels_removed(record: dict[str, Any]) -> None:
    ops = record.get("ops")
    if not isinstance(ops, list):
        raise ModelError(f"'ops' must be a list, got {ops!r:.200}")
    for o, op in enumerate(ops):
        if not _op_ok(op):
            raise ModelError(f"op {o} is malformed: {op!r:.200}")


def _replay_channels_removed(model: nn.Module, record: dict[str, Any]) -> None:
    apply_ops_(model, record["ops"])
    # Keep torchslim_history in step, so prune_channels on the loaded model continues it.
    setattr(model, HISTORY_ATTR, get_history(model) + [{"ops": list(record["ops"])}])


register_transform("channels_removed", replay=_replay_channels_removed, check=_check_channels_removed)
