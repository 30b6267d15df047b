"""The runner: plan every stage (checks before anything trains), then run them in order.

A stage whose output is in the store under its content key is loaded, not
run; one that was interrupted resumes from its checkpoints in the store. Batch
order and initialisation depend only on the recipe's seed and the stages' ids,
so a killed and resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import torch
import torch.nn as nn

from torchslim import export as ts_export
from torchslim import models as ts_models
from torchslim.errors import ConfigError
from torchslim.pipeline.context import Output, RunContext, log
from torchslim.pipeline.model_ref import build_model, check_trusted
from torchslim.pipeline.recipe import Recipe, factories
from torchslim.pipeline.report import write_outputs
from torchslim.pipeline.rundir import RunDir
from torchslim.pipeline.stages import STAGES, Stage, StageResult
from torchslim.pipeline.store import Store, content_key, file_digest
from torchslim.train.distributed import barrier, broadcast_object

VERSION = "0.2.0"  # part of every store key: another torchslim recomputes


class Runner:
    """Runs one recipe into one run folder (new or resumed).

    Args:
        recipe: the validated recipe.
        run: the run folder.
        ctx: the run context (:func:`torchslim.pipeline.api.make_context`).
        trusted: user factories that may be imported (None: all the recipe names).
    """

    def __init__(self, recipe: Recipe, run: RunDir, ctx: RunContext, trusted: set[str] | None = None):
        self.recipe, self.run, self.ctx = recipe, run, ctx
        self.trusted = factories(recipe) if trusted is None else trusted
        self.stages: list[tuple[Stage, str]] = []
        self.timings: dict[str, float] = {}
        self.started = False  # whether a stage began running (not just loaded) in this process

    def plan(self, until: str | None = None) -> list[tuple[Stage, str]]:
        """Build the models and check every stage against the model it will get; returns (stage, key) pairs."""
        ctx, started = self.ctx, time.perf_counter()
        for name, ref in self.recipe.models.items():
            check_trusted(ref, self.trusted)
            torch.manual_seed(ctx.seed(f"models.{name}"))
            model = build_model(ref, ctx.splits, self.trusted).to(ctx.device)
            ts_models.check_finite(model, name)
            ts_models.check_forward(model, ctx.example, ctx.splits.num_classes, name)
            key = content_key(ref.model_dump(mode="json"), ctx.seed(f"models.{name}"), ctx.data_key, VERSION,
                              file_digest(ref.weights) if ref.weights else None)
            ctx.outputs[name] = Output(model, key, ref.label or name, weights=ref.weights is not None)
        for config in self.recipe.stages:
            if config.id == until:
                break
            stage = STAGES[config.kind](config, config.id, config.input)
            planned = stage.plan(ctx, ctx.get(stage.input_name).model)
            key = content_key(config.to_dict(), [ctx.get(n).key for n in stage.inputs(ctx)], ctx.data_key, VERSION,
                              self.recipe.seed, self.recipe.precision, ctx.device.type)
            if stage.produces_model:
                ctx.outputs[stage.id] = Output(planned, key, config.label or stage.id, stage=stage)
            self.stages.append((stage, key))
        log(f"plan: {len(self.stages)} stages checked in {time.perf_counter() - started:.1f}s: "
            + " → ".join(f"{s.id} ({s.kind})" for s, _ in self.stages))
        return self.stages

    def _store_models(self) -> None:
        """The models entries' own files (bytes on disk in the report, a start for every stage)."""
        for name, out in list(self.ctx.outputs.items()):
            if out.stage is None:
                entry = self.ctx.store.entry(f"model_{name}", out.key)
                if self.ctx.dist.is_main and not entry.is_done():
                    self._save(out.model, entry.model_path, name)
                    entry.write_result({"records": [], "report": {}, "files": []})
                out.file = entry.model_path
                if self.ctx.dist.is_main:
                    self.ctx.store.place(entry.model_path, self.run.model(name))
        barrier(self.ctx.dist)

    def _save(self, model: nn.Module, path: Any, stage: str) -> None:
        ts_export.save(model, path, input_shape=list(self.ctx.splits.input_shape),
                       metadata={"stage": stage, "recipe": self.recipe.name})

    def _load(self, path: Any) -> nn.Module:
        factory = (ts_export.read_metadata(path).get("spec") or {}).get("factory")
        if factory is not None and factory not in self.trusted:
            raise ConfigError(f"stored model {path} names user code {factory!r}: pass --factory {factory} to trust it")
        return ts_export.load(path, factory=factory).to(self.ctx.device)

    def run_stage(self, stage: Stage, key: str) -> StageResult:
        """Load the stage's stored output, or run the stage and store it."""
        ctx, entry = self.ctx, self.ctx.store.entry(stage.id, key)
        source = ctx.get(stage.input_name)
        if not ctx.done(entry):
            # Another process producing the same output: wait for it. Under torchrun rank 0 alone
            # locks (the others are needed for its collectives) and tells them whether to run.
            with ctx.store.producing(entry) if ctx.dist.is_main else contextlib.nullcontext():
                if broadcast_object(not entry.is_done(), ctx.dist):
                    log(f"{stage.id}: running ({stage.kind})")
                    self.started = True
                    ctx.entry, started = entry, time.perf_counter()
                    result = stage.run(ctx, copy.deepcopy(source.model).to(ctx.device))
                    if ctx.dist.is_main:
                        if stage.produces_model:
                            self._save(result.model, entry.model_path, stage.id)
                        live = {id(r) for r in ctx.live}  # records the stage logged as it ran, once each
                        records = ctx.live + [r for r in result.records if id(r) not in live]
                        entry.write_result({"records": records, "report": result.report,
                                            "files": result.files, "seconds": time.perf_counter() - started})
            barrier(ctx.dist)
        else:
            log(f"{stage.id}: done before, loading it from the store ({entry.root})")
        stored = entry.read_result()
        model = self._load(entry.model_path) if stage.produces_model else source.model
        result = StageResult(model, stored["records"], stored["report"], stored["files"], stage.produces_model)
        ctx.commit(result.records)
        if stage.produces_model:
            ctx.outputs[stage.id] = Output(model, key, stage.config.label or stage.id, entry.model_path, stage)
            if ctx.dist.is_main:
                ctx.store.place(entry.model_path, self.run.model(stage.id))
        for name in result.files if ctx.dist.is_main else []:
            ctx.store.place(entry.files / name, self.run.plot(name) if name.endswith(".png") else self.run.root / name)
        self.timings[stage.id] = stored.get("seconds", 0.0)
        return result

    def execute(self) -> dict[str, Any]:
        """Plan, run every stage, write the report; returns the summary also written to ``summary.json``."""
        started = time.perf_counter()
        stages = self.stages or self.plan()
        self._store_models()
        results = [(stage, self.run_stage(stage, key)) for stage, key in stages]
        summary = {"recipe": self.recipe.name, "dataset": self.recipe.data.dataset,
                   "stages": {s.id: {"kind": s.kind, "report": r.report} for s, r in results},
                   "rows": next((r.report["rows"] for s, r in reversed(results) if s.kind == "evaluate"), []),
                   "timings_s": {**self.timings, "total": time.perf_counter() - started}}
        if self.ctx.dist.is_main:
            write_outputs(self.run, self.recipe, summary, self.ctx.records, results)
        log(f"done in {summary['timings_s']['total']:.0f}s: {self.run.root / 'report.md'}")
        return summary
