"""The stage runner: teacher → student → distill → prune → finetune → evaluate → export.

Each stage writes its model to ``models/<stage>.slim`` as its last act; a stage
whose model file exists is done and is loaded instead of re-run, and a stage
that was interrupted resumes from its per-epoch checkpoint. Because batch
order and initialisation depend only on the recipe's seed, a killed and
resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import copy
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from torchslim import data as ts_data
from torchslim import export as ts_export
from torchslim import measure as ts_measure
from torchslim import models as ts_models
from torchslim.distill import KDObjective
from torchslim.errors import ConfigError, ModelError
from torchslim.pipeline.recipe import ModelRef, Recipe, load_recipe, recipe_to_yaml
from torchslim.pipeline.report import write_plots, write_report
from torchslim.pipeline.rundir import RunDir
from torchslim.prune import (
    AGPSchedule,
    MagnitudePruning,
    finalize_,
    global_sparsity,
    gradual_pruning_hook,
    layer_sparsity,
    masked_layers,
    prune_,
)
from torchslim.train import Objective, TrainConfig, atomic_write_text, evaluate, fit
from torchslim.train.loop import count_steps
from torchslim.train.distributed import barrier, broadcast_object, init_distributed, shutdown

# Row order and labels of the report's table.
MODEL_ROWS: dict[str, str] = {
    "teacher": "teacher",
    "student_alone": "student, trained alone",
    "distilled": "student, distilled",
    "pruned": "pruned one-shot, not fine-tuned",
    "finetuned": "pruned + fine-tuned",
}


def _log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one voice
        print(f"[torchslim] {message}", file=sys.stderr, flush=True)


class Runner:
    """Runs one recipe into one run folder (new or resumed)."""

    def __init__(self, recipe: Recipe, run: RunDir, *, progress: bool | None = None):
        self.recipe = recipe
        self.run = run
        self.progress = progress
        self.dist, self.device = init_distributed(recipe.device)
        self.metrics: list[dict[str, Any]] = run.read_metrics()
        self.timings: dict[str, float] = {}

    # ----------------------------------------------------------------- helpers
    def _record(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if self.dist.is_main:
            self.run.write_metrics(self.metrics)

    def _replace_stage_records(self, stage: str, records: list[dict[str, Any]]) -> None:
        self.metrics = [m for m in self.metrics if not (m.get("stage") == stage and "epoch" in m)] + records
        if self.dist.is_main:
            self.run.write_metrics(self.metrics)

    def _build(self, ref: ModelRef) -> nn.Module:
        """Build a model from a recipe reference, filling input/class sizes from the data."""
        if ref.preset is not None:
            builder = ts_models.list_presets()
            known = {p.name: p.builder for p in builder}
            if ref.preset not in known:
                raise ConfigError(f"unknown model preset {ref.preset!r}; known: {', '.join(sorted(known))}")
            params = inspect.signature(known[ref.preset]).parameters
            sizes = {"in_channels": self.splits.input_shape[0], "num_classes": self.splits.num_classes,
                     "input_size": self.splits.input_shape[-1]}
            args = {k: v for k, v in sizes.items() if k in params}
            args.update(ref.args)
            return ts_models.create(ref.preset, **args)
        return ts_models.create_from_factory(ref.factory, **ref.args)

    def _load_weights(self, ref: ModelRef) -> nn.Module:
        path = Path(ref.weights)
        if not path.is_file():
            raise ConfigError(f"model weights file {path} does not exist")
        if path.suffix == ".slim":
            # Weights may be stored in float16 to halve the file; compute in float32.
            model = ts_export.load(path, factory=ref.factory).float()
            spec = ts_models.get_spec(model) or {}
            wanted = ref.preset or ref.factory
            if spec.get("preset", spec.get("factory")) != wanted:
                raise ModelError(f"{path} holds a {spec.get('preset', spec.get('factory'))!r} model, "
                                 f"but the recipe names {wanted!r}")
            return model
        from safetensors.torch import load_file

        model = self._build(ref)
        try:
            model.load_state_dict(load_file(str(path)))
        except Exception as exc:
            raise ModelError(f"{path} does not fit model {ref.preset or ref.factory}: {exc}") from None
        return model

    def _check(self, model: nn.Module, label: str) -> nn.Module:
        """Refuse a model with NaN/Inf weights or one that does not fit the data, before training."""
        ts_models.check_finite(model, label)
        ts_models.check_forward(model, self.splits.val.x[:2].to(self.device) if len(self.splits.val.y) >= 2
                                else self.splits.train.x[:2].to(self.device), self.splits.num_classes, label)
        return model

    def _save(self, model: nn.Module, stage: str) -> None:
        if self.dist.is_main:
            ts_export.save(model, self.run.model(stage), input_shape=list(self.splits.input_shape),
                           metadata={"stage": stage, "recipe": self.recipe.name})

    def _load(self, stage: str) -> nn.Module:
        ref = self.recipe.teacher.model if stage == "teacher" else self.recipe.student.model
        return ts_export.load(self.run.model(stage), factory=ref.factory).to(self.device)

    def _done(self, stage: str) -> bool:
        return self.run.model(stage).is_file()

    def _fit(self, model: nn.Module, stage: str, config: TrainConfig, objective: Objective | None, seed: int,
             on_step_end: Callable[[int], None] | None = None) -> None:
        def on_epoch_end(record: dict[str, Any]) -> None:
            self.metrics = [m for m in self.metrics
                            if not (m.get("stage") == stage and m.get("epoch", 0) >= record["epoch"])] + [record]
            if self.dist.is_main:
                self.run.write_metrics(self.metrics)

        started = time.perf_counter()
        history = fit(model, self.splits.train, config, val=self.splits.val, objective=objective, seed=seed,
                      device=self.device, precision=self.recipe.precision,
                      checkpoint_path=self.run.checkpoint(stage), stage=stage, on_epoch_end=on_epoch_end,
                      on_step_end=on_step_end,
                      progress=self.progress, dist=self.dist)
        self.timings[stage] = time.perf_counter() - started
        # The checkpoint's history is the whole truth (it survives a kill between
        # checkpoint and metrics write), so it replaces what the log holds.
        self._replace_stage_records(stage, history)

    def _stage(self, stage: str, produce: Callable[[], nn.Module]) -> nn.Module:
        """Load a finished stage's model, or produce, save and return it."""
        if self._done(stage):
            _log(f"{stage}: done in an earlier run, loading {self.run.model(stage)}")
            return self._load(stage)
        _log(f"{stage}: running")
        model = produce()
        self._save(model, stage)
        barrier(self.dist)
        return model

    # ------------------------------------------------------------------ stages
    def execute(self) -> dict[str, Any]:
        """Run every stage of the recipe; returns the summary also written to ``summary.json``."""
        recipe = self.recipe
        started = time.perf_counter()
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        d = recipe.data
        val_size: float | int = int(d.val_size) if d.val_size >= 1 else d.val_size
        self.splits = ts_data.load_dataset(d.dataset, root=d.root, val_size=val_size, train_limit=d.train_limit,
                                           test_limit=d.test_limit, seed=recipe.seed, download=d.download)
        _log(f"data: {d.dataset}: {len(self.splits.train.y)} train, {len(self.splits.val.y)} val, "
             f"{len(self.splits.test.y)} test samples, input {tuple(self.splits.input_shape)}")

        produced: dict[str, nn.Module] = {}
        teacher = None
        if recipe.teacher is not None:
            t = recipe.teacher

            def make_teacher() -> nn.Module:
                if t.model.weights is not None:
                    return self._check(self._load_weights(t.model).to(self.device), "teacher")
                torch.manual_seed(recipe.seed)
                model = self._check(self._build(t.model).to(self.device), "teacher")
                self._fit(model, "teacher", t.train, None, recipe.seed)
                return model

            teacher = produced["teacher"] = self._stage("teacher", make_teacher)

        subject = teacher
        if recipe.student is not None:
            s = recipe.student
            # Both the baseline and the distilled student start from this same initialisation.
            torch.manual_seed(recipe.seed + 1)
            student_init = self._load_weights(s.model) if s.model.weights else self._build(s.model)
            student_init = self._check(student_init.to(self.device), "student")
            subject = student_init
            if s.baseline is not None:
                def make_alone() -> nn.Module:
                    model = copy.deepcopy(student_init)
                    self._fit(model, "student_alone", s.baseline, None, recipe.seed + 2)
                    return model

                subject = produced["student_alone"] = self._stage("student_alone", make_alone)
            if recipe.distill is not None:
                def make_distilled() -> nn.Module:
                    model = copy.deepcopy(student_init)
                    objective = KDObjective(teacher.eval(), recipe.distill.kd, recipe.distill.train.label_smoothing)
                    # Same seed as the baseline: same batches, so the comparison is fair.
                    self._fit(model, "distilled", recipe.distill.train, objective, recipe.seed + 2)
                    return model

                subject = produced["distilled"] = self._stage("distilled", make_distilled)

        if recipe.prune is not None:
            unpruned = subject
            p = recipe.prune
            gradual = p.schedule == "gradual"

            def make_pruned() -> nn.Module:
                model = copy.deepcopy(unpruned)
                prune_(model, p.pruning_config())
                return model

            # The "pruned" row is always the one-shot cut to the target, before any
            # fine-tuning; with the gradual schedule fine-tuning starts from the unpruned
            # model instead and reaches the target along the AGP ramp.
            pruned = produced["pruned"] = self._stage("pruned", make_pruned)
            sparsity = layer_sparsity(pruned, masked_layers(pruned))
            self._record({"stage": "prune", "event": "pruned",
                          "global_sparsity": global_sparsity(pruned, masked_layers(pruned)),
                          "layers": {k: v["sparsity"] for k, v in sparsity.items()}})
            subject = pruned
            if recipe.finetune is not None:
                f = recipe.finetune

                def make_finetuned() -> nn.Module:
                    if gradual:
                        model = copy.deepcopy(unpruned)
                        prune_(model, MagnitudePruning(**{**p.pruning_config().model_dump(), "sparsity": 0.0}))
                    else:
                        model = copy.deepcopy(pruned)
                    objective = None
                    if f.distill_from != "none":
                        source = unpruned if f.distill_from == "unpruned" else teacher
                        objective = KDObjective(copy.deepcopy(source).eval(), f.kd, f.train.label_smoothing)
                    on_step_end = None
                    if gradual:
                        total = f.train.epochs * count_steps(len(self.splits.train.y), f.train.batch_size,
                                                             self.dist.world_size)
                        schedule = AGPSchedule(final_sparsity=p.sparsity, start_step=0,
                                               end_step=max(1, round(p.gradual_end * total)),
                                               frequency=p.gradual_frequency)
                        on_step_end = gradual_pruning_hook(model, p.pruning_config(), schedule)
                    self._fit(model, "finetuned", f.train, objective, recipe.seed + 3, on_step_end=on_step_end)
                    return model

                subject = produced["finetuned"] = self._stage("finetuned", make_finetuned)

        rows = self._evaluate(produced)
        export = self._export(subject)
        summary = {
            "recipe": recipe.name,
            "dataset": recipe.data.dataset,
            "rows": rows,
            "export": export,
            "timings_s": {**self.timings, "total": time.perf_counter() - started},
        }
        if recipe.prune is not None:
            pruned_model = produced["finetuned"] if "finetuned" in produced else produced["pruned"]
            summary["pruning"] = {
                "config": recipe.prune.pruning_config().to_dict(),
                "schedule": recipe.prune.schedule,
                "global_sparsity": global_sparsity(pruned_model, masked_layers(pruned_model)),
                "layers": layer_sparsity(pruned_model, masked_layers(pruned_model)),
            }
        if recipe.distill is not None:
            summary["distill"] = {"kd": recipe.distill.kd.to_dict(), "epochs": recipe.distill.train.epochs}
        if self.dist.is_main:
            self.run.write_json("summary.json", summary)
            write_plots(self.run, self.metrics, summary)
            write_report(self.run, recipe, summary, self.metrics)
        _log(f"done in {summary['timings_s']['total']:.0f}s: {self.run.root / 'report.md'}")
        return summary

    def _evaluate(self, produced: dict[str, nn.Module]) -> list[dict[str, Any]]:
        rows = []
        example = self.splits.test.x[:1]
        cfg = self.recipe.evaluate
        for key, label in MODEL_ROWS.items():
            if key not in produced:
                continue
            model = produced[key]
            accuracy = evaluate(model, self.splits.test, device=self.device, dist=self.dist)["accuracy"]
            if not self.dist.is_main:
                continue  # one process measures: latency timed beside other ranks would be wrong
            cpu_model = copy.deepcopy(model).cpu()
            prof = ts_measure.profile(cpu_model, example, batch_sizes=tuple(cfg.latency_batch_sizes),
                                      file_bytes=self.run.model(key).stat().st_size, latency=cfg.latency,
                                      latency_budget_s=cfg.latency_budget_s)
            row = {"key": key, "model": label, "accuracy": accuracy, **prof.to_dict()}
            rows.append(row)
            self._record({"stage": "evaluate", **row})
            _log(f"evaluate: {label}: accuracy {accuracy:.4f}, params {prof.params}, nonzero {prof.nonzero}")
        return rows

    def _export(self, model: nn.Module) -> dict[str, Any]:
        final = copy.deepcopy(model).cpu().eval()
        finalize_(final)
        out: dict[str, Any] = {}
        if not self.dist.is_main:
            return out
        stored = copy.deepcopy(final).half() if self.recipe.export.weights_dtype == "float16" else final
        ts_export.save(stored, self.run.root / "model.slim", input_shape=list(self.splits.input_shape),
                       metadata={"recipe": self.recipe.name, "weights_dtype": self.recipe.export.weights_dtype})
        out["model_slim_bytes"] = (self.run.root / "model.slim").stat().st_size
        if self.recipe.export.onnx:
            result = ts_export.export_onnx(final, self.splits.test.x[:8], self.run.root / "model.onnx",
                                           atol=self.recipe.export.onnx_atol)
            out["onnx"] = {k: v for k, v in result.items() if k != "path"}
            _log(f"export: model.onnx, largest |onnxruntime - torch| = {result['max_abs_diff']:.2e}")
        return out


