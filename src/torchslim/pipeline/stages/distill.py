"""``distill``: train the input model with a teacher's help (KD, DKD, hints, attention)."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn
from pydantic import Field

from torchslim.distill import DistillConfig, check_distill_layers
from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.train import TrainConfig

_NAMES = {"kd": "Hinton KD", "dkd": "Decoupled KD (DKD)", "hints": "FitNets hints", "attention": "attention transfer"}


class DistillStage(StageConfig):
    """Distill ``teacher`` into the input model.

    Attributes:
        teacher: the teacher: a name from ``models`` or an earlier stage's ``id``.
        objective: the distillation objective (:class:`~torchslim.distill.DistillConfig`:
            ``logits`` KD or DKD, ``hints``, ``attention``, ``teacher_outputs`` cached or online).
        train: optimizer, schedule and epochs.
        seed_of: train with the seed (so the batches) of another stage, e.g. the baseline
            trained alone, so that the comparison is fair.
        baseline: the stage that trained the same model alone, compared with in the report
            (default: the latest ``train`` stage with the same input).
    """

    kind: Literal["distill"] = "distill"
    teacher: str
    objective: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig
    seed_of: str | None = None
    baseline: str | None = None

    def references(self) -> list[str]:
        return [self.teacher] + [r for r in (self.seed_of, self.baseline) if r]


@register_stage
class Distill(Stage):
    kind = "distill"
    Config = DistillStage
    trains = True

    def teacher_name(self) -> str | None:
        return self.config.teacher

    def plan(self, ctx: Any, model: nn.Module) -> nn.Module:
        name = self.teacher_name()
        if name is None:
            return model
        # Layer names, class counts and hint shapes, on two real inputs.
        check_distill_layers(model, ctx.get(name).model, self.config.objective, ctx.example)
        if self.kind == "distill" and self.config.baseline is None:
            self.baseline = next((o.stage.id for o in reversed(list(ctx.outputs.values()))
                                  if o.stage is not None and o.stage.kind == "train"
                                  and o.stage.input_name == self.input_name), None)
        else:
            self.baseline = getattr(self.config, "baseline", None)
        return model

    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        name = self.teacher_name()
        teacher = ctx.copy_of(name) if name is not None else None
        seed = ctx.seed(getattr(self.config, "seed_of", None) or self.id)
        records = ctx.fit(model, self.id, self.config.train, ctx.entry, seed=seed, teacher=teacher,
                          objective=self.config.objective)
        report: dict[str, Any] = {"teacher": name, "epochs": self.config.train.epochs,
                                  "baseline": getattr(self, "baseline", None), "input": self.input_name}
        if teacher is not None:
            used = records[-1].get("teacher_outputs") if records else None
            report.update(self.config.objective.describe(), teacher_outputs_used=used)
        return StageResult(model, records, report)

    @classmethod
    def section(cls, report: dict[str, Any], rows: dict[str, dict[str, Any]], stage_id: str = "",
                records: list[dict[str, Any]] | None = None) -> list[str]:
        if report.get("teacher") is None:
            return []
        method = " + ".join(_NAMES.get(m, m) for m in report["method"].split("+"))
        line = f"{method} from `{report['teacher']}`, T = {report['temperature']}"
        if "alpha" in report:
            line += f", α = {report['alpha']} (weight of the label loss)"
        line += ", loss weights " + ", ".join(f"{k} {v:g}" for k, v in report["weights"].items())
        line += f"; {report['epochs']} epochs"
        if report.get("teacher_outputs_used"):
            line += f"; teacher outputs {report['teacher_outputs_used']}"
            line += " (computed once, reused every epoch)" if report["teacher_outputs_used"] == "cached" else \
                " (every batch)"
        out = [f"## Distillation: `{stage_id}`", "", line + "."]
        for key in ("hint_layers", "attention_layers"):
            if key in report:
                out.append(f"{'Hint' if key == 'hint_layers' else 'Attention'} pairs (student → teacher): "
                           + ", ".join(f"`{s}` → `{t}`" for s, t in report[key].items()) + ".")
        mine, base, teacher = rows.get(stage_id), rows.get(report.get("baseline") or ""), rows.get(report["teacher"])
        if mine is not None and base is not None:
            gain = mine["accuracy"] - base["accuracy"]
            out.append(f"Gain over the same model trained alone (`{report['baseline']}`) for the same epochs: "
                       f"{100 * gain:+.2f} points.")
            if gain < 0:
                out.append(f"**Distillation made this model worse**: {100 * mine['accuracy']:.2f}% against "
                           f"{100 * base['accuracy']:.2f}% trained alone.")
            if teacher is not None and teacher["accuracy"] > base["accuracy"]:
                gap = teacher["accuracy"] - base["accuracy"]
                out.append(f"Teacher–student gap recovered: {100 * gain / gap:.0f}%.")
        parts = loss_parts(records or [], stage_id)
        if parts:
            out += ["", f"Loss parts (first → last epoch; curves in `plots/{stage_id}_loss_parts.png`):", "",
                    "| part | first epoch | last epoch |", "|---|---:|---:|"]
            out += [f"| {name} | {values[0]:.4f} | {values[-1]:.4f} |" for name, values in parts.items()]
        out.append("")
        return out

    @classmethod
    def plots(cls, report: dict[str, Any], stage_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        parts = loss_parts(records, stage_id)
        if report.get("teacher") is None or not parts:
            return {}
        return {f"{stage_id}_loss_parts.png": _parts_figure(parts, f"distillation loss parts ({stage_id})")}


def _parts_figure(parts: dict[str, list[float]], title: str) -> Any:
    from matplotlib.figure import Figure  # noqa: PLC0415 (no pyplot, no backend change)

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, values in parts.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set(title=title, xlabel="epoch", ylabel="loss (unweighted)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def loss_parts(records: list[dict[str, Any]], stage: str) -> dict[str, list[float]]:
    """Per-epoch values of every ``train_<part>_loss`` logged by ``stage``."""
    parts: dict[str, list[float]] = {}
    for m in records:
        if m.get("stage") == stage and "epoch" in m:
            for key, value in m.items():
                if key.startswith("train_") and key.endswith("_loss"):
                    name = key.removeprefix("train_")
                    parts.setdefault("total" if name == "loss" else name, []).append(value)
    return parts
