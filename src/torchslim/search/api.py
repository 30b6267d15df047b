"""``search``: find a per-group channel plan under a budget and return the measured Pareto front.

The loop (NetAdapt's tables, a Lagrangian allocation, every reported point measured):

1. sensitivity: each coupled group cut alone to each allowed width, BatchNorm
   re-estimated, scored on a validation subset; its latency change timed end to end;
2. allocation: a Lagrangian sweep over the additive predictions gives a whole set of
   plans in one pass (:mod:`~torchslim.search.allocate`);
3. measurement: every plan is built, BatchNorm re-estimated, exported, timed end to end in
   the budget's runtime (alternating with the dense model) and scored on the whole
   validation split; only those measurements make the front;
4. choice: the front's proxy accuracy (after the cut, or a short trial fine-tune) ranks the
   plans, and a few finalists get the full KD fine-tune from the dense model, exactly as the
   emitted recipe's ``finetune`` stage does it, before the budget picks one
   (:mod:`~torchslim.search.finalists`); the winner is scored once on test.

Precision: with int8 in ``SearchSpace.precision`` (the default when ONNX Runtime's quantization is
installed) every plan measured in step 3, the dense model included, is also quantized to static
int8 and measured as that file (:mod:`~torchslim.search.precision`); those points join the front,
and a chosen int8 plan is fine-tuned in float, then quantized as the recipe's ``quantize`` stage does.

Sparsity and weight sharing: under a size bound (``Budget(size_bytes=...)``) each Conv/Linear layer
also chooses an unstructured sparsity and weight-sharing bits, on the dense model and on channel
plans of the front, from per-layer tables and a Lagrangian sweep over packed bytes; those points
are measured as the packed ``.slim`` file (:mod:`~torchslim.search.packed`) and compete on size
with the fp32 and int8 ONNX files.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from torchslim.errors import ConfigError, TorchSlimError
from torchslim.search.allocate import lagrangian_plans, pick_spread
from torchslim.search.budget import Budget, SearchSpace, feasible, violation
from torchslim.search.finalists import best_within_bound, bisect_drop, drop_candidates, finetune_seed, finish_point, \
    kd_finetune_, recovery_finetune, recovery_kd, score_on_test  # noqa: F401 (finetune_seed, kd_finetune_ re-exported)
from torchslim.search.finetunes import FinetuneStore, finetuned, open_finetune_store
from torchslim.search.front import Point, pareto_front, size_front, write_json
from torchslim.search.precision import int8_config, layer_precision, measure_int8, prefer_fp32_twin, \
    resolve_precision
from torchslim.search.output import chosen_recipe, plot_search, write_outputs
from torchslim.search.packed import cached_packed_tables, packed_points, packed_twin, resolve_axes
from torchslim.search.recipe import FINETUNE_ID, PRUNE_ID, _model_ref, recipe_document  # noqa: F401 (re-exported)
from torchslim.search.sensitivity import Measurer, Tables, accuracy, build_tables
from torchslim.search.space import GroupChoice, channel_groups, dense_plan, global_plan, plan_config, plan_key, \
    uniform_plan



class InfeasibleBudget(TorchSlimError):
    """No measured point meets the budget; ``.front`` holds the measured front, ``.nearest`` the closest points."""

    def __init__(self, message: str, front: list[Point], nearest: list[Point]):
        super().__init__(message)
        self.front, self.nearest = front, nearest


@dataclass
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        front: the Pareto front of the measured points (fastest first).
        points: every measured point (dense, sweep, uniform baselines).
        chosen: the front point the budget picked (before fine-tuning).
        best: the chosen model, fine-tuned (a new ``nn.Module``; float even when the chosen point is
            int8: its int8 file is ``quantized``).
        dense: the dense model's point.
        metrics: of ``best``: ``val_accuracy``, ``test_accuracy`` (None without ``test``), ``val_drop``.
        tables: the per-group sensitivity and latency tables.
        prediction_error: how far the tables' additive predictions were from end-to-end measurements.
        groups: the searched groups.
        recipe: the v2 recipe document that reproduces ``best`` (None without ``recipe_data``).
        seconds: wall time of the search.
        files: the files written in ``out`` (``onnx`` is ``model.onnx``: the int8 file when the chosen
            point is int8, with the float export beside it as ``model.fp32.onnx``).
        quantized: the chosen model's :class:`~torchslim.quant.QuantizedModel` when it is int8, else None.
        size_front: under a size bound, the points no other beats on both accuracy and bytes (smallest
            first; fp32, int8 and packed files alike), shown by ``summary()``; empty otherwise.
        timing: how steady the machine was while points were timed (load average, the dense model's
            spread between comparisons) and its ``warnings``, which ``summary()`` shows
            (:meth:`~torchslim.search.Measurer.timing_report`).
    """

    front: list[Point]
    points: list[Point]
    chosen: Point
    best: nn.Module
    dense: Point
    metrics: dict[str, Any]
    tables: Tables
    prediction_error: dict[str, float]
    groups: list[GroupChoice]
    recipe: dict[str, Any] | None = None
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    quantized: Any = None
    size_front: list[Point] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """A table of the front, the chosen point marked, and the chosen model's final figures."""
        lines = ["| | source | precision | val acc | drop | latency p50 (ms) | p90 | x dense | MACs | bytes |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        # Under a size bound the front that matters is accuracy against bytes (packed and int8 files included).
        front = self.size_front or self.front
        shown = [self.dense, *[q for q in front if q is not self.dense]]
        for p in shown + ([self.chosen] if self.chosen not in shown else []):
            mark = "*" if p is self.chosen else ""
            lines.append(f"| {mark} | {p.source} | {p.precision} | {100 * p.accuracy:.2f} | {p.drop:+.2f} | "
                         f"{p.latency_p50_ms:.2f} | "
                         f"{p.latency_p90_ms:.2f} | {p.latency_ratio:.3f} | {p.macs:,} | {p.bytes:,} |")
        m = self.metrics
        test = f", test {100 * m['test_accuracy']:.2f}%" if m.get("test_accuracy") is not None else ""
        kind = ("int8 file in ONNX Runtime" if m.get("precision") == "int8" else
                f"packed .slim, {m['bytes']:,} bytes" if self.chosen.precision == "packed" else "fp32")
        lines.append(f"chosen plan after fine-tuning ({kind}): val {100 * m['val_accuracy']:.2f}% "
                     f"({m['val_drop']:+.2f} points vs dense){test}; latency {self.chosen.latency_ratio:.3f}x dense")
        if m.get("finalists"):
            lines.append(f"chosen by the full fine-tune of {m['finalists']} finalist(s): "
                         + ("its validation figures decided" if m.get("chosen_by") == "full fine-tune" else
                            "none met the budget, so the proxy's choice stands"))
        e = self.prediction_error
        lines.append(f"latency table vs end-to-end: mean |error| {100 * e['latency_mean_abs']:.1f}% of dense "
                     f"latency (max {100 * e['latency_max_abs']:.1f}%); drop prediction mean |error| "
                     f"{e['drop_mean_abs']:.2f} points")
        lines += [f"warning: {w}" for w in self.timing.get("warnings", [])]
        return "\n".join(lines)


def choose(points: list[Point], budget: Budget, dense: Point) -> Point:
    """The best feasible measured point: fastest within ``max_drop``, else most accurate within the bound.

    Raises:
        InfeasibleBudget: no point meets the budget; the message names the nearest ones.
    """
    ok = [p for p in points if feasible(p, budget, dense)]
    if ok:
        if budget.max_drop is not None:
            return min(ok, key=lambda p: (p.latency_ratio, -p.accuracy))
        return max(ok, key=lambda p: (p.accuracy, -p.latency_ratio))
    front = pareto_front(points)
    nearest = sorted(front, key=lambda p: violation(p, budget, dense))[:3]
    rows = "; ".join(f"{100 * p.accuracy:.2f}% ({p.drop:+.2f} points) at {p.latency_ratio:.3f}x dense latency, "
                     f"{p.bytes:,} bytes, {p.macs / max(dense.macs, 1):.3f}x MACs" for p in nearest)
    raise InfeasibleBudget(f"no measured plan meets the budget ({budget.describe()}); the nearest points of the "
                           f"front are: {rows}. Loosen the budget, or widen the space (smaller keep fractions).",
                           front, nearest)


def search(
    model: nn.Module,
    train: Any,
    val: Any,
    budget: Budget,
    space: SearchSpace | None = None,
    *,
    finetune: Any = None,
    test: Any = None,
    kd: Any = None,
    out: str | Path | None = None,
    recipe_data: dict[str, Any] | None = None,
    recipe_model: dict[str, Any] | None = None,
    seed: int = 0,
    uniform: bool = True,
    trial_finetune: Any = None,
    trial_samples: int | None = None,
    trials: int = 0,
    finalists: int = 3,
    study: Any = None,
    store: str | Path | None = None,
    on_study_ready: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search per-group channel widths of ``model`` under ``budget``; every reported point is measured.

    Args:
        model: a trained, torch.fx-traceable classifier (not changed).
        train: training split (``x``, ``y``): BatchNorm re-estimation and the final fine-tune.
        val: validation split: the sensitivity subset and every point's accuracy.
        budget: what to achieve (:class:`Budget`).
        space: what may change (:class:`SearchSpace`; default: keep 100/75/50/37.5/25% per group,
            precision fp32 and int8 when ONNX Runtime's quantization is installed).
        finetune: the chosen plan's KD fine-tune (a :class:`torchslim.TrainConfig`; None or 0
            epochs: the point as measured, BatchNorm re-estimated).
        test: test split: the chosen model is scored on it once.
        kd: the fine-tunes' :class:`torchslim.DistillConfig` (default
            :func:`~torchslim.search.finalists.recovery_kd`: Hinton KD at T = 2, alpha = 0.5).
        out: a folder for ``pareto.json``, ``pareto.png``, ``model.slim``, ``model.onnx`` (the
            int8 file when an int8 point is chosen, the float export then ``model.fp32.onnx``),
            ``dense.slim``, ``recipe.yaml``, the stage-one cache ``search_cache.json`` (the
            tables and the sweep's points, reused by a later search with the same settings)
            and, with trials, the study (``study.journal``) and ``trials.jsonl``.
        recipe_data: the recipe's ``data`` section that gives back these splits (e.g.
            ``{"dataset": "digits", "val_fraction": 0.1}``); without it no recipe is written.
        recipe_model: the recipe's model entry (default: the model's preset and args, weights
            ``dense.slim`` written beside the recipe).
        seed: the recipe's seed (the fine-tune uses the seed the pipeline derives from it).
        uniform: also measure the uniform plans (one keep fraction in every group), the baseline.
        trial_finetune: a short KD fine-tune (a :class:`torchslim.TrainConfig`) given to every
            candidate from the dense model before its accuracy is measured, so the front ranks
            plans by what they recover to rather than by their accuracy right after the cut
            (default None: BatchNorm re-estimation only, the cheap proxy; with ``trials`` > 0
            the default is ``TrainConfig(epochs=1)``, as every point of one front must be
            measured the same way).
        trial_samples: training samples of each trial fine-tune (default: all of ``train``;
            with ``trials`` > 0: 2000).
        trials: Optuna trials refining the front (:mod:`~torchslim.search.study`; needs
            ``pip install 'torchslim[search]'``); 0: the Lagrangian front alone. Counted over
            the whole study: a search resumed on the same ``out`` (or storage) runs only the
            trials it still lacks, and other processes (:func:`search_worker`) may run some.
        finalists: how many front points get the full ``finetune`` before the choice
            (:mod:`~torchslim.search.finalists`): under ``max_drop`` a bracketing search, by
            measured latency, over the points faster than the proxy's choice on the front or within
            ``PROXY_NOISE`` (0.5) proxy points of it (the middle first, then where the measured
            drops cross the budget), and the fastest
            within the drop on validation after the full fine-tune wins; under a bound, the
            ``finalists`` most accurate feasible points, and the best after the fine-tune wins.
            0 (or no ``finetune``): the front's proxy accuracy decides alone.
        study: where the study lives and how it samples (:class:`~torchslim.search.StudyConfig`).
        store: a folder that keeps every trial and finalist fine-tune, keyed by content
            (:mod:`~torchslim.search.finetunes`): a resumed search loads the finished ones, and
            searches of one model given the same ``store`` share them whatever their budgets
            (default ``out/store``; without ``out``, nothing is kept).
        on_study_ready: called once the study exists and holds the stage-one points, before any
            trial runs (the CLI starts its extra worker processes there).
        progress: called with one line per evaluated candidate and per trial (e.g. ``print``).

    Returns:
        A :class:`SearchResult` (``.front``, ``.best``, ``.chosen``, ``.summary()``).

    Raises:
        InfeasibleBudget: no measured point meets the budget (the files are still written).
        ModelError: the model cannot be traced.
        ConfigError: ``trials`` > 0 without Optuna, ``finalists`` < 0, or a study in ``out`` made with
            other settings.

    Example:
        A few seconds on 2 cores (tests/test_search.py runs searches like it)::

            import torchslim as ts
            from torchslim.search import Budget, SearchSpace, search
            splits = ts.data.load_dataset("digits")
            model = ts.models.create("fmnist_teacher", input_size=8, width=8, fc=32)
            space = SearchSpace(keep=[1.0, 0.5], exclude=["re:features.*"], bn_batches=1, max_candidates=1)
            r = search(model, splits.train, splits.val, Budget(latency=1.0, batch=16), space, uniform=False)
            assert r.chosen.latency_ratio <= 1.0 and [g.label for g in r.groups] == ["classifier.0"]
    """
    start = time.time()
    space = space or SearchSpace()
    say = progress or (lambda s: None)
    folder = Path(out) if out is not None else None
    if finalists < 0:
        raise ConfigError(f"finalists must be >= 0 (0: the proxy accuracy decides alone), got {finalists}")
    kd = kd if kd is not None else recovery_kd()  # resolved here so the emitted recipe names it
    run = _prepare(model, train, val, budget, space, kd, seed, uniform, trial_finetune, trial_samples, trials, study)
    run.finetunes = open_finetune_store(store, folder, run.m.dense, space)
    m, groups = run.m, run.groups
    dense, tables, points = _stage_one(run, folder, say)
    if trials > 0:
        points = points + _refine(run, dense, tables, points, trials, folder, say, wait=True,
                                  on_ready=on_study_ready)[0]
    swept = [p for p in points if p.source != "dense" and p.precision == "fp32"]  # int8 points have no prediction
    lat_err = [abs(p.predicted_latency - p.latency_ratio) for p in swept]
    drop_err = [abs(p.predicted_drop - p.drop) for p in swept]
    error = {"latency_mean_abs": sum(lat_err) / max(len(lat_err), 1), "latency_max_abs": max(lat_err, default=0.0),
             "drop_mean_abs": sum(drop_err) / max(len(drop_err), 1), "points": len(swept)}
    # The front is accuracy against latency; packed points are never faster than their channel
    # plan (dense kernels), so they serve a size bound only (chosen among every point, below).
    front = pareto_front([p for p in points if p.precision != "packed"])
    trial = run.trial
    payload: dict[str, Any] = {"budget": budget.to_dict(), "space": space.to_dict(), "dense": dense.to_dict(),
                               "groups": [g.__dict__ for g in groups], "tables": tables.to_dict(),
                               "prediction_error": error, "points": [p.to_dict() for p in points],
                               "front": [p.to_dict() for p in front], "trials": trials,
                               "precision": list(run.precision),
                               "accuracy_measured": "after a trial KD fine-tune" if trial is not None else
                               "after the cut and BatchNorm re-estimation, no fine-tune",
                               "timing": m.timing_report()}
    for w in payload["timing"]["warnings"]:
        say(f"warning: {w}")
    if run.packed_tables:
        payload["packed_tables"] = [t.to_dict() for t in run.packed_tables]
    if budget.size_bytes is not None:  # accuracy against bytes, every point (int8 and packed files included)
        payload["size_front"] = [p.to_dict() for p in size_front(points)]
    # The front is accuracy against latency: the smallest files (int8 ones that are not faster), or a
    # plan under a MACs bound timed slower than the dense model, need not be on it; those bounds choose
    # among every measured point.
    pool = points if budget.size_bytes is not None or budget.macs is not None else front
    try:
        proxy: Point | None = prefer_fp32_twin(choose(pool, budget, dense), points, budget)
        infeasible = None
    except InfeasibleBudget as exc:
        proxy, infeasible = None, exc
    evaluate = lambda p: finish_point(run, p, train, val, finetune, kd, seed)  # noqa: E731
    winner, tried = _finalists(run, pool, points, front, dense, proxy, finetune, finalists, evaluate, say)
    payload["finalists"] = [f.record() for f in tried]
    if winner is None and proxy is None:
        assert infeasible is not None
        if tried:
            near = "; ".join(f"{100 * f.metrics['val_accuracy']:.2f}% ({f.metrics['val_drop']:+.2f} points) at "
                             f"{f.point.latency_ratio:.3f}x" for f in tried)
            infeasible = InfeasibleBudget(f"{infeasible} After the full fine-tune the finalists were: {near}.",
                                          infeasible.front, infeasible.nearest)
        if folder is not None:
            write_json(folder / "pareto.json", {**payload, "chosen": None, "infeasible": str(infeasible)})
            plot_search(folder / "pareto.png", points, front, None, budget, payload)
        raise infeasible
    if winner is not None:
        chosen, best_model, metrics, quantized = winner.point, winner.model, winner.metrics, winner.quantized
    else:
        assert proxy is not None
        chosen = proxy
        best_model, metrics, quantized = evaluate(proxy)
    metrics = {**metrics, **score_on_test(best_model, quantized, test, budget.threads),
               "chosen_by": "full fine-tune" if winner is not None else "proxy", "finalists": len(tried)}
    if chosen.source == "dense":
        finetune = None  # the dense model is returned as it is, so its recipe must not fine-tune it either
    recipe = None
    files: dict[str, str] = {}
    if folder is not None:
        files = write_outputs(folder, m, model, best_model, chosen, points, front, payload, metrics, budget, space,
                              finetune, kd, seed, recipe_data, recipe_model, groups, quantized)
        recipe = files.pop("_recipe", None)  # type: ignore[assignment]
    elif recipe_data is not None:
        recipe = chosen_recipe(model, chosen, groups, space, budget, finetune, kd, seed, recipe_data, recipe_model,
                               quantized)
    return SearchResult(front, points, chosen, best_model, dense, metrics, tables, error, groups,
                        recipe, time.time() - start, files, quantized,
                        size_front(points) if budget.size_bytes is not None else [], payload["timing"])


def search_worker(model: nn.Module, train: Any, val: Any, budget: Budget, space: SearchSpace | None = None, *,
                  trials: int, out: str | Path | None = None, study: Any = None, kd: Any = None, seed: int = 0,
                  uniform: bool = True, trial_finetune: Any = None, trial_samples: int | None = None,
                  store: str | Path | None = None, progress: Callable[[str], None] | None = None,
                  wait_s: float = 3600.0) -> int:
    """Help a running :func:`search` with its Optuna trials: pull trials until the study has ``trials`` finished.

    Give the arguments the search was started with (the study refuses other settings). The
    worker reads the stage-one tables and points from the study (waiting up to ``wait_s`` for
    the search to put them there), so it needs only the storage: the run folder's journal on
    this machine, or ``study.storage`` (a database URL) from any machine. It returns when no
    trial is left to start; the search itself picks, fine-tunes and writes the result.

    ``store`` (default ``out/store``) is where the trial fine-tunes are kept: give the search's.

    Returns:
        How many trials this worker ran.
    """
    space = space or SearchSpace()
    say = progress or (lambda s: None)
    folder = Path(out) if out is not None else None
    if trials < 1:
        raise ConfigError(f"a search worker needs trials >= 1 (the study's total), got {trials}")
    run = _prepare(model, train, val, budget, space, kd, seed, uniform, trial_finetune, trial_samples, trials, study)
    run.finetunes = open_finetune_store(store, folder, run.m.dense, space)
    from torchslim.search.study import wait_for_stage_one

    dense, tables, points = wait_for_stage_one(run.study_cfg, folder, run.key, wait_s, say)
    if folder is not None and any(run.packed_axes):  # a worker beside the run folder measures packed twins too
        run.packed_tables = cached_packed_tables(folder, run.key)
    return _refine(run, dense, tables, points, trials, folder, say, wait=False, on_ready=None, create=False)[1]


@dataclass
class _Run:
    """What one search (or worker) measures with: the measurer, the trial fine-tune, the settings' key."""

    m: Measurer
    groups: list[GroupChoice]
    val: Any
    budget: Budget
    space: SearchSpace
    kd: Any
    seed: int
    uniform: bool
    trial: Any
    trial_train: Any
    key: str
    study_cfg: Any
    trials: int = 0
    dense_acc: float = 0.0
    precision: tuple[str, ...] = ("fp32",)
    last_model: Any = None  # the model the last measure() built, for its int8 twin
    int8_cfg: Any = None  # how every int8 twin is made (set in stage one: the per-layer sweep's exclude)
    packed_axes: tuple[list[float], list[int]] = ([], [])  # the sparsity and bits choices (both empty: off)
    packed_tables: list[Any] = field(default_factory=list)
    finetunes: FinetuneStore | None = None  # where trial and finalist fine-tunes are kept (None: nowhere)

    def measure(self, plan: dict[str, int], source: str, tables: Tables | None, dense: Point | None) -> Point:
        """Build ``plan`` from the dense model (trial KD fine-tune, else BatchNorm re-estimation) and measure it."""
        m, trial = self.m, self.trial
        if source == "dense":
            built = m.dense
        elif trial is not None:
            built = finetuned(self, plan, "trial", self.trial_train, None, trial, finetune_seed(self.seed, "trial"),
                              self.kd).eval()
        else:
            built = m.build(plan)
        self.last_model = built
        acc = accuracy(built, self.val.x, self.val.y)
        lat = m.latency(built)
        pred = tables.predict(plan) if tables is not None and source != "dense" else (None, None)
        return Point(dict(plan), source, acc, 100 * (self.dense_acc - acc), lat["p50_ms"], lat["p90_ms"],
                     1.0 if source == "dense" else lat["ratio"], lat["bytes"], m.macs(built), pred[0], pred[1],
                     self.budget.batch, self.budget.runtime,
                     {"trial_finetune_epochs": trial.epochs if trial is not None and source != "dense" else 0})

    def measure_int8(self, twin: Point, model: nn.Module | None = None) -> Point:
        """``model`` (default: the last one measured) quantized to int8 and measured as that file
        (see :mod:`~torchslim.search.precision`)."""
        built = model if model is not None else self.last_model
        return measure_int8(self.m, built, twin, self.int8_cfg, self.m.train_x, self.val, self.dense_acc, self.budget)