def run_recipe(recipe: Recipe | str | Path, out: str | Path | None = None, *, overrides: list[str] | None = None,
               progress: bool | None = None) -> Path:
    """Run a recipe (object or YAML path) into a new run folder; returns the folder.

    Example:
        >>> import torchslim as ts
        >>> run_dir = ts.run_recipe("recipes/fashion_mnist.yaml", out="runs/demo")  # doctest: +SKIP
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    dist, _ = init_distributed(recipe.device)
    # Rank 0 creates the folder (its name has a timestamp) and tells the others;
    # an error there is raised on every rank so none waits forever.
    created: str | ConfigError
    try:
        created = str(RunDir.create(out, recipe.name).root) if dist.is_main else ""
    except ConfigError as exc:
        created = exc
    created = broadcast_object(created, dist)
    if isinstance(created, ConfigError):
        raise created
    run = RunDir(created)
    if dist.is_main:
        atomic_write_text(run.recipe_path, recipe_to_yaml(recipe))
    try:
        Runner(recipe, run, progress=progress).execute()
    finally:
        shutdown(dist)
    return run.root


def resume_run(run_dir: str | Path, *, progress: bool | None = None) -> Path:
    """Continue an interrupted run from its folder; finished stages are loaded, not re-run."""
    run = RunDir.open_existing(run_dir)
    recipe = load_recipe(run.recipe_path)
    dist, _ = init_distributed(recipe.device)
    try:
        Runner(recipe, run, progress=progress).execute()
    finally:
        shutdown(dist)
    return run.root
