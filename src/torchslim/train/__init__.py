"""The training loop (``fit``), evaluation, checkpoints and atomic files."""

from torchslim.train.checkpoint import (
    atomic_path,
    atomic_write_text,
    atomic_write_with,
    load_checkpoint,
    save_checkpoint,
)
from torchslim.train.config import TrainConfig
from torchslim.train.loop import (
    CrossEntropyObjective,
    DistContext,
    Objective,
    build_optimizer,
    build_scheduler,
    epoch_permutation,
    evaluate,
    fit,
)

__all__ = [
    "CrossEntropyObjective",
    "DistContext",
    "Objective",
    "TrainConfig",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_with",
    "build_optimizer",
    "build_scheduler",
    "epoch_permutation",
    "evaluate",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
]
