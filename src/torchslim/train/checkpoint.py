"""Atomic files and training checkpoints.

Every file torchslim writes goes to a temporary file in the same directory and
is renamed into place, so a crash (even SIGKILL) leaves either the old file or
the new one, never half of one. Checkpoints are read with
``torch.load(weights_only=True)``: tensors and plain containers only, no pickle
of arbitrary objects.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from torchslim.atomic import atomic_path, atomic_write_text, atomic_write_with  # noqa: F401  (re-exported)
from torchslim.errors import TrainingError


def model_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    """Names and shapes of a model's state, to recognise a checkpoint from another model."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a checkpoint dict (tensors, numbers, strings, lists, dicts) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Load a checkpoint safely; check it belongs to ``model`` when one is given."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"cannot read checkpoint {path}: {exc}. Delete it to restart the stage.") from exc
    if model is not None:
        expected = model_signature(model)
        found = state.get("signature")
        if found != expected:
            diff = sorted(set(map(str, expected.items())) ^ set(map(str, (found or {}).items())))[:4]
            raise TrainingError(
                f"checkpoint {path} was written for another model (state names/shapes differ, e.g. {diff}); "
                "resume with the recipe that wrote it, or delete the checkpoint to restart the stage"
            )
    return state