def _prepare(model: nn.Module, train: Any, val: Any, budget: Budget, space: SearchSpace, kd: Any, seed: int,
             uniform: bool, trial_finetune: Any, trial_samples: int | None, trials: int, study: Any) -> _Run:
    from torchslim.search.study import StudyConfig, require_optuna, settings_key

    if trials < 0:
        raise ConfigError(f"trials must be >= 0 (0: no Optuna refinement), got {trials}")
    if trials > 0:
        require_optuna()  # before anything is measured
        if trial_finetune is None:
            from torchslim.train import TrainConfig

            trial_finetune = TrainConfig(epochs=1)
        trial_samples = 2000 if trial_samples is None else trial_samples
    groups = channel_groups(model, train.x[:1], space)
    if not groups:
        raise ConfigError("no channel group of this model can be searched (all excluded, frozen or too small)")
    m = Measurer(copy.deepcopy(model).eval(), groups, space, budget, train.x)
    # Resolved here so that the settings key (stage-one cache, study) names what the trials train with.
    trial = recovery_finetune(trial_finetune) if trial_finetune is not None and trial_finetune.epochs > 0 else None
    precision = resolve_precision(space, budget, trials)  # before anything is measured
    packed_axes = resolve_axes(space, budget)
    key = settings_key(model, train, val, budget, space, kd, seed, uniform, trial, trial_samples)
    run = _Run(m, groups, val, budget, space, kd, seed, uniform, trial, _subset(train, trial_samples), key,
               study or StudyConfig(), trials, precision=precision, packed_axes=packed_axes)
    run.dense_acc = accuracy(m.dense, val.x, val.y)
    return run


