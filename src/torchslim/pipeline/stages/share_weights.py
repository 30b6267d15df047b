"""``share_weights``: Deep Compression's trained quantization, optionally with centroid fine-tuning.

The method is the library's :class:`~torchslim.quant.sharing.WeightSharing`
unchanged. With ``train``, the centroids are fine-tuned through ``ctx.fit`` (the
pipeline's one training path: checkpoints, resume, DDP, distillation from
``teacher``): while the stage trains, each shared layer's parameter is its
codebook, so a centroid's gradient is the sum of its weights' gradients and
pruned weights stay zero. The output is finalized (plain weights, masks back as
masks), so it is stored and reloaded like any model.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn
from pydantic import Field, model_validator

from torchslim.distill import DistillConfig, check_distill_layers
from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.quant.sharing import WeightSharing, check_sharing, finalize_sharing_, share_weights_, sharing_summary
from torchslim.train import TrainConfig


class ShareWeightsStage(StageConfig):
    """Weight sharing of the input model.

    Attributes:
        method: layers, bits and k-means options (:class:`~torchslim.quant.sharing.WeightSharing`).
        train: fine-tune the centroids (optimizer, schedule, epochs); None: k-means only.
        teacher: distill from this model while fine-tuning (a ``models`` name or stage id,
            usually the float model before sharing).
        objective: the distillation objective when ``teacher`` is set.
    """

    kind: Literal["share_weights"] = "share_weights"
    method: WeightSharing = Field(default_factory=WeightSharing)
    train: TrainConfig | None = None
    teacher: str | None = None
    objective: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _teacher_needs_training(self) -> "ShareWeightsStage":
        if self.teacher is not None and self.train is None:
            raise ValueError("'teacher' distills while the centroids are fine-tuned: add 'train'")
        return self

    def references(self) -> list[str]:
        return [self.teacher] if self.teacher else []


@register_stage
class ShareWeights(Stage):
    kind = "share_weights"
    Config = ShareWeightsStage

    @property
    def trains(self) -> bool:  # type: ignore[override]
        return self.config.train is not None

    def plan(self, ctx: Any, model: nn.Module) -> nn.Module:
        check_sharing(model, self.config.method)  # override/exclude names, a non-empty selection
        if self.config.teacher is not None:
            check_distill_layers(model, ctx.get(self.config.teacher).model, self.config.objective, ctx.example)
        return model

    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        c = self.config
        share_weights_(model, c.method)
        layers = sharing_summary(model)
        ctx.record({"stage": self.id, "event": "shared",
                    "layers": {k: {"bits": v["bits"], "centroids": v["centroids"]} for k, v in layers.items()}})
        records: list[dict[str, Any]] = []
        if c.train is not None:
            teacher = ctx.copy_of(c.teacher) if c.teacher else None
            records = ctx.fit(model, self.id, c.train, ctx.entry, seed=ctx.seed(self.id), teacher=teacher,
                              objective=c.objective)
        finalize_sharing_(model)
        report = {"layers": layers, "input": self.input_name, "teacher": c.teacher, "init": c.method.init,
                  "epochs": c.train.epochs if c.train is not None else 0}
        return StageResult(model, records, report)

    @classmethod
    def section(cls, report: dict[str, Any], rows: dict[str, dict[str, Any]], stage_id: str,
                records: list[dict[str, Any]]) -> list[str]:
        how = (f"centroids fine-tuned for {report['epochs']} epochs"
               + (f", distilling from `{report['teacher']}`" if report.get("teacher") else "")
               if report.get("epochs") else "k-means only (no fine-tuning)")
        out = [f"## Weight sharing: `{stage_id}`", "",
               f"Per-layer k-means ({report['init']} initialisation) on the surviving weights; {how}.", "",
               "| layer | bits | centroids used | surviving weights | weights |", "|---|---:|---:|---:|---:|"]
        out += [f"| `{name}` | {v['bits']} | {v['centroids']} | {v['kept']:,} | {v['weights']:,} |"
                for name, v in report["layers"].items()]
        mine, start = rows.get(stage_id), rows.get(report.get("input") or "")
        if mine is not None and start is not None:
            out += ["", f"Against its input (`{report['input']}`): "
                    f"{100 * (mine['accuracy'] - start['accuracy']):+.2f} points."]
        return out + [""]
