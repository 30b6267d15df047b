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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from torchslim import data as ts_data
from torchslim import export as ts_export
from torchslim import measure as ts_measure
from torchslim import models as ts_models
from torchslim.atomic import atomic_write_with
from torchslim.distill import DistillConfig, DistillObjective
from torchslim.distill.kd import prepare_teacher_cache
from torchslim.errors import ConfigError, ModelError, TrainingError
from torchslim.pipeline.recipe import (
    ModelRef,
    Recipe,
    SensitivitySection,
    StructuredPruneStage,
    UnstructuredPruneStage,
    load_recipe,
    recipe_to_yaml,
)
from torchslim.pipeline.report import write_plots, write_report
from torchslim.pipeline.rundir import RunDir
from torchslim.prune import (
    AGPSchedule,
    SensitivityConfig,
    SensitivityResult,
    UnstructuredPruning,
    WeightSnapshot,
    at_sparsity,
    finalize_,
    global_sparsity,
    gradual_pruning_hook,
    layer_sparsity,
    masked_layers,
    prune_,
    pruning_layers,
    pruning_summary,
    rewind_,
    select_layers,
    sensitivity_analysis,
    snapshot_weights,
)
from torchslim.prune.structured import prune_channels
from torchslim.prune.structured.api import REPORT_ATTR
from torchslim.train import Objective, TrainConfig, atomic_write_text, evaluate, fit
from torchslim.train.checkpoint import load_checkpoint
from torchslim.train.loop import count_steps
from torchslim.train.distributed import barrier, broadcast_object, init_distributed, shutdown

