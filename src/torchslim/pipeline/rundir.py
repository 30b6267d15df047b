"""The run folder: where a run keeps its recipe, metrics, models and report.

Layout::

    RUN_DIR/
      recipe.yaml          the resolved v2 recipe, train sections as given (what --resume reads)
      metrics.jsonl        one JSON record per epoch / event, in stage order, rewritten atomically
      models/<id>.slim     the model each stage produced (linked from the store)
      model.slim           the final model (masks finalized, sparse weights stored sparsely)
      model.onnx           the final model in ONNX
      report.md            before/after table and one section per stage
      summary.json         the report's numbers, machine-readable
      plots/               training_curves.png, per-stage plots
      store/               stage outputs by content key, with their checkpoints (unless --store DIR)
      logs/                TensorBoard / MLflow files when the recipe's ``loggers`` asks for them
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from torchslim.atomic import atomic_write_text
from torchslim.errors import ConfigError


class RunDir:
    """Paths and atomic writers of one run folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def create(cls, out: str | os.PathLike | None, name: str) -> "RunDir":
        """A new, empty run folder (``out``, or ``runs/<name>-<timestamp>``); fails early if unwritable."""
        root = Path(out) if out is not None else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if root.exists() and not root.is_dir():
            raise ConfigError(f"output folder {root} is a file; choose another --out")
        if root.exists() and any(root.iterdir()):
            raise ConfigError(
                f"output folder {root} is not empty; choose another --out, or continue it with "
                f"'torchslim run --resume {root}'"
            )
        run = cls(root)
        run._created = not root.exists()
        run.check_writable()
        return run

    @classmethod
    def open_existing(cls, root: str | os.PathLike) -> "RunDir":
        """An existing run folder to resume; it must hold the resolved ``recipe.yaml``."""
        run = cls(root)
        if not run.recipe_path.is_file():
            raise ConfigError(f"{root} is not a torchslim run folder (no recipe.yaml); nothing to resume")
        run.check_writable()
        return run

    def check_writable(self) -> None:
        """Create the folder and prove a file can be written there, before any training starts."""
        try:
            for sub in ("", "models", "plots"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"x" * 4096)
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"cannot write to output folder {self.root}: {exc.strerror or exc}. "
                "Choose a writable folder with --out (and check free disk space)."
            ) from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process; a second process on the same folder is refused at once."""
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another torchslim process is running in {self.root}; wait for it to end "
                                  "(or stop it) before resuming this folder") from None
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def discard(self) -> None:
        """Remove a folder this run created and in which no stage ran (a retry may reuse its name)."""
        if getattr(self, "_created", False):
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for child in self.root.iterdir():  # a folder the user gave, empty before: empty again
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model(self, stage: str) -> Path:
        return self.root / "models" / f"{stage}.slim"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / name

    def write_recipe(self, text: str) -> None:
        atomic_write_text(self.recipe_path, text)

    def write_store_path(self, store: Path) -> None:
        """Remember a store outside the folder, so that ``--resume`` finds it."""
        atomic_write_text(self.root / "store.path", str(store.resolve()) + "\n")

    def store_path(self) -> Path | None:
        path = self.root / "store.path"
        return Path(path.read_text(encoding="utf-8").strip()) if path.is_file() else None

    def read_metrics(self) -> list[dict[str, Any]]:
        """The metrics records written so far (empty for a new run)."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` atomically (a killed run never leaves half a line)."""
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in records))

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.root / name, json.dumps(data, indent=2) + "\n")
