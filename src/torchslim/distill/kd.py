"""``distill()``: train a student against a frozen teacher with the one training loop."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
from pydantic import Field

from torchslim.config import Config
from torchslim.distill.losses import hinton_loss
from torchslim.errors import ModelError
from torchslim.train import TrainConfig, fit
from torchslim.train.loop import TensorSplit


class KDConfig(Config):
    """Hinton knowledge distillation.

    Attributes:
        temperature: T > 0, softens both distributions (typical 2–8).
        alpha: weight of the hard-label cross-entropy in [0, 1]; ``1 − alpha`` weighs the
            soft-target term. ``alpha=1`` is plain training, ``alpha=0`` pure distillation.

    Example:
        >>> import torchslim as ts
        >>> ts.KDConfig(temperature=4.0, alpha=0.1).alpha
        0.1
    """

    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.1, ge=0.0, le=1.0)


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put ``teacher`` in eval mode with no gradients (BatchNorm/dropout frozen)."""
    if teacher.training:
        warnings.warn("the teacher was in train mode; torchslim switched it to eval mode for distillation",
                      stacklevel=3)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class KDObjective:
    """Training objective: the student's Hinton loss against a frozen teacher's logits."""

    def __init__(self, teacher: nn.Module, config: KDConfig, label_smoothing: float = 0.0):
        self.teacher = freeze_teacher(teacher)
        self.config = config
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        student_logits = model(x)
        if teacher_logits.shape != student_logits.shape:
            raise ModelError(
                f"teacher outputs {tuple(teacher_logits.shape)} but student outputs {tuple(student_logits.shape)}: "
                "distillation needs both to predict the same classes (check num_classes)"
            )
        return student_logits, hinton_loss(student_logits, teacher_logits, y, self.config.temperature,
                                           self.config.alpha, self.label_smoothing)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: TensorSplit,
    config: KDConfig,
    train_config: TrainConfig | None = None,
    *,
    epochs: int | None = None,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Distill ``teacher`` into ``student`` in place; returns per-epoch records.

    Records carry ``train_loss`` (total), ``train_task_loss`` and ``train_kd_loss``.

    Args:
        student: trained in place.
        teacher: frozen (eval mode, no gradients) for the duration.
        train: training split with ``x`` and ``y``.
        config: temperature and alpha.
        train_config: optimizer, schedule and batch size (default ``TrainConfig()``).
        epochs: shorthand overriding ``train_config.epochs``.
        **fit_kwargs: passed to :func:`torchslim.train.fit` (``val=``, ``seed=``,
            ``checkpoint_path=``, ``device=``, ...).

    Example:
        See ``examples/distill_and_prune.py``.
    """
    train_config = train_config or TrainConfig()
    if epochs is not None:
        train_config = TrainConfig(**{**train_config.model_dump(), "epochs": epochs})
    objective = KDObjective(teacher, config, train_config.label_smoothing)
    return fit(student, train, train_config, objective=objective, stage=fit_kwargs.pop("stage", "distill"), **fit_kwargs)
