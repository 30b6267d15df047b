"""The training loop (``fit``), evaluation, checkpoints, atomic files and metric loggers."""

from torchslim.train.checkpoint import (
    atomic_path,
    atomic_write_text,
    atomic_write_with,
    load_checkpoint,
    save_checkpoint,
)
from torchslim.train.config import TrainConfig
from torchslim.train.loggers import (
    FanOutLogger,
    JsonlLogger,
    LoggerConfig,
    MetricLogger,
    MLflowLogger,
    TensorBoardLogger,
    make_logger,
)
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
    "FanOutLogger",
    "JsonlLogger",
    "LoggerConfig",
    "MLflowLogger",
    "MetricLogger",
    "Objective",
    "TensorBoardLogger",
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
    "make_logger",
    "save_checkpoint",
]
