"""Atomic files and training checkpoints.

Every file torchslim writes goes to a temporary file in the same directory and
is renamed into place, so a crash (even SIGKILL) leaves either the old file or
the new one, never half of one. Checkpoints are read with
``torch.load(weights_only=True)``: tensors and plain containers only, no pickle
of arbitrary objects.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from torchslim.errors import TrainingError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


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
