"""Atomic files and training checkpoints.

Every file torchslim writes goes to a temporary file in the same directory and
is renamed into place, so a crash (even SIGKILL) leaves either the old file or
the new one, never half of one. Checkpoints are read with
``torch.load(weights_only=True)``: tensors and plain containers only, no pickle
of arbitrary objects.

A checkpoint file is a one-line header and ``torch.save``'s bytes::

    TORCHSLIM-CHECKPOINT 1
    sha256 <64 hex digits> bytes <payload length>
    <payload: torch.save(state)>

The SHA-256 is checked on every load, so a bit flipped on disk is an error that
names the file, never a resumed run with silently wrong weights. Files without
the header (written before checksums) still load, unverified.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch

from torchslim.atomic import atomic_path, atomic_write_text, atomic_write_with  # noqa: F401  (re-exported)
from torchslim.errors import TrainingError

_MAGIC = b"TORCHSLIM-CHECKPOINT 1\n"
_RESTART = "Delete it to restart the stage."


def model_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    """Names and shapes of a model's state, to recognise a checkpoint from another model."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _is_disk_full(exc: BaseException) -> bool:
    # torch reports a failed write as RuntimeError ("... file write failed"), not OSError.
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and "no space left" in str(exc).lower()


def _write(fh: BinaryIO, chunks: tuple[bytes, ...]) -> None:
    for chunk in chunks:
        fh.write(chunk)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a checkpoint dict (tensors, numbers, strings, lists, dicts) atomically, with its SHA-256.

    Raises:
        TrainingError: the disk is full (or over quota); the message says where to free space.
            The previous checkpoint, if any, is left as it was.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = _MAGIC + f"sha256 {hashlib.sha256(payload).hexdigest()} bytes {len(payload)}\n".encode()
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "xb") as fh:
                _write(fh, (header, payload))
    except (OSError, RuntimeError) as exc:
        if not _is_disk_full(exc):
            raise
        raise TrainingError(
            f"no space left on device while writing checkpoint {path} ({len(payload) / 1e6:.1f} MB): free space "
            f"on the disk holding {path.parent} (old run folders, teacher caches, ~/.cache/torchslim) or move the "
            "run folder to a larger disk, then run again: training resumes from the last checkpoint written"
        ) from exc


def _payload(path: Path, data: bytes) -> bytes:
    """The ``torch.save`` bytes of a checkpoint file, checked against its header."""
    if not data:
        raise TrainingError(f"checkpoint {path} is empty (0 bytes): it was cut off while being written "
                            f"(a full disk, or a copy that did not finish). {_RESTART}")
    if not data.startswith(_MAGIC):
        return data  # written before checksums: nothing to verify against
    end = data.find(b"\n", len(_MAGIC))
    fields = data[len(_MAGIC):end].decode("ascii", "replace").split() if end >= 0 else []
    if len(fields) != 4 or fields[0] != "sha256" or fields[2] != "bytes" or not fields[3].isdigit():
        raise TrainingError(f"checkpoint {path} has a damaged header (no checksum line can be read). {_RESTART}")
    payload = data[end + 1:]
    if len(payload) != int(fields[3]):
        raise TrainingError(f"checkpoint {path} is truncated or has bytes added: it holds {len(payload)} bytes "
                            f"of data, its header says {fields[3]}. {_RESTART}")
    if hashlib.sha256(payload).hexdigest() != fields[1]:
        raise TrainingError(f"checkpoint {path} is corrupt: its SHA-256 does not match the one written with it "
                            f"(the file changed on disk after it was written). {_RESTART}")
    return payload


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (checksum verified); check it belongs to ``model`` when one is given.

    Raises:
        TrainingError: the file cannot be read, is empty, truncated or corrupt (its SHA-256
            differs), or was written for another model; each message names the file and
            says to delete it to restart the stage.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrainingError(f"cannot read checkpoint {path}: {exc.strerror or exc}. {_RESTART}") from exc
    payload = _payload(path, data)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else f"{type(exc).__name__} with no message"
        raise TrainingError(f"cannot read checkpoint {path}: it is not a torch checkpoint or is damaged "
                            f"({detail}). {_RESTART}") from exc
    if not isinstance(state, dict):
        raise TrainingError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict. {_RESTART}")
    if model is not None:
        expected = model_signature(model)
        found = state.get("signature")
        if found != expected:
            found_items = found.items() if isinstance(found, dict) else [("signature", repr(found)[:40])]
            diff = sorted(set(map(str, expected.items())) ^ set(map(str, found_items)))[:4]
            raise TrainingError(
                f"checkpoint {path} was written for another model (state names/shapes differ, e.g. {diff}); "
                "resume with the recipe that wrote it, or delete the checkpoint to restart the stage"
            )
    return state
