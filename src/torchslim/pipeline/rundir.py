"""The run folder: where a run keeps its recipe, metrics, checkpoints, models and report.

Layout::

    RUN_DIR/
      recipe.yaml          the fully resolved recipe (what --resume reads)
      metrics.jsonl        one JSON record per epoch / event, rewritten atomically
      checkpoints/         <stage>.pt, written atomically after every epoch
      models/              <stage>.slim, the model each stage produced (its "done" marker)
      model.slim           the final model (masks finalized, sparse weights stored sparsely)
      model.onnx           the final model in ONNX
      report.md            before/after table and per-stage details
      summary.json         the report's numbers, machine-readable
      plots/               training_curves.png, layer_sparsity.png
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from torchslim.errors import ConfigError
from torchslim.atomic import atomic_write_text


class RunDir:
    """Paths and atomic writers of one run folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def create(cls, out: str | os.PathLike | None, name: str) -> "RunDir":
        """A new, empty run folder (``out``, or ``runs/<name>-<timestamp>``); fails early if unwritable."""
        root = Path(out) if out is not None else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if root.exists() and any(root.iterdir()):
            raise ConfigError(
                f"output folder {root} is not empty; choose another --out, or continue it with "
                f"'torchslim run --resume {root}'"
            )
        run = cls(root)
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
            for sub in ("", "checkpoints", "models", "plots"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"x" * 4096)
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"cannot write to output folder {self.root}: {exc.strerror or exc}. "
                "Choose a writable folder with --out (and check free disk space)."
            ) from None

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def checkpoint(self, stage: str) -> Path:
        return self.root / "checkpoints" / f"{stage}.pt"

    def model(self, stage: str) -> Path:
        return self.root / "models" / f"{stage}.slim"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / name

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