def _stage_one(run: _Run, folder: Path | None, say: Callable[[str], None]) -> tuple[Point, Tables, list[Point]]:
    """The dense point, the per-group tables and the sweep's (and uniform) points: from the cache if it matches."""
    from torchslim.search.study import load_stage_one, save_stage_one

    cached = load_stage_one(folder, run.key) if folder is not None else None
    if cached is None and run.trials > 0:
        from torchslim.search.study import peek_stage_one

        cached = peek_stage_one(run.study_cfg, folder, run.key)
    if cached is not None:
        dense, tables, points = cached
        d8 = [p for p in points if p.precision == "int8" and p.source == "dense"]
        if d8:  # the int8 twins' settings, the per-layer sweep's choice included
            run.int8_cfg = int8_config(run.space).model_copy(
                update={"exclude": tuple(d8[0].extra["int8"]["excluded"])})
        if folder is not None and any(run.packed_axes):  # the cache is read again only when they can exist
            run.packed_tables = cached_packed_tables(folder, run.key)
        say(f"stage one (tables, {len(points) - 1} measured points) reused from the run folder / study")
        return dense, tables, points
    m, groups, space, budget = run.m, run.groups, run.space, run.budget
    dense = run.measure(dense_plan(groups), "dense", None, None)
    say(f"dense: val {100 * run.dense_acc:.2f}%, {dense.latency_p50_ms:.2f} ms at batch {budget.batch} "
        f"({budget.runtime}, {budget.threads} thread(s)); {len(groups)} groups: "
        + ", ".join(f"{g.label} {g.keeps}" for g in groups))
    n = min(space.sensitivity_samples, len(run.val.y))
    tables = build_tables(m, run.val.x[:n], run.val.y[:n], say)
    dense_key = plan_key(dense_plan(groups))
    plans = [p for p in lagrangian_plans(groups, tables, space.lambdas) if plan_key(p) != dense_key]
    todo = [(p, "sweep") for p in pick_spread(plans, tables, space.max_candidates)]
    for f in sorted({f for f in space.keep if f < 1}, reverse=True):  # the peers' global ranking, as candidates
        g = global_plan(m.dense, m.example[:1], groups, f, space)
        if plan_key(g) not in {plan_key(p) for p, _ in todo} | {dense_key}:
            todo.append((g, "global"))
    if run.uniform:
        for f in sorted(set(space.keep), reverse=True):
            u = uniform_plan(groups, f, space.round_to)
            if f < 1 and plan_key(u) != dense_key:
                todo.append((u, "uniform"))  # measured even when the sweep chose it too: the baseline curve
    points = [dense]
    int8 = "int8" in run.precision
    if int8:
        run.int8_cfg = int8_config(space)
        if space.int8_layers == "sweep":
            run.int8_cfg, why = layer_precision(m, run.int8_cfg, m.train_x, run.val, budget, n)
            say("per-layer precision (dense model, batch {}): float {}; {}".format(
                budget.batch, list(run.int8_cfg.exclude) or "none", "; ".join(f"{k}: {v}" for k, v in why.items())))
        points.append(_say_int8(run.measure_int8(dense, m.dense), say, "dense model as int8"))
    start = loop_start = time.time()
    for i, (plan, source) in enumerate(todo, 1):
        p = run.measure(plan, source, tables, dense)
        if "fp32" in run.precision:  # with int8 alone the fp32 file is timed only as the int8 file's source
            points.append(p)
        p8 = run.measure_int8(p) if int8 else None
        if p8 is not None:
            points.append(p8)
        ok = [q for q in points if feasible(q, budget, dense)]
        best = (min(ok, key=lambda q: q.latency_ratio) if budget.max_drop is not None
                else max(ok, key=lambda q: q.accuracy)) if ok else None
        say(f"[{i}/{len(todo)}] {source:7s} val {100 * p.accuracy:6.2f}% ({p.drop:+.2f} pts, predicted "
            f"{p.predicted_drop:+.2f}) latency {p.latency_ratio:.3f}x (predicted {p.predicted_latency:.3f}x) "
            f"{p.latency_p50_ms:.2f} ms | best feasible: "
            + (f"{100 * best.accuracy:.2f}% at {best.latency_ratio:.3f}x" if best else "none yet")
            + f" | {time.time() - start:.0f}s, about {(time.time() - loop_start) / i * (len(todo) - i):.0f}s left")
        if p8 is not None:
            _say_int8(p8, say)
    if any(run.packed_axes):
        points += packed_points(run, dense, points, say)
    if folder is not None:
        save_stage_one(folder, run.key, dense, tables, points, [t.to_dict() for t in run.packed_tables])
    return dense, tables, points


