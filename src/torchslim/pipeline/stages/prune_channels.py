"""``prune_channels``: structured pruning; channels, neurons and heads physically removed.

The method is the library's :class:`~torchslim.prune.structured.ChannelPruning`
unchanged. With ``steps`` > 1 and ``between_steps`` set, the model is
fine-tuned after every step but the last (distilling from ``teacher`` when set);
fine-tuning after the last step is a ``finetune`` stage.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch.nn as nn
from pydantic import Field, model_validator

from torchslim.distill import DistillConfig, check_distill_layers
from torchslim.pipeline.formatting import human_count
from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.prune.structured import ChannelPruning, build_dependency_graph, prune_channels
from torchslim.train import TrainConfig


class PruneChannelsStage(StageConfig):
    """Remove channels from the input model.

    Attributes:
        method: what to remove and how (:class:`~torchslim.prune.structured.ChannelPruning`).
        between_steps: training after every step but the last (with ``method.steps`` >= 2).
        teacher: distill from this model during ``between_steps`` (a ``models`` name or stage id).
        objective: the distillation objective when ``teacher`` is set.
    """

    kind: Literal["prune_channels"] = "prune_channels"
    method: ChannelPruning = Field(default_factory=ChannelPruning)
    between_steps: TrainConfig | None = None
    teacher: str | None = None
    objective: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _between_needs_steps(self) -> "PruneChannelsStage":
        if self.between_steps is not None and self.method.steps < 2:
            raise ValueError("between_steps trains between pruning steps: set method.steps >= 2")
        return self

    def references(self) -> list[str]:
        return [self.teacher] if self.teacher else []


@register_stage
class PruneChannels(Stage):
    kind = "prune_channels"
    Config = PruneChannelsStage

    def plan(self, ctx: Any, model: nn.Module) -> nn.Module:
        # Traces the model now: an untraceable model fails here, before any stage trains.
        from torchslim.prune.structured import check_channel_names  # noqa: PLC0415

        build_dependency_graph(model, ctx.splits.train.x[:1].to(ctx.example.device), exclude=self.config.method.exclude)
        check_channel_names(model, ctx.splits.train.x[:1].to(ctx.example.device), self.config.method)
        if self.config.teacher is not None:
            check_distill_layers(model, ctx.get(self.config.teacher).model, self.config.objective, ctx.example)
        return model

    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        c, steps, done = self.config, self.config.method.steps, [0]
        teacher = ctx.copy_of(c.teacher) if c.teacher else None

        def between(m: nn.Module) -> None:
            done[0] += 1
            if c.between_steps is not None and done[0] < steps:  # a finetune stage trains after the last step
                name = f"{self.id}_step{done[0]}"
                ctx.fit(m, name, c.between_steps, ctx.entry, seed=ctx.seed(name), teacher=teacher,
                        objective=c.objective)

        data = ctx.splits.train if c.method.importance == "taylor" else None
        result = prune_channels(model, ctx.splits.train.x[:1].to(ctx.device), c.method, data, finetune=between)
        report = json.loads(json.dumps(result.report.to_dict(), default=str))
        ctx.record({"stage": self.id, "event": "channels_removed", **report})
        return StageResult(result.model, [], {"config": c.method.to_dict(), "report": report, "input": self.input_name,
                                              "between_steps_epochs": c.between_steps.epochs if c.between_steps
                                              else 0})

    @classmethod
    def section(cls, report: dict[str, Any], rows: dict[str, dict[str, Any]], stage_id: str,
                records: list[dict[str, Any]]) -> list[str]:
        cfg, rep = report["config"], report.get("report", {})
        if cfg.get("target_macs") is not None:
            target = f"target: keep {100 * cfg['target_macs']:.0f}% of the MACs"
        elif cfg.get("target_params") is not None:
            target = f"target: {cfg['target_params']:,} parameters"
        else:
            target = f"ratio {cfg['ratio']} of the channels"
        line = (f"Channels removed physically (a smaller dense model, no masks): importance `{cfg['importance']}`, "
                f"{target}, {cfg['scope']} scope, {cfg['steps']} step{'s' if cfg['steps'] != 1 else ''}, "
                f"channel counts rounded to a multiple of {cfg['round_to']}")
        if report.get("between_steps_epochs"):
            line += f", {report['between_steps_epochs']} fine-tuning epochs between steps"
        out = [f"## Structured pruning: `{stage_id}`", "", line + "."]
        if rep:
            out.append(f"MACs {human_count(rep['macs_before'])} → {human_count(rep['macs_after'])} "
                       f"({rep['macs_before'] / max(rep['macs_after'], 1):.2f}× fewer), parameters "
                       f"{rep['params_before']:,} → {rep['params_after']:,} "
                       f"({rep['params_before'] / max(rep['params_after'], 1):.2f}× fewer)"
                       + ("" if rep.get("target_met", True) else "; **the target was not reached**") + ".")
        ref = rows.get(report.get("input") or "")
        # The latest evaluated descendant (fine-tuned if there is one) shows what the removal cost.
        pruned = rows.get(report.get("finetuned_by") or "") or rows.get(stage_id)
        if ref is not None and pruned is not None:
            out += _comparison(ref, pruned)
        if rep.get("unsupported"):
            out += ["", "Left unpruned because the dependency graph cannot see through them:"]
            out += [f"- {item}" for item in rep["unsupported"]]
        if rep.get("steps"):
            out += ["", "| step | MACs | params | channels removed |", "|---:|---:|---:|---|"]
            for st in rep["steps"]:
                removed = ", ".join(f"{k}: {v}" for k, v in st["removed"].items() if v) or "none"
                out.append(f"| {st['step']} | {human_count(st['macs'])} | {st['params']:,} | {removed} |")
        return out + [""]


def _comparison(ref: dict[str, Any], pruned: dict[str, Any]) -> list[str]:
    macs_ratio = pruned["macs"] / max(ref["macs"], 1)
    out = ["", f"| measure | `{ref['key']}` | `{pruned['key']}` | ratio |", "|---|---:|---:|---:|",
           f"| accuracy | {100 * ref['accuracy']:.2f}% | {100 * pruned['accuracy']:.2f}% | "
           f"{100 * (pruned['accuracy'] - ref['accuracy']):+.2f} points |",
           f"| MACs | {human_count(ref['macs'])} | {human_count(pruned['macs'])} | {macs_ratio:.3f} |",
           f"| params | {ref['params']:,} | {pruned['params']:,} | {pruned['params'] / max(ref['params'], 1):.3f} |",
           f"| bytes on disk | {ref['file_bytes']:,} | {pruned['file_bytes']:,} | "
           f"{pruned['file_bytes'] / max(ref['file_bytes'], 1):.3f} |"]
    # The fastest of the alternated passes: the best estimate of each model's own cost.
    fastest = "latency_min_ms" if "latency_min_ms" in ref else "latency_ms"
    for b, t in ref.get(fastest, {}).items():
        if b in pruned.get(fastest, {}):
            ratio = pruned[fastest][b] / t
            out.append(f"| fastest pass b={b} (ms) | {t:.3f} | {pruned[fastest][b]:.3f} | {ratio:.3f} "
                       f"({ratio / macs_ratio:.2f}× the MACs ratio) |")
    return out
