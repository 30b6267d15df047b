"""``train``: train the input model with labels only (a teacher from scratch, a student baseline)."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn

from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.train import TrainConfig


class TrainStage(StageConfig):
    """Train with labels only.

    Attributes:
        train: optimizer, schedule, epochs (:class:`~torchslim.train.TrainConfig`).
    """

    kind: Literal["train"] = "train"
    train: TrainConfig


@register_stage
class Train(Stage):
    kind = "train"
    Config = TrainStage
    trains = True

    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        records = ctx.fit(model, self.id, self.config.train, ctx.entry, seed=ctx.seed(self.id))
        return StageResult(model, records, {"epochs": self.config.train.epochs})
