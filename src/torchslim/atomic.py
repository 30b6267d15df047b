"""Atomic file writes: write beside the target, fsync, then ``os.replace``.

A crash or an exception part way through never leaves a half-written file
under the target name: readers see the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator


def _temp_name(target: Path) -> Path:
    # Same directory as the target, so os.replace is a rename on one filesystem.
    # Hidden and marked .tmp so a leftover (after a hard kill) is easy to spot.
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp{target.suffix}")


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort (not every OS lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    For writers that insist on opening the file themselves (``torch.onnx.export``).
    The temporary file is removed if the block raises.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (the file is complete or untouched)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        # O_EXCL: never write through someone else's file; mode 0o666 lets the umask
        # decide permissions as for any ordinary file (mkstemp would force 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)  # atomic_path fsyncs before the rename


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the file it wrote onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
