"""The transform log: what was done to a model's architecture, as ordered JSON records.

A model rebuilt from its spec (or a fresh instance of the user's class) has the
*original* architecture. The log says, in order, what turned it into the saved
one; :func:`torchslim.export.load` replays it before loading the weights::

    [{"type": "channels_removed", "ops": [{"target": "features.0", "role": "out",
                                            "size": 16, "removed": [3, 7]}, ...]},
     {"type": "masks", "layers": ["classifier.0.weight", "features.0.weight"]}]

Each record is a JSON dict with a ``"type"``. A registry maps type to the
functions that check and replay it; the package that owns a transform
registers it (``register_transform("channels_removed", replay=..., check=...)``
in :mod:`torchslim.prune.structured.history`). ``core`` imports nothing of
torchslim's, so a reader that meets a type nobody registered yet imports the
owner from :data:`_OWNERS`, a fixed table of our own modules: a module name is
never taken from a file.

The log of a model in memory is ``model.torchslim_transforms``
(:data:`TRANSFORMS_ATTR`): records that change the architecture, appended by
:func:`record_transform_`. Masks are state, not history (they come and go with
``finalize_``), so :func:`log_for_save` appends the ``masks`` record from the
model's current masks when it is saved.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from torchslim.core.masks import apply_mask_, is_masked, masked_tensors
from torchslim.errors import ModelError

TRANSFORMS_ATTR = "torchslim_transforms"
#: Attribute where structured pruning keeps its step list (one step = one
#: ``channels_removed`` record); read so that models pruned before the log existed
#: (and ``prune_channels``, which still writes it) save their channel removals.
LEGACY_HISTORY_ATTR = "torchslim_history"

Record = dict[str, Any]
Replay = Callable[[nn.Module, Record], None]
Check = Callable[[Record], None]


@dataclass(frozen=True)
class TransformType:
    """A registered transform type: its name and the functions that check and replay a record."""

    name: str
    replay: Replay
    check: Check | None = None


_REGISTRY: dict[str, TransformType] = {}

# Type name -> the torchslim module that registers it when imported. Fixed here, so
# a file can only ever make us import one of these modules (never a name it holds).
_OWNERS: dict[str, str] = {
    "channels_removed": "torchslim.prune.structured.history",
}


def register_transform(name: str, *, replay: Replay, check: Check | None = None) -> TransformType:
    """Register (or replace) the replay function of a transform type.

    Args:
        name: the record's ``"type"``.
        replay: ``replay(model, record)`` changes ``model`` in place as the
            transform did; weights are loaded afterwards, so only shapes and
            structure matter. Raise :class:`~torchslim.errors.ModelError` when the
            record does not fit the model.
        check: ``check(record)`` validates the record's fields (types only) and
            raises :class:`~torchslim.errors.ModelError`; called before any replay.

    Returns:
        The registered :class:`TransformType`.
    """
    entry = TransformType(name, replay, check)
    _REGISTRY[name] = entry
    return entry


def get_transform(name: str) -> TransformType:
    """The registered transform type ``name``, importing its owner module if known.

    Raises:
        ModelError: the type is unknown (a file written by a newer torchslim).
    """
    if name not in _REGISTRY and name in _OWNERS:
        importlib.import_module(_OWNERS[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_OWNERS))
        raise ModelError(f"unknown transform type {name!r} (known: {', '.join(known)}); "
                         "was the file written by a newer torchslim?")
    return _REGISTRY[name]


def check_log(log: Any) -> list[Record]:
    """Validate a transform log: a list of dicts, each of a known type with valid fields.

    Raises:
        ModelError: naming the first malformed record.
    """
    if not isinstance(log, list):
        raise ModelError(f"transform log must be a list of records, got {type(log).__name__}")
    for i, record in enumerate(log):
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            raise ModelError(f"transform {i} must be a dict with a string 'type', got {record!r:.200}")
        entry = get_transform(record["type"])
        if entry.check is not None:
            try:
                entry.check(record)
            except ModelError as exc:
                raise ModelError(f"transform {i} ({record['type']}) is malformed: {exc}") from None
    return log


def replay_(model: nn.Module, log: list[Record]) -> None:
    """Replay a transform log on ``model`` in place, in order.

    Afterwards ``model.torchslim_transforms`` holds the log's architecture records
    (every record but ``masks``), so saving the model again writes the same log.

    Raises:
        ModelError: a record is malformed or does not fit the model (naming it).
    """
    check_log(log)
    for i, record in enumerate(log):
        try:
            get_transform(record["type"]).replay(model, record)
        except ModelError as exc:
            raise ModelError(f"cannot replay transform {i} ({record['type']}): {exc}") from None
    setattr(model, TRANSFORMS_ATTR, [dict(r) for r in log if r["type"] != "masks"])


def get_transforms(model: nn.Module) -> list[Record]:
    """The architecture transforms recorded on ``model`` (empty for an untouched model)."""
    return [dict(r) for r in (getattr(model, TRANSFORMS_ATTR, None) or [])]


def channels_removed(model: nn.Module) -> bool:
    """True when channels of ``model`` were removed (``prune_channels``, or a loaded model whose log says so)."""
    return bool(getattr(model, LEGACY_HISTORY_ATTR, None)) or any(
        r.get("type") == "channels_removed" for r in get_transforms(model))


def record_transform_(model: nn.Module, record: Record) -> None:
    """Append one transform record to ``model``'s log (after the transform was applied).

    Raises:
        ModelError: the record has no string ``type``.
    """
    if not isinstance(record, dict) or not isinstance(record.get("type"), str):
        raise ModelError(f"a transform record must be a dict with a string 'type', got {record!r:.200}")
    setattr(model, TRANSFORMS_ATTR, get_transforms(model) + [dict(record)])


def _with_legacy_history(model: nn.Module, log: list[Record]) -> list[Record]:
    """``log`` plus the channel-pruning steps in ``torchslim_history`` it does not hold yet.

    ``prune_channels`` appends its steps to ``torchslim_history``; the log holds the
    first ones when the model was loaded (or recorded them). Steps beyond those are
    newer and go at the end, in order.
    """
    history = list(getattr(model, LEGACY_HISTORY_ATTR, None) or [])
    recorded = [r for r in log if r["type"] == "channels_removed"]
    if len(history) <= len(recorded):
        return log
    for step, record in zip(history, recorded):
        if step.get("ops") != record.get("ops"):
            raise ModelError("the model's torchslim_history and torchslim_transforms disagree on channel removal; "
                             "cannot tell which channels were removed")
    return log + [{"type": "channels_removed", "ops": step["ops"]} for step in history[len(recorded):]]


def log_for_save(model: nn.Module) -> list[Record]:
    """The log to store with ``model``: its architecture records, then its current masks.

    Raises:
        ModelError: the recorded log is malformed.
    """
    log = _with_legacy_history(model, get_transforms(model))
    masked = sorted({name for name, _, _ in masked_tensors(model)})
    if masked:
        log.append({"type": "masks", "layers": masked})
    return check_log(log)


def masked_names(log: list[Record]) -> list[str]:
    """Every tensor name a ``masks`` record of ``log`` lists, sorted."""
    return sorted({name for r in log if r["type"] == "masks" for name in r["layers"]})


# --- the one type core owns: masks ------------------------------------------


def _check_masks(record: Record) -> None:
    layers = record.get("layers")
    if not isinstance(layers, list) or not all(isinstance(n, str) and n for n in layers):
        raise ModelError(f"'layers' must be a list of tensor names, got {layers!r:.200}")


def _replay_masks(model: nn.Module, record: Record) -> None:
    """Put an all-ones mask on each listed tensor; the loaded state dict sets the real mask."""
    for name in record["layers"]:
        prefix, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            raise ModelError(f"the model has no module {prefix!r} (for masked tensor {name!r})") from None
        if is_masked(module, attr):
            continue
        param = module._parameters.get(attr)
        if param is None:
            raise ModelError(f"masked tensor {name!r} is not a parameter of the model")
        apply_mask_(module, torch.ones_like(param), attr)


register_transform("masks", replay=_replay_masks, check=_check_masks)