def _refine(run: _Run, dense: Point, tables: Tables, points: list[Point], trials: int, folder: Path | None,
            say: Callable[[str], None], *, wait: bool, on_ready: Callable[[], None] | None,
            create: bool = True) -> tuple[list[Point], int]:
    """Run the study's trials (this process's share): every finished trial's point, and how many ran here."""
    from torchslim.search import study as st

    # Trials sample fp32 channel plans: an int8 point is neither a seed nor a duplicate of a trial, but
    # each trial's model is also measured as int8 (with that precision) and that point joins the front.
    shown, points = points, [p for p in points if p.precision == "fp32"]
    front = pareto_front(points)
    space = st.Space.around(run.groups, front, run.study_cfg.radius)
    seeds = st.seeds_for(points, space, run.budget, dense)
    # Each process samples with its own seed: with one seed two workers would propose the same plans.
    sampler_seed = run.seed if wait else run.seed + os.getpid()
    study = st.open_study(run.study_cfg, folder, run.key, sampler_seed, ["maximize", "minimize"], seeds, space,
                          stage_one=(dense, tables, points), create=create)
    if on_ready is not None:
        on_ready()
    measure = lambda plan: run.measure(plan, "trial", tables, dense)  # noqa: E731
    int8 = "int8" in run.precision
    packed = bool(run.packed_tables) and run.budget.size_bytes is not None  # a trial's packed file too (size bounds)

    def twins(p: Point) -> list[Point]:
        model = run.last_model
        out = [_say_int8(run.measure_int8(p, model), say)] if int8 else []
        q = packed_twin(run, model, p) if packed else None
        return out + ([_say_int8(q, say, "packed file of that model")] if q is not None else [])

    ran = st.refine(study, space, trials, measure, run.budget, dense, points, folder, say, wait=wait,
                    poll_s=run.study_cfg.poll_s, twins=twins if int8 or packed else None, shown=shown)
    found = st.trial_points(study)
    say(f"study {run.study_cfg.study_name!r}: this process ran {ran} trial(s); {len(found)} distinct trial points")
    return found, ran


