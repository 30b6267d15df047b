"""The run context: what every stage shares, built once per run.

Data splits and their fingerprint, device and distributed group, the store,
the run folder, metric loggers, the models produced so far and the metrics
records. Stages train through :meth:`RunContext.fit`, the one training path
of the pipeline (plain or distilling from a teacher), so that every stage
checkpoints, logs and resumes the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from torchslim.distill import DistillConfig, DistillObjective
from torchslim.distill.kd import prepare_teacher_cache
from torchslim.errors import ConfigError
from torchslim.pipeline.rundir import RunDir
from torchslim.pipeline.store import Store, StoreEntry, content_key
from torchslim.train import TrainConfig, fit
from torchslim.train.distributed import barrier, broadcast_object


def log(message: str) -> None:
    """One line on stderr (rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[torchslim] {message}", file=sys.stderr, flush=True)


def data_fingerprint(splits: Any) -> str:
    """A hash of every split's tensors: two runs on the same data share stored outputs."""
    h = hashlib.sha256()
    for split in (splits.train, splits.val, splits.test):
        for tensor in (split.x, split.y):
            t = tensor.detach().contiguous().cpu()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclasses.dataclass
class Output:
    """A model the run has: from the ``models`` section or a finished stage."""

    model: nn.Module
    key: str
    label: str
    file: Path | None = None  # its .slim file (for bytes on disk), if any
    stage: Any = None  # the stage that produced it (None for the models section)
    weights: bool = False  # a models entry loaded from a weights file


class RunContext:
    """Shared state of one run (see the module docstring).

    Args:
        recipe: the validated v2 recipe.
        run: the run folder.
        store: where stage outputs are kept.
        splits: the dataset.
        device: where models train.
        dist: the distributed context.
        progress: progress bars (None: on a terminal).
        logger: extra metric logger (TensorBoard, MLflow), or None.
    """

    def __init__(self, recipe: Any, run: RunDir, store: Store, splits: Any, device: torch.device, dist: Any,
                 progress: bool | None = None, logger: Any = None):
        self.recipe, self.run, self.store, self.splits = recipe, run, store, splits
        self.device, self.dist, self.progress, self.logger = device, dist, progress, logger
        self.data_key = content_key(data_fingerprint(splits), recipe.data.model_dump(mode="json"))
        self.outputs: dict[str, Output] = {}
        self.entry: StoreEntry | None = None  # the running stage's store entry
        self.records: list[dict[str, Any]] = []  # finished stages' records, in stage order
        self.live: list[dict[str, Any]] = []  # the running stage's records so far

    # ------------------------------------------------------------ identities
    def seed(self, stage_id: str) -> int:
        """The seed of a stage, derived from the recipe's seed and the stage's id (not its position)."""
        digest = hashlib.sha256(f"{self.recipe.seed}:{stage_id}".encode()).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF

    def get(self, name: str) -> Output:
        """A model of the run by name (``models`` entry or stage id)."""
        if name not in self.outputs:
            raise ConfigError(f"no model or earlier stage named {name!r}; known: {', '.join(self.outputs)}")
        return self.outputs[name]

    def copy_of(self, name: str) -> nn.Module:
        """A private copy of a model of the run, on the run's device."""
        return copy.deepcopy(self.get(name).model).to(self.device)

    @property
    def example(self) -> torch.Tensor:
        """Two training inputs on the device (shape checks, hint adapters)."""
        return self.splits.train.x[:2].to(self.device)

    # ------------------------------------------------------------ records
    def record(self, record: dict[str, Any]) -> None:
        """Add a record of the running stage (an event or an epoch) and rewrite ``metrics.jsonl``."""
        self.live.append(record)
        self._write()

    def commit(self, records: list[dict[str, Any]]) -> None:
        """The running stage finished with ``records``: they replace its live ones."""
        self.records.extend(records)
        self.live = []
        self._write()

    def _write(self) -> None:
        if self.dist.is_main:
            self.run.write_metrics(self.records + self.live)

    # ------------------------------------------------------------ training
    def teacher_cache(self, teacher: nn.Module, config: DistillConfig, train_config: TrainConfig) -> Any:
        """The teacher's cached outputs (built once per teacher and data, kept in the store), or None."""
        def build() -> Any:
            return prepare_teacher_cache(teacher, self.splits.train, config, train_config,
                                         cache_dir=self.store.cache_dir, log=log)

        if self.dist.world_size == 1:
            return build()
        cache = build() if self.dist.is_main else None  # rank 0 writes the file, the others read it
        barrier(self.dist)
        return cache if self.dist.is_main else build()

    def fit(self, model: nn.Module, name: str, config: TrainConfig, entry: StoreEntry, *, seed: int,
            teacher: nn.Module | None = None, objective: DistillConfig | None = None, cache: Any = "build",
            on_step_end: Callable[[int], None] | None = None,
            on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Train ``model`` in place: labels only, or distilling from ``teacher`` with ``objective``.

        Checkpoints go to the stage's store entry (``work/<name>.pt``), so a killed
        run resumes inside the epoch it was in; every epoch's record reaches
        ``metrics.jsonl`` as it is written. Returns the records (the checkpoint's
        history included, so a resumed stage returns all of them).
        """
        also = on_epoch_end

        def epoch_end(record: dict[str, Any]) -> None:
            self.live = [r for r in self.live if not (r.get("stage") == name and r.get("epoch", 0) >= record["epoch"])]
            self.record(record)
            if also is not None:
                also(record)

        kwargs = dict(val=self.splits.val, seed=seed, device=self.device, precision=self.recipe.precision,
                      checkpoint_path=entry.work / f"{name}.pt", stage=name, on_epoch_end=epoch_end,
                      on_step_end=on_step_end, progress=self.progress, dist=self.dist, logger=self.logger)
        if teacher is None:
            history = fit(model, self.splits.train, config, **kwargs)
        else:
            objective = objective or DistillConfig()
            teacher.eval()
            if cache == "build":
                cache = self.teacher_cache(teacher, objective, config)
            with DistillObjective(model, teacher, objective, example=self.example, teacher_cache=cache,
                                  label_smoothing=config.label_smoothing) as loss:
                history = fit(model, self.splits.train, config, objective=loss, **kwargs)
            for record in history:
                record["teacher_outputs"] = loss.teacher_outputs
        # The checkpoint's history is the whole truth: it replaces what was logged live.
        self.live = [r for r in self.live if r.get("stage") != name] + history
        self._write()
        return history

    def done(self, entry: StoreEntry) -> bool:
        """Whether a stage's output is stored; rank 0 decides, so every rank takes the same path."""
        return bool(broadcast_object(entry.is_done(), self.dist))
