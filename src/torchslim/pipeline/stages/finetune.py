"""``finetune``: train a (pruned) model further, distilling from a teacher or with labels only.

Masks stay fixed (pruned weights get no gradient), removed channels stay removed.
The teacher is usually the model before pruning (``teacher: <that stage's id>``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from torchslim.distill import DistillConfig
from torchslim.pipeline.stages.base import StageConfig, register_stage
from torchslim.pipeline.stages.distill import Distill
from torchslim.train import TrainConfig


class FinetuneStage(StageConfig):
    """Fine-tune the input model.

    Attributes:
        teacher: distill from this model (a ``models`` name or an earlier stage id; usually
            the model before pruning); None trains with labels only.
        objective: the distillation objective when ``teacher`` is set.
        train: optimizer, schedule and epochs.
    """

    kind: Literal["finetune"] = "finetune"
    teacher: str | None = None
    objective: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig

    def references(self) -> list[str]:
        return [self.teacher] if self.teacher else []


@register_stage
class Finetune(Distill):
    kind = "finetune"
    Config = FinetuneStage

    @classmethod
    def section(cls, report: dict[str, Any], rows: dict[str, dict[str, Any]], stage_id: str,
                records: list[dict[str, Any]]) -> list[str]:
        how = f"distilling from `{report['teacher']}`" if report.get("teacher") else "with labels only"
        out = [f"## Fine-tuning: `{stage_id}`", "", f"{report['epochs']} epochs {how}."]
        mine, start = rows.get(stage_id), rows.get(report.get("input") or "")
        if mine is not None and start is not None:
            change = mine["accuracy"] - start["accuracy"]
            out.append(f"Against its start (`{report['input']}`): {100 * change:+.2f} points.")
            if change < 0:
                out.append(f"**Fine-tuning made this model worse**: {100 * mine['accuracy']:.2f}% against "
                           f"{100 * start['accuracy']:.2f}% before it.")
        return out + [""]
