"""``prune``: unstructured pruning (masks), one-shot, gradual (AGP) or iterative (prune → retrain rounds).

The method is the library's :class:`~torchslim.prune.UnstructuredPruning`
unchanged; the schedule is :class:`~torchslim.prune.GradualSchedule` (AGP
placed by fractions of the training steps) or
:class:`~torchslim.prune.IterativeSchedule` (run by
:func:`~torchslim.prune.prune_iteratively`, each round checkpointed). With a
schedule, the stage trains (``train``), distilling from ``teacher`` when set.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from torchslim.atomic import atomic_write_text, atomic_write_with
from torchslim.config import Config
from torchslim.distill import DistillConfig, check_distill_layers
from torchslim.errors import ConfigError, TrainingError
from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.prune import (GradualSchedule, check_pruning, IterativeSchedule, SensitivityConfig, SensitivityResult,
                             UnstructuredPruning, at_sparsity, global_sparsity, gradual_pruning_hook, layer_sparsity,
                             masked_layers, prune_, prune_iteratively, pruning_layers, pruning_summary, select_layers,
                             sensitivity_analysis)
from torchslim.pipeline.store import content_key
from torchslim.train import TrainConfig
from torchslim.train.checkpoint import load_checkpoint
from torchslim.train.distributed import barrier
from torchslim.train.loop import count_steps


class PruneSchedule(Config):
    """When the masks reach their target: set one of ``gradual`` and ``iterative``, or neither (one-shot).

    Attributes:
        gradual: prune along Zhu & Gupta's AGP ramp while training.
        iterative: prune → retrain rounds (Han et al.); ``train.epochs`` is per round.
    """

    gradual: GradualSchedule | None = None
    iterative: IterativeSchedule | None = None

    @model_validator(mode="after")
    def _one(self) -> "PruneSchedule":
        if self.gradual is not None and self.iterative is not None:
            raise ValueError("set 'gradual' or 'iterative', not both")
        return self

    @property
    def name(self) -> str:
        return "gradual" if self.gradual else "iterative" if self.iterative else "oneshot"


class PruneStage(StageConfig):
    """Unstructured pruning of the input model.

    Attributes:
        method: what to prune and how (:class:`~torchslim.prune.UnstructuredPruning`).
        schedule: one-shot (default), ``gradual`` or ``iterative``.
        train: training while pruning (required by ``gradual`` and ``iterative``).
        teacher: distill from this model while training (a ``models`` name or stage id).
        objective: the distillation objective when ``teacher`` is set.
        sensitivity: choose per-layer sparsities from a sensitivity analysis of the input
            (:class:`~torchslim.prune.SensitivityConfig`; its ``pruning`` is this stage's ``method``).
    """

    kind: Literal["prune"] = "prune"
    method: UnstructuredPruning = Field(default_factory=UnstructuredPruning)
    schedule: PruneSchedule = Field(default_factory=PruneSchedule)
    train: TrainConfig | None = None
    teacher: str | None = None
    objective: DistillConfig = Field(default_factory=DistillConfig)
    sensitivity: SensitivityConfig | None = None

    @model_validator(mode="after")
    def _fits(self) -> "PruneStage":
        name = self.schedule.name
        if name != "oneshot" and self.train is None:
            raise ValueError(f"schedule {name!r} prunes while training: add 'train'")
        if name == "oneshot" and (self.train is not None or self.teacher is not None):
            raise ValueError("a one-shot prune stage does not train: move 'train'/'teacher' to a finetune stage")
        if name != "oneshot" and self.method.target != "sparsity":
            raise ValueError(f"schedule {name!r} ramps a target 'sparsity' (this method is set by "
                             f"{self.method.target!r})")
        if self.sensitivity is not None and self.method.target != "sparsity":
            raise ValueError("'sensitivity' allocates a target 'sparsity' between layers: set method.sparsity")
        it = self.schedule.iterative
        if it is not None and it.rewind_epoch is not None and it.rewind_epoch > self.train.epochs:
            raise ValueError(f"schedule.iterative.rewind_epoch ({it.rewind_epoch}) is past a round's "
                             f"{self.train.epochs} epochs (train.epochs)")
        return self

    def references(self) -> list[str]:
        return [self.teacher] if self.teacher else []


@register_stage
class Prune(Stage):
    kind = "prune"
    Config = PruneStage

    @property
    def trains(self) -> bool:  # type: ignore[override]
        return self.config.train is not None

    def plan(self, ctx: Any, model: nn.Module) -> nn.Module:
        check_pruning(model, self.config.method)  # names, a non-empty selection, N:M divisibility
        if self.config.teacher is not None:
            check_distill_layers(model, ctx.get(self.config.teacher).model, self.config.objective, ctx.example)
        return model

    # ---------------------------------------------------------------- run
    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        c, entry = self.config, ctx.entry
        config, report = c.method, {}
        if c.sensitivity is not None:
            result = self._sensitivity(ctx, model, config)
            config = result.pruning_config(config.sparsity, base=config)
            report["sensitivity"] = {"allocated": {k: v for k, v in config.overrides.items() if v is not None}}
        data = ctx.splits.train if config.needs_data else None
        teacher = ctx.copy_of(c.teacher) if c.teacher else None
        name, schedule = c.schedule.name, None
        if name == "oneshot":
            prune_(model, config, data)
        elif name == "gradual":
            steps = count_steps(len(ctx.splits.train.y), c.train.batch_size, ctx.dist.world_size) * c.train.epochs
            schedule = c.schedule.gradual.placed(config.sparsity, steps)
            prune_(model, at_sparsity(config, 0.0, config.sparsity), data)  # masks from the start: same keys
            hook = gradual_pruning_hook(model, config, schedule, data)
            ctx.fit(model, self.id, c.train, entry, seed=ctx.seed(self.id), teacher=teacher, objective=c.objective,
                    on_step_end=hook)
        else:
            schedule = c.schedule.iterative
            self._iterate(ctx, model, config, data, teacher)
        layers = masked_layers(model)
        ctx.record({"stage": self.id, "event": "pruned", "global_sparsity": global_sparsity(model, layers),
                    "layers": {k: v["sparsity"] for k, v in layer_sparsity(model, layers).items()}})
        chosen = {n for n, _, _ in pruning_layers(model, config)}
        report.update(pruning_summary(model, config, schedule), schedule_name=name, input=self.input_name,
                      exclusions=[n for n, _ in select_layers(model, config.layer_types, [], []) if n not in chosen],
                      teacher=c.teacher)
        files = ["sensitivity.json", "sensitivity.md", "sensitivity.png"] if c.sensitivity is not None else []
        return StageResult(model, [], report, files)

    def _sensitivity(self, ctx: Any, model: nn.Module, config: UnstructuredPruning) -> SensitivityResult:
        """The sensitivity analysis of the input, kept in the store under its own key.

        Two stages that analyse the same input with the same sweep (the one-shot row
        and the scheduled stage of a migrated v1 recipe) share one analysis, and a
        resumed stage allocates exactly what it allocated before.
        """
        base = config.model_copy(update={"overrides": {k: v for k, v in config.overrides.items() if v is None}})
        sweep = self.config.sensitivity.model_copy(update={"pruning": base})
        shared = ctx.store.entry("sensitivity", content_key(ctx.get(self.input_name).key, sweep.to_dict(),
                                                            ctx.data_key))
        with ctx.store.producing(shared) if ctx.dist.is_main else contextlib.nullcontext():
            if not shared.is_done():
                result = sensitivity_analysis(model, ctx.splits.val, sweep, device=ctx.device,
                                              data=ctx.splits.train if base.needs_data else None)
                if ctx.dist.is_main:
                    write_sensitivity(result, shared.files, "sensitivity")
                    shared.write_result({"records": [], "report": {}, "files": []})
        barrier(ctx.dist)
        for name in ("sensitivity.json", "sensitivity.md", "sensitivity.png"):
            if ctx.dist.is_main:
                ctx.store.place(shared.files / name, ctx.entry.files / name)
        return SensitivityResult.from_dict(json.loads((shared.files / "sensitivity.json").read_text(encoding="utf-8")))

    def _iterate(self, ctx: Any, model: nn.Module, config: UnstructuredPruning, data: Any,
                 teacher: nn.Module | None) -> None:
        """Prune → retrain rounds through the library, each round checkpointed in the store entry."""
        c, entry = self.config, ctx.entry
        rewind_file = entry.work / "rewind.safetensors"
        cache = None if teacher is None else ctx.teacher_cache(teacher, c.objective, c.train)

        def keep(state: dict[str, torch.Tensor]) -> None:
            if ctx.dist.is_main:
                atomic_write_with(rewind_file, lambda p: save_file({k: v.contiguous().cpu() for k, v in state.items()},
                                                                   str(p)))

        def fit_round(m: nn.Module, k: int, train: TrainConfig, seed: int, on_epoch_end: Any) -> list[dict]:
            records = ctx.fit(m, f"{self.id}_round{k}", train, entry, seed=ctx.seed(f"{self.id}_round{k}"),
                              teacher=teacher, objective=c.objective, cache=cache, on_epoch_end=on_epoch_end)
            ctx.record({"stage": self.id, "event": "round", "round": k,
                        "target_sparsity": c.schedule.iterative.sparsity_after(k, config.sparsity),
                        "global_sparsity": global_sparsity(m, masked_layers(m))})
            return records

        rewind_to = load_file(str(rewind_file)) if rewind_file.is_file() else self._recover_snapshot(entry, keep)
        prune_iteratively(model, config, ctx.splits.train, c.train, c.schedule.iterative, data=data,
                          rewind_to=rewind_to, fit_round=fit_round, on_snapshot=keep)

    def _recover_snapshot(self, entry: Any, keep: Any) -> dict[str, torch.Tensor] | None:
        """The rewinding weights when round 1 was killed between its checkpoint and the snapshot's file.

        The snapshot is written just after the epoch's checkpoint, which then holds the
        same weights; a checkpoint past that epoch cannot give them back.
        """
        epoch = self.config.schedule.iterative.rewind_epoch
        path = entry.work / f"{self.id}_round1.pt"
        if epoch is None or epoch == 0 or not path.is_file():
            return None
        state = load_checkpoint(path)
        done, step = int(state["epoch"]), int(state.get("step", 0))
        if done == epoch and step == 0:
            weights = {k.removesuffix("_orig"): v for k, v in state["model"].items() if not k.endswith("_mask")}
            keep(weights)
            return weights
        if done > epoch or (done == epoch and step > 0):
            raise TrainingError(f"the weights of epoch {epoch} to rewind to were not saved before round 1 went "
                                f"past it: delete {path} and resume (round 1 is trained again)")
        return None

    # ---------------------------------------------------------------- report
    @classmethod
    def section(cls, report: dict[str, Any], rows: dict[str, dict[str, Any]], stage_id: str,
                records: list[dict[str, Any]]) -> list[str]:
        out = [f"## Pruning: `{stage_id}`", "", report["description"],
               f"Reached {100 * report['global_sparsity']:.2f}% sparsity over the pruned layers."]
        if report.get("exclusions"):
            out.append("Left unpruned by the selection: " + ", ".join(f"`{n}`" for n in report["exclusions"]) + ".")
        if "sensitivity" in report:
            out.append("Per-layer sparsities chosen from a sensitivity analysis (`sensitivity.md`, "
                       "`plots/sensitivity.png`): " + ", ".join(f"`{k}` {100 * v:.1f}%" for k, v in
                                                                report["sensitivity"]["allocated"].items()) + ".")
        mine, ref = rows.get(stage_id), rows.get(report.get("input") or "")
        later = rows.get(report.get("finetuned_by") or "")
        if mine is not None and ref is not None:
            drop = mine["accuracy"] - ref["accuracy"]
            line = f"`{stage_id}`: {100 * drop:+.2f} points against the unpruned `{report['input']}`"
            if later is not None:
                line += (f"; after fine-tuning (`{later['key']}`) {100 * (later['accuracy'] - ref['accuracy']):+.2f} "
                         f"points against the unpruned `{report['input']}`")
            out.append(line + f"; file {ref['file_bytes'] / max(mine['file_bytes'], 1):.1f}× smaller.")
        rounds = [m for m in records if m.get("stage") == stage_id and m.get("event") == "round"]
        if rounds:
            out += ["", "| round | target sparsity | reached |", "|---:|---:|---:|"]
            out += [f"| {r['round']} | {100 * r['target_sparsity']:.2f}% | {100 * r['global_sparsity']:.2f}% |"
                    for r in rounds]
        return out + ["", report["table"], ""]

    @classmethod
    def plots(cls, report: dict[str, Any], stage_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        from matplotlib.figure import Figure  # noqa: PLC0415 (no pyplot, no backend change)

        layers = report["layers"]
        fig = Figure(figsize=(max(6, 0.6 * len(layers) + 2), 4))
        ax = fig.subplots()
        ax.bar(range(len(layers)), [100 * s["sparsity"] for s in layers.values()])
        ax.set_xticks(range(len(layers)), list(layers), rotation=45, ha="right")
        ax.set(title=f"per-layer sparsity ({stage_id})", ylabel="sparsity (%)", ylim=(0, 100))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        return {f"{stage_id}_layer_sparsity.png": fig}


def write_sensitivity(result: SensitivityResult, folder: Any, stem: str) -> None:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` of a sensitivity analysis, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{stem}.md", "# Sensitivity analysis\n\n" + result.table() + "\n")
    result.plot(folder / f"{stem}.png")
    atomic_write_text(folder / f"{stem}.json", json.dumps(result.to_dict(), indent=2) + "\n")
