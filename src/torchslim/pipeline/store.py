"""The store of stage outputs, addressed by content.

A stage's output is kept under a key that hashes everything it depends on:
the stage's config, the keys of its inputs (models and teachers), the data
fingerprint and the torchslim version. A recipe edited after a run therefore
re-runs exactly the stages whose inputs changed, and two runs that share a
prefix (the same teacher, the same distilled student) share its outputs when
they share a store folder (``--store DIR``; default ``RUN_DIR/store``).

Layout of one entry (``STORE/<stage id>-<key[:16]>/``)::

    model.slim      the stage's output model (absent for stages that pass theirs through)
    result.json     records, report data and file list; written last: its presence means "done"
    files/          files the stage made for the run folder (sensitivity tables, ONNX, ...)
    work/           checkpoints of the stage while it runs (resumed from after a kill)

An entry is produced under an exclusive file lock, so two processes that need
the same output (two workers of a search) produce it once; the second waits
and reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from torchslim.atomic import atomic_write_text
from torchslim.errors import ConfigError


def content_key(*parts: Any) -> str:
    """SHA-256 of the JSON form of ``parts`` (dict keys sorted): the same inputs, the same key.

    Example:
        >>> content_key({"a": 1, "b": 2}) == content_key({"b": 2, "a": 1})
        True
    """
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (weights files are part of the keys of the models they hold)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StoreEntry:
    """One stage output in the store: its folder and its files."""

    def __init__(self, root: Path, key: str):
        self.root, self.key = root, key

    @property
    def model_path(self) -> Path:
        return self.root / "model.slim"

    @property
    def result_path(self) -> Path:
        return self.root / "result.json"

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def work(self) -> Path:
        """Scratch folder for checkpoints while the stage runs."""
        path = self.root / "work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def is_done(self) -> bool:
        return self.result_path.is_file()

    def read_result(self) -> dict[str, Any]:
        try:
            result = json.loads(self.result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"stored stage output {self.result_path} is damaged ({exc}); delete the folder "
                              f"{self.root} and resume to run that stage again") from None
        if not isinstance(result, dict) or result.get("key") != self.key:
            raise ConfigError(f"stored stage output {self.result_path} does not belong to key {self.key[:16]}; "
                              f"delete the folder {self.root} and resume")
        return result

    def write_result(self, result: dict[str, Any]) -> None:
        """Write ``result.json`` atomically: the entry is done from this moment on."""
        atomic_write_text(self.result_path, json.dumps({**result, "key": self.key}, indent=1) + "\n")


class Store:
    """Stage outputs addressed by content key, in one folder (shareable between runs)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the store folder {self.root}: {exc.strerror or exc}") from None

    def entry(self, stage_id: str, key: str) -> StoreEntry:
        return StoreEntry(self.root / f"{stage_id}-{key[:16]}", key)

    @property
    def cache_dir(self) -> Path:
        """Where teacher-output caches live (fingerprinted, so runs sharing the store share them)."""
        return self.root / "cache"

    @contextlib.contextmanager
    def producing(self, entry: StoreEntry) -> Iterator[None]:
        """Hold the entry's lock while it is produced (another process waits, then finds it done)."""
        entry.root.mkdir(parents=True, exist_ok=True)
        with open(entry.root / ".lock", "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def place(self, source: Path, target: Path) -> None:
        """Put a stored file at ``target`` (a hard link when the filesystem allows, else a copy)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            if target.is_file() and os.path.samefile(source, target):
                return
            target.unlink()
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