# Row order and labels of the report's table.
MODEL_ROWS: dict[str, str] = {
    "teacher": "teacher",
    "student": "student, as given",
    "student_alone": "student, trained alone",
    "distilled": "student, distilled",
    "pruned": "pruned one-shot, not fine-tuned",
    "finetuned": "pruned + fine-tuned",
}
STRUCTURED_LABELS: dict[str, str] = {
    "pruned": "channels removed, not fine-tuned",
    "finetuned": "channels removed + fine-tuned",
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

    def _record_event(self, record: dict[str, Any], *keys: str) -> None:
        """Record a stage event, replacing the same event from an earlier (interrupted) run.

        Events are matched on ``stage``, ``event`` and ``keys`` (e.g. ``round``), so a
        resumed run that replays a step does not list it twice.
        """
        same = ("stage", "event", *keys)
        self.metrics = [m for m in self.metrics
                        if not ("event" in m and all(m.get(k) == record.get(k) for k in same))]
        self._record(record)

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
        # Later stages descend from the student, or from the teacher in a recipe without one.
        ref = self.recipe.student.model if stage != "teacher" and self.recipe.student else self.recipe.teacher.model
        return ts_export.load(self.run.model(stage), factory=ref.factory).to(self.device)

    def _done(self, stage: str) -> bool:
        # Rank 0 decides: a rank that checked later could see the file rank 0 has just
        # written, skip the stage and its collectives, and leave the others waiting.
        return bool(broadcast_object(self.run.model(stage).is_file(), self.dist))

    def _fit(self, model: nn.Module, stage: str, config: TrainConfig, objective: Objective | None, seed: int,
             on_step_end: Callable[[int], None] | None = None,
             on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> None:
        also = on_epoch_end

        def on_epoch_end(record: dict[str, Any]) -> None:
            self.metrics = [m for m in self.metrics
                            if not (m.get("stage") == stage and m.get("epoch", 0) >= record["epoch"])] + [record]
            if self.dist.is_main:
                self.run.write_metrics(self.metrics)
            if also is not None:
                also(record)

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
    def _load_data(self) -> None:
        recipe = self.recipe
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        d = recipe.data
        val_size: float | int = int(d.val_size) if d.val_size >= 1 else d.val_size
        self.splits = ts_data.load_dataset(d.dataset, root=d.root, val_size=val_size, train_limit=d.train_limit,
                                           test_limit=d.test_limit, seed=recipe.seed, download=d.download)
        _log(f"data: {d.dataset}: {len(self.splits.train.y)} train, {len(self.splits.val.y)} val, "
             f"{len(self.splits.test.y)} test samples, input {tuple(self.splits.input_shape)}")

    def _teacher_cache(self, teacher: nn.Module, config: DistillConfig, train_config: TrainConfig) -> Any:
        """The teacher's cached outputs (built once per teacher and data, kept in ``cache/``), or None."""
        def build() -> Any:
            return prepare_teacher_cache(teacher, self.splits.train, config, train_config,
                                         cache_dir=self.run.root / "cache", log=_log)

        if self.dist.world_size == 1:
            return build()
        # Rank 0 writes the cache file; the others then read it instead of racing to write it.
        cache = build() if self.dist.is_main else None
        barrier(self.dist)
        return cache if self.dist.is_main else build()

    def _distill_fit(self, model: nn.Module, teacher: nn.Module, config: DistillConfig, train_config: TrainConfig,
                     stage: str, seed: int, *, cache: Any = "build",
                     on_step_end: Callable[[int], None] | None = None,
                     on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Train ``model`` on ``config``'s distillation objective from ``teacher`` (frozen)."""
        teacher.eval()  # a teacher fresh from training is in train mode; distillation freezes it
        if cache == "build":
            cache = self._teacher_cache(teacher, config, train_config)
        example = self.splits.train.x[:2].to(self.device)
        with DistillObjective(model, teacher, config, example=example, teacher_cache=cache,
                              label_smoothing=train_config.label_smoothing) as objective:
            self._fit(model, stage, train_config, objective, seed, on_step_end=on_step_end, on_epoch_end=on_epoch_end)
        self._record_event({"stage": stage, "event": "teacher_outputs", "mode": objective.teacher_outputs})

    def _prepare(self) -> tuple[dict[str, nn.Module], nn.Module | None, nn.Module]:
        """Data, teacher, student baseline and distillation: everything before pruning.

        Returns the models produced so far, the teacher (or None) and the model the
        prune stage starts from; ``self.prune_from`` is that model's row key.
        """
        recipe = self.recipe
        self._load_data()
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

        subject, self.prune_from = teacher, "teacher"
        if recipe.student is not None:
            s = recipe.student
            # Both the baseline and the distilled student start from this same initialisation.
            torch.manual_seed(recipe.seed + 1)
            student_init = self._load_weights(s.model) if s.model.weights else self._build(s.model)
            student_init = self._check(student_init.to(self.device), "student")
            if s.baseline is None and recipe.distill is None:
                # Pruned as given (loaded weights, or at initialisation as SNIP does):
                # it gets its own row, so the report compares the pruned model with it.
                subject = produced["student"] = self._stage("student", lambda: copy.deepcopy(student_init))
                self.prune_from = "student"
            if s.baseline is not None:
                def make_alone() -> nn.Module:
                    model = copy.deepcopy(student_init)
                    self._fit(model, "student_alone", s.baseline, None, recipe.seed + 2)
                    return model

                subject = produced["student_alone"] = self._stage("student_alone", make_alone)
                self.prune_from = "student_alone"
            if recipe.distill is not None:
                def make_distilled() -> nn.Module:
                    model = copy.deepcopy(student_init)
                    # Same seed as the baseline: same batches, so the comparison is fair.
                    self._distill_fit(model, teacher, recipe.distill.distillation(), recipe.distill.train,
                                      "distilled", recipe.seed + 2)
                    return model

                subject = produced["distilled"] = self._stage("distilled", make_distilled)
                self.prune_from = "distilled"
        return produced, teacher, subject

    def execute(self) -> dict[str, Any]:
        """Run every stage of the recipe; returns the summary also written to ``summary.json``."""
        recipe = self.recipe
        started = time.perf_counter()
        produced, teacher, subject = self._prepare()
        pruning_summary_: dict[str, Any] | None = None
        if isinstance(recipe.prune, StructuredPruneStage):
            subject, pruning_summary_ = self._prune_structured(subject, teacher, produced)
        elif recipe.prune is not None:
            subject, pruning_summary_ = self._prune_unstructured(subject, teacher, produced)

        rows = self._evaluate(produced)
        export = self._export(subject)
        summary = {
            "recipe": recipe.name,
            "dataset": recipe.data.dataset,
            "rows": rows,
            "export": export,
            "timings_s": {**self.timings, "total": time.perf_counter() - started},
        }
        if pruning_summary_ is not None:
            summary["pruning"] = {**pruning_summary_, "from": self.prune_from}
        if recipe.distill is not None:
            summary["distill"] = {**recipe.distill.distillation().describe(), "epochs": recipe.distill.train.epochs,
                                  "teacher_outputs_used": self._teacher_outputs_used("distilled")}
        if self.dist.is_main:
            self.run.write_json("summary.json", summary)
            write_plots(self.run, self.metrics, summary)
            write_report(self.run, recipe, summary, self.metrics)
        _log(f"done in {summary['timings_s']['total']:.0f}s: {self.run.root / 'report.md'}")
        return summary

    def _teacher_outputs_used(self, stage: str) -> str | None:
        used = [m["mode"] for m in self.metrics if m.get("stage") == stage and m.get("event") == "teacher_outputs"]
        return used[-1] if used else None

    # ------------------------------------------------------------ fine-tuning
    def _finetune_teacher(self, unpruned: nn.Module, teacher: nn.Module | None) -> nn.Module | None:
        f = self.recipe.finetune
        if f is None or f.distill_from == "none":
            return None
        return copy.deepcopy(unpruned if f.distill_from == "unpruned" else teacher).eval()

    def _finetune_fit(self, model: nn.Module, stage: str, train_config: TrainConfig, source: nn.Module | None,
                      seed: int, cache: Any = "build", **hooks: Any) -> None:
        """Fine-tune with labels only, or distilling from ``source`` (the unpruned model or the teacher)."""
        if source is None:
            self._fit(model, stage, train_config, None, seed, **hooks)
        else:
            self._distill_fit(model, source, self.recipe.finetune.distillation(), train_config, stage, seed,
                              cache=cache, **hooks)

    # ------------------------------------------------------- unstructured pruning
    def _prune_unstructured(self, unpruned: nn.Module, teacher: nn.Module | None,
                            produced: dict[str, nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
        recipe, p, f = self.recipe, self.recipe.prune, self.recipe.finetune
        config = p.pruning_config()
        if p.sensitivity is not None:
            config = self._sensitivity(unpruned, p.sensitivity.sparsities, p.sensitivity.max_samples,
                                       base=config).pruning_config(p.sparsity, base=config)
            _log(f"prune: per-layer sparsities from the sensitivity analysis: "
                 + ", ".join(f"{k}={v:.3f}" for k, v in config.overrides.items()))
        data = self.splits.train if config.needs_data else None

        def make_pruned() -> nn.Module:
            model = copy.deepcopy(unpruned)
            prune_(model, config, data)
            return model

        # The "pruned" row is always the one-shot cut to the target, before any
        # fine-tuning; the gradual and iterative schedules start fine-tuning from the
        # unpruned model instead and reach the target on their way.
        pruned = produced["pruned"] = self._stage("pruned", make_pruned)
        self._record_event({"stage": "prune", "event": "pruned", "global_sparsity": global_sparsity(pruned, masked_layers(pruned)),
                      "layers": {k: v["sparsity"] for k, v in layer_sparsity(pruned, masked_layers(pruned)).items()}})
        subject, schedule = pruned, None
        if f is not None:
            steps_per_epoch = count_steps(len(self.splits.train.y), f.train.batch_size, self.dist.world_size)
            if p.schedule == "gradual":
                total = f.train.epochs * steps_per_epoch
                start = round(p.gradual_start * total)
                schedule = AGPSchedule(final_sparsity=config.sparsity, start_step=start,
                                       end_step=max(start + 1, round(p.gradual_end * total)),
                                       frequency=p.gradual_frequency)
            elif p.schedule == "iterative":
                schedule = p.iterative

            def make_finetuned() -> nn.Module:
                source = self._finetune_teacher(unpruned, teacher)
                if p.schedule == "oneshot":
                    model = copy.deepcopy(pruned)
                    self._finetune_fit(model, "finetuned", f.train, source, recipe.seed + 3)
                elif p.schedule == "gradual":
                    model = copy.deepcopy(unpruned)
                    # Masks (all ones) from the start, so every checkpoint has the same keys.
                    prune_(model, at_sparsity(config, 0.0, config.sparsity), data)
                    hook = gradual_pruning_hook(model, config, schedule, data)
                    self._finetune_fit(model, "finetuned", f.train, source, recipe.seed + 3, on_step_end=hook)
                else:
                    model = self._iterate(unpruned, config, data, source)
                return model

            subject = produced["finetuned"] = self._stage("finetuned", make_finetuned)
        summary = pruning_summary(subject, config, schedule)
        summary.update(structured=False, schedule_name=p.schedule, exclusions=self._exclusions(subject, config))
        if p.sensitivity is not None:
            summary["sensitivity"] = {"table": "sensitivity.md", "plot": "plots/sensitivity.png",
                                      "allocated": {k: v for k, v in config.overrides.items() if v is not None}}
        return subject, summary

    def _exclusions(self, model: nn.Module, config: UnstructuredPruning) -> list[str]:
        """Prunable-type layers the selection left unpruned (for the report)."""
        chosen = {n for n, _, _ in pruning_layers(model, config)}
        return [n for n, _ in select_layers(model, config.layer_types, [], []) if n not in chosen]

    def _iterate(self, unpruned: nn.Module, config: UnstructuredPruning, data: Any, source: nn.Module | None) -> nn.Module:
        """Prune → retrain rounds (Han et al.) sharing the fine-tuning epochs, with optional rewinding.

        Each round trains as its own stage (``finetuned_round<k>``) with its own
        checkpoint, so a killed run resumes inside the round it was in: pruning is
        deterministic, so earlier rounds replay to the same masks from their final
        checkpoints. The rewinding snapshot is written to ``checkpoints/rewind.safetensors``
        at the epoch it is taken, so a run resumed after that epoch still rewinds.
        """
        p, f, seed = self.recipe.prune, self.recipe.finetune, self.recipe.seed
        schedule = p.iterative
        round_train = f.train.model_copy(update={"epochs": f.train.epochs // schedule.rounds})
        rewind_file = self.run.root / "checkpoints" / "rewind.safetensors"
        rewind_state: dict[str, torch.Tensor] | None = None
        model = copy.deepcopy(unpruned)
        cache = None if source is None else self._teacher_cache(source, f.distillation(), round_train)

        def keep_for_rewinding(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if self.dist.is_main:
                atomic_write_with(rewind_file, lambda path: save_file({k: v.contiguous().cpu() for k, v in state.items()},
                                                                       str(path)))
            return state

        for k in range(1, schedule.rounds + 1):
            target = schedule.sparsity_after(k, config.sparsity)
            prune_(model, at_sparsity(config, target, config.sparsity), data)
            if rewind_state is not None:
                rewind_(model, rewind_state)
            snap = None
            if k == 1 and schedule.rewind_epoch is not None:
                if schedule.rewind_epoch == 0:
                    rewind_state = keep_for_rewinding(snapshot_weights(model))
                else:
                    snap = WeightSnapshot(model, schedule.rewind_epoch)
                    if not rewind_file.is_file():
                        snap.state = self._rewind_from_checkpoint(schedule.rewind_epoch, keep_for_rewinding)

            def on_epoch_end(record: dict[str, Any], snap: WeightSnapshot | None = snap) -> None:
                if snap is not None and snap.state is None:
                    snap(record)
                    if snap.state is not None:  # written now: a resumed round 1 does not pass this epoch again
                        keep_for_rewinding(snap.state)

            self._finetune_fit(model, f"finetuned_round{k}", round_train, source, seed + 3 + k, cache=cache,
                               on_epoch_end=on_epoch_end)
            if snap is not None:
                if snap.state is None:  # resumed past the snapshot's epoch: it was written then
                    snap.state = load_file(str(rewind_file))
                rewind_state = snap.state
            self._record_event({"stage": "prune", "event": "round", "round": k, "target_sparsity": target,
                                "global_sparsity": global_sparsity(model, masked_layers(model))}, "round")
        return model

    def _rewind_from_checkpoint(self, epoch: int, keep: Callable[[dict[str, torch.Tensor]], Any]
                                ) -> dict[str, torch.Tensor] | None:
        """Recover the rewinding snapshot when round 1 was interrupted without writing it.

        The snapshot is written just after the epoch's checkpoint; a run killed in
        between has a checkpoint at exactly that epoch, which holds the same weights.
        A checkpoint past that epoch cannot give them back.
        """
        path = self.run.checkpoint("finetuned_round1")
        if not path.is_file():
            return None  # round 1 starts from scratch and takes the snapshot itself
        state = load_checkpoint(path)
        done, step = int(state["epoch"]), int(state.get("step", 0))
        if done == epoch and step == 0:
            weights = {k.removesuffix("_orig"): v for k, v in state["model"].items() if not k.endswith("_mask")}
            return keep(weights)
        if done > epoch or (done == epoch and step > 0):
            raise TrainingError(f"the weights of epoch {epoch} to rewind to were not saved before round 1 went "
                                f"past it: delete {path} and resume (round 1 is trained again)")
        return None

    def _sensitivity(self, model: nn.Module, sparsities: list[float], max_samples: int | None,
                     base: UnstructuredPruning, stem: str = "sensitivity") -> SensitivityResult:
        """The sensitivity analysis of ``model``, kept as ``<stem>.json``/``.md`` and ``plots/<stem>.png``.

        Read back from the run folder when the same sweep was done there already (a
        resumed run allocates exactly the sparsities it allocated before).
        """
        path = self.run.root / f"{stem}.json"
        if path.is_file():
            done = SensitivityResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
            samples = len(self.splits.val.y) if max_samples is None else min(max_samples, len(self.splits.val.y))
            if (done.sparsities == list(sparsities) and done.criterion.split(",")[0] == base.criterion
                    and done.samples == samples):
                return done  # the same sweep, finished earlier in this run folder
        config = SensitivityConfig(sparsities=sparsities, max_samples=max_samples,
                                   pruning=base.model_copy(update={"overrides": {
                                       k: v for k, v in base.overrides.items() if v is None}}))
        data = self.splits.train if base.needs_data else None
        started = time.perf_counter()
        _log(f"sensitivity: pruning each layer alone at {len(sparsities)} sparsities")
        result = sensitivity_analysis(model, self.splits.val, config, data=data, device=self.device)
        self.timings["sensitivity"] = time.perf_counter() - started
        if self.dist.is_main:
            atomic_write_text(self.run.root / f"{stem}.md", "# Sensitivity analysis\n\n" + result.table() + "\n")
            result.plot(self.run.plot(f"{stem}.png"))
            self.run.write_json(f"{stem}.json", result.to_dict())
        return result

    def sensitivity(self, sparsities: list[float] | None = None, max_samples: int | None = None) -> SensitivityResult:
        """Run the stages before pruning (reusing finished ones), then analyse the model the prune stage starts from.

        Written as ``sensitivity_sweep.*``: a run's own ``sensitivity.*`` (which its
        prune stage allocates from) is never overwritten.
        """
        _, _, subject = self._prepare()
        p = self.recipe.prune
        base = p.pruning_config() if isinstance(p, UnstructuredPruneStage) else UnstructuredPruning()
        if base.target != "sparsity":
            base = base.model_copy(update={"sparsity": 0.5, "threshold": None, "han_quality": None, "n_m": None})
        section = p.sensitivity if isinstance(p, UnstructuredPruneStage) and p.sensitivity else SensitivitySection()
        return self._sensitivity(subject, sparsities or section.sparsities,
                                 max_samples if max_samples is not None else section.max_samples, base,
                                 stem="sensitivity_sweep")

    # --------------------------------------------------------- structured pruning
    def _prune_structured(self, unpruned: nn.Module, teacher: nn.Module | None,
                          produced: dict[str, nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
        recipe, p, f = self.recipe, self.recipe.prune, self.recipe.finetune
        config = p.pruning_config()
        example = self.splits.train.x[:1].to(self.device)  # MACs are counted for one sample
        data = self.splits.train if config.importance == "taylor" else None

        def make_pruned() -> nn.Module:
            between = None
            if f is not None and p.finetune_epochs_between_steps and config.steps > 1:
                source = self._finetune_teacher(unpruned, teacher)
                step_train = f.train.model_copy(update={"epochs": p.finetune_epochs_between_steps})
                done = [0]

                def between(model: nn.Module) -> None:
                    done[0] += 1
                    if done[0] < config.steps:  # the finetune stage fine-tunes after the last step
                        self._finetune_fit(model, f"pruned_step{done[0]}", step_train, source,
                                           recipe.seed + 10 + done[0])

            model = prune_channels(unpruned, example, config, data, finetune=between)
            report = getattr(model, REPORT_ATTR)
            self._record_event({"stage": "prune", "event": "channels_removed", **json.loads(json.dumps(
                report.to_dict(), default=str))})
            for item in report.unsupported:
                _log(f"prune: left unpruned around {item}")
            return model

        pruned = produced["pruned"] = self._stage("pruned", make_pruned)
        subject = pruned
        if f is not None:
            def make_finetuned() -> nn.Module:
                model = copy.deepcopy(pruned)
                self._finetune_fit(model, "finetuned", f.train, self._finetune_teacher(unpruned, teacher),
                                   recipe.seed + 3)
                return model

            subject = produced["finetuned"] = self._stage("finetuned", make_finetuned)
        report = next((m for m in reversed(self.metrics) if m.get("event") == "channels_removed"), {})
        return subject, {"structured": True, "config": config.to_dict(), "report": report,
                         "between_steps_epochs": p.finetune_epochs_between_steps}

    def _evaluate(self, produced: dict[str, nn.Module]) -> list[dict[str, Any]]:
        rows = []
        example = self.splits.test.x[:1]
        cfg = self.recipe.evaluate
        structured = isinstance(self.recipe.prune, StructuredPruneStage)
        for key, label in MODEL_ROWS.items():
            if key not in produced:
                continue
            if structured and key in STRUCTURED_LABELS:
                label = STRUCTURED_LABELS[key]
                if key == "pruned" and self.recipe.prune.finetune_epochs_between_steps:
                    label = "channels removed, fine-tuned between steps only"
            model = produced[key]
            accuracy = evaluate(model, self.splits.test, device=self.device, dist=self.dist)["accuracy"]
            if not self.dist.is_main:
                continue  # one process measures: latency timed beside other ranks would be wrong
            prof = ts_measure.profile(copy.deepcopy(model).cpu(), example, file_bytes=self.run.model(key).stat().st_size,
                                      latency=False)
            rows.append({"key": key, "model": label, "accuracy": accuracy, **prof.to_dict()})
            _log(f"evaluate: {label}: accuracy {accuracy:.4f}, params {prof.params}, nonzero {prof.nonzero}")
        if rows and cfg.latency:
            # All models timed together, pass by pass in alternation, so that their
            # ratios hold even when other processes load the machine.
            models = {r["key"]: produced[r["key"]] for r in rows}
            for b in cfg.latency_batch_sizes:
                timed = ts_measure.compare_latency(models, example, b, budget_s=cfg.latency_budget_s)
                for r in rows:
                    r.setdefault("latency_ms", {})[str(b)] = timed[r["key"]]["median_ms"]
                    r.setdefault("latency_min_ms", {})[str(b)] = timed[r["key"]]["min_ms"]
        for r in rows:
            self._record({"stage": "evaluate", **r})
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


def _create_run(recipe: Recipe, out: str | Path | None, dist: Any) -> RunDir:
    """A new run folder holding the resolved recipe; under torchrun rank 0 creates it.

    Its name has a timestamp, so rank 0 tells the others which it is; an error there
    is raised on every rank so that none waits forever.
    """
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
    return run


def recipe_sensitivity(recipe: Recipe | str | Path, out: str | Path | None = None, *,
                       run_dir: str | Path | None = None, overrides: list[str] | None = None,
                       sparsities: list[float] | None = None, max_samples: int | None = None,
                       progress: bool | None = None) -> tuple[SensitivityResult, Path]:
    """Sensitivity analysis of the model a recipe's prune stage would start from.

    The stages before pruning run (or are loaded from ``run_dir``, a run folder of
    this recipe, when they are finished there); then each prunable layer is pruned
    alone at every sparsity and the validation accuracy measured, with the prune
    section's criterion and layer selection. Writes ``sensitivity_sweep.json``,
    ``sensitivity_sweep.md`` and ``plots/sensitivity_sweep.png`` into the run folder.

    Returns:
        The :class:`~torchslim.prune.SensitivityResult` and the run folder.

    Example:
        >>> result, folder = ts.pipeline.recipe_sensitivity("recipes/fashion_mnist.yaml")  # doctest: +SKIP
        >>> result.layer_sparsities(0.9)  # doctest: +SKIP
    """
    # Check the sweep before any stage runs (they can take a while).
    section = SensitivitySection(**{k: v for k, v in {"sparsities": sparsities, "max_samples": max_samples}.items()
                                    if v is not None})
    sparsities = section.sparsities if sparsities is not None else None
    if run_dir is not None:
        run = RunDir.open_existing(run_dir)
        recipe = load_recipe(run.recipe_path)
        dist, _ = init_distributed(recipe.device)
    else:
        if not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe, overrides)
        dist, _ = init_distributed(recipe.device)
        run = _create_run(recipe, out, dist)
    try:
        result = Runner(recipe, run, progress=progress).sensitivity(sparsities, max_samples)
    finally:
        shutdown(dist)
    return result, run.root


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
    run = _create_run(recipe, out, dist)
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
