"""``evaluate``: accuracy on the test split, size and latency of the models of the run.

Every model is evaluated by the one evaluation function (:func:`torchslim.train.evaluate`);
latencies of all of them are timed pass by pass in alternation, so that the
ratios between rows hold on a busy machine.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import torch.nn as nn
from pydantic import Field

from torchslim import measure as ts_measure
from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.train import evaluate


class EvaluateStage(StageConfig):
    """What to measure, and for which models.

    Attributes:
        models: names of the models to evaluate (``models`` entries and stage ids), in
            table order. Default: every model loaded from weights and every stage
            output so far, plus a model pruned as given.
        latency: measure CPU latency (median of passes after warm-up).
        latency_batch_sizes: batch sizes to time.
        latency_budget_s: seconds of timed passes per measurement (more is steadier).
    """

    kind: Literal["evaluate"] = "evaluate"
    models: list[str] | None = None
    latency: bool = True
    latency_batch_sizes: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [1, 256],
                                                                             min_length=1)
    latency_budget_s: float = Field(1.0, gt=0.0, le=60.0)

    def references(self) -> list[str]:
        return list(self.models or [])


@register_stage
class Evaluate(Stage):
    kind = "evaluate"
    Config = EvaluateStage
    produces_model = False

    def plan(self, ctx: Any, model: nn.Module) -> nn.Module:
        if self.config.models is not None:
            self.names = list(self.config.models)
        else:
            inputs = {o.stage.input_name for o in ctx.outputs.values() if o.stage is not None}
            self.names = [name for name, o in ctx.outputs.items()
                          if (o.stage is not None and o.stage.produces_model)
                          or (o.stage is None and (o.weights or (name in inputs and not _trained_from(ctx, name))))]
        for name in self.names:
            ctx.get(name)  # an unknown name fails now
        return model

    def inputs(self, ctx: Any) -> list[str]:
        return [self.input_name, *self.names]

    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        c, rows = self.config, []
        example = ctx.splits.test.x[:1]
        for name in self.names:
            out = ctx.get(name)
            accuracy = evaluate(out.model, ctx.splits.test, device=ctx.device, dist=ctx.dist)["accuracy"]
            if not ctx.dist.is_main:
                continue  # one process measures: latency timed beside other ranks would be wrong
            prof = ts_measure.profile(copy.deepcopy(out.model).cpu(), example, latency=False,
                                      file_bytes=out.file.stat().st_size if out.file else None)
            rows.append({"key": name, "model": out.label, "accuracy": accuracy, **prof.to_dict()})
        if rows and c.latency:
            models = {r["key"]: ctx.get(r["key"]).model for r in rows}
            for b in c.latency_batch_sizes:
                timed = ts_measure.compare_latency(models, example, b, budget_s=c.latency_budget_s)
                for r in rows:
                    r.setdefault("latency_ms", {})[str(b)] = timed[r["key"]]["median_ms"]
                    r.setdefault("latency_min_ms", {})[str(b)] = timed[r["key"]]["min_ms"]
        records = [{"stage": self.id, **r} for r in rows]
        return StageResult(model, records, {"rows": rows, "latency": c.latency}, produces_model=False)


def _trained_from(ctx: Any, name: str) -> bool:
    """Whether a stage that trains starts from ``name`` (then its untrained start is no row of its own)."""
    return any(o.stage is not None and o.stage.input_name == name and o.stage.trains for o in ctx.outputs.values())