def _say_int8(p: Point, say: Callable[[str], None], label: str = "int8 of that plan") -> Point:
    say(f"        {label}: val {100 * p.accuracy:6.2f}% ({p.drop:+.2f} pts) latency {p.latency_ratio:.3f}x "
        f"{p.latency_p50_ms:.2f} ms, {p.bytes:,} bytes")
    return p


def _subset(split: Any, n: int | None) -> Any:
    """The first ``n`` samples of a split (the whole split when ``n`` is None or larger)."""
    if n is None or n >= len(split.y):
        return split
    if dataclasses.is_dataclass(split):
        return dataclasses.replace(split, x=split.x[:n], y=split.y[:n])
    return types.SimpleNamespace(x=split.x[:n], y=split.y[:n])


def _finalists(run: _Run, pool: list[Point], points: list[Point], front: list[Point], dense: Point,
               proxy: Point | None, finetune: Any, k: int, evaluate: Callable[[Point], Any],
               say: Callable[[str], None]) -> tuple[Any, list[Any]]:
    """The choice checked with the full fine-tune (:mod:`~torchslim.search.finalists`): winner and probes."""
    if k < 1 or finetune is None or finetune.epochs < 1:
        return None, []
    budget = run.budget
    if budget.max_drop is not None:
        return bisect_drop(drop_candidates(front, points, proxy), budget.max_drop, evaluate, k, say)
    if proxy is None or proxy.source == "dense":
        return None, []  # nothing fits, or the dense model itself does
    return best_within_bound([p for p in pool if feasible(p, budget, dense)], evaluate, k, say)
