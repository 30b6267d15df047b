"""Building and measuring plans: BatchNorm re-estimation, accuracy, end-to-end latency, and the
per-group sensitivity and latency tables that guide the allocation.

Every latency here is an end-to-end run of an exported file (or of the torch module with
``runtime="torch"``), timed in alternation with the dense model so that the ratio holds on a
busy machine; the per-group latency table is NetAdapt's look-up table, and the search reports
how far its additive predictions are from the end-to-end timings of whole plans.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from torchslim.export import export_onnx
from torchslim.measure.counting import count_macs
from torchslim.prune.structured import prune_channels
from torchslim.search.space import GroupChoice, dense_plan, plan_config


#: More runnable threads than cores by this much (1-minute load average) is a busy machine for timing.
BUSY_LOAD_MARGIN = 0.5
#: The dense model's median moving by more than this share between comparisons is noisy timing.
DENSE_SPREAD_WARN = 0.25


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, x: torch.Tensor, batches: int, batch_size: int) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` batches of ``x``, in place.

    A channel cut changes the statistics of the layers after it; without fresh ones a
    pruned model looks far worse than it is, and the sensitivity ranks groups wrongly.
    Only BatchNorm layers run in training mode (dropout stays off), with a cumulative
    average (``momentum=None``) so every batch counts the same; no weight changes.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches == 0:
        return
    was = model.training
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    # A fixed slice, so two builds of one plan get the same statistics.
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)[: batches * batch_size]
    for start in range(0, len(order), batch_size):
        model(x[order[start:start + batch_size]])
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1] (eval mode, restored afterwards)."""
    was = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        correct += int((model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum())
    model.train(was)
    return correct / max(len(y), 1)


@dataclass
class Measurer:
    """Builds plans of one dense model and measures them (shared by the tables and the front).

    Attributes:
        dense: the uncompressed model (never changed).
        groups: the searchable groups.
        space: the :class:`~torchslim.search.SearchSpace`.
        budget: the :class:`~torchslim.search.Budget` (runtime, batch, threads).
        train_x: training inputs, for BatchNorm re-estimation.
        folder: where candidate ONNX files are written (a temporary folder by default).
    """

    dense: nn.Module
    groups: list[GroupChoice]
    space: Any
    budget: Any
    train_x: torch.Tensor
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="torchslim-search-")))
    _dense_file: bytes | None = None
    _count: int = 0
    dense_ms: list[float] = field(default_factory=list)  # the dense model's median in every timed comparison

    @property
    def example(self) -> torch.Tensor:
        return self.train_x[:2]

    def build(self, plan: dict[str, int], *, recalibrate: bool = True) -> nn.Module:
        """The dense model cut as ``plan`` says (a new model), BatchNorm re-estimated unless told not to."""
        full = {**dense_plan(self.groups), **plan}
        model = prune_channels(self.dense, self.example[:1], plan_config(self.groups, full, self.space)).model
        if recalibrate:
            recalibrate_bn_(model, self.train_x, self.space.bn_batches, self.space.bn_batch_size)
        return model.eval()

    def onnx(self, model: nn.Module) -> bytes:
        """The model's fp32 ONNX file, as bytes (TorchScript exporter: 20x faster to export than dynamo here,
        the same graph on these conv/linear models)."""
        self._count += 1
        path = self.folder / f"candidate{self._count}.onnx"
        export_onnx(model, self.example, path, check=False, exporter="torchscript")
        data = path.read_bytes()
        os.unlink(path)
        return data

    def dense_file(self) -> bytes:
        if self._dense_file is None:
            self._dense_file = self.onnx(self.dense.eval())
        return self._dense_file

    def latency(self, model: nn.Module) -> dict[str, float]:
        """End-to-end latency of ``model``, timed in alternation with the dense model, and its size.

        Returns ``{"p50_ms", "p90_ms", "ratio", "bytes"}``: the model's median and p90 in ms at
        the budget's batch, its median over the dense model's median in the same run, and its
        fp32 ONNX bytes (``runtime="ort"``) or fp32 parameter bytes (``runtime="torch"``).
        """
        b = self.budget
        if b.runtime == "ort":
            from torchslim.measure.ort import compare_ort_latency

            data = self.onnx(model)
            t = compare_ort_latency({"dense": self.dense_file(), "cand": data}, self.example[:1],
                                    b.batch, threads=b.threads, budget_s=b.latency_budget_s)
            size = len(data)
        else:
            from torchslim.measure.counting import dense_bytes
            from torchslim.measure.latency import compare_latency

            before = torch.get_num_threads()
            torch.set_num_threads(b.threads)
            try:
                t = compare_latency({"dense": self.dense, "cand": model}, self.example[:1], b.batch,
                                    budget_s=b.latency_budget_s)
            finally:
                torch.set_num_threads(before)
            size = dense_bytes(model)
        self.dense_ms.append(t["dense"]["median_ms"])
        return {"p50_ms": t["cand"]["median_ms"], "p90_ms": t["cand"]["p90_ms"],
                "ratio": t["cand"]["median_ms"] / t["dense"]["median_ms"], "bytes": size}

    def timing_report(self) -> dict[str, Any]:
        """How steady the machine was while points were timed, with warnings a user should read.

        Ratios are timed in alternation with the dense model, so steady load from other processes
        cancels out; bursts and oversubscribed cores do not. Two signs are checked: the 1-minute
        load average against the cores this process may use (more runnable threads than cores
        means the timed runs shared cores), and how far the dense model's own median moved
        between comparisons (the same file every time: the 10th to the 90th percentile).
        """
        ms = sorted(self.dense_ms)
        spread = ms[round(0.9 * (len(ms) - 1))] / ms[round(0.1 * (len(ms) - 1))] - 1 if len(ms) >= 5 else None
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        warnings = []
        if load is not None and load > cpus + BUSY_LOAD_MARGIN:
            warnings.append(f"the machine was busy while points were timed (load average {load:.1f} on {cpus} "
                            f"cores, {self.budget.threads} timing thread(s)): latency ratios may be off by more "
                            "than usual; for figures to rely on, search again on a quiet machine")
        if spread is not None and spread > DENSE_SPREAD_WARN:
            warnings.append(f"the dense model's median latency moved by {100 * spread:.0f}% between comparisons "
                            f"(10th to 90th percentile of {len(ms)}): the machine's speed changed while points were "
                            "timed (other work on the cores); alternated timing cancels slow changes, not bursts "
                            "within one comparison, so re-measure close points on a quiet machine")
        return {"load_average_1m": load, "cpus": cpus, "threads": self.budget.threads, "dense_comparisons": len(ms),
                "dense_median_ms": ms[len(ms) // 2] if ms else None, "dense_spread_p10_p90": spread,
                "warnings": warnings}

    def macs(self, model: nn.Module) -> int:
        """Multiply-accumulates per sample."""
        return count_macs(model, self.example[:1])


@dataclass
class Tables:
    """Per-group, per-kept-count predictions (NetAdapt's tables).

    Attributes:
        dense_accuracy: the dense model's accuracy on the sensitivity subset.
        drop: ``drop[label][keep]``: accuracy points lost when only that group is cut.
        latency: ``latency[label][keep]``: latency change (fraction of the dense model's)
            when only that group is cut.
    """

    dense_accuracy: float
    drop: dict[str, dict[int, float]]
    latency: dict[str, dict[int, float]]

    def predict(self, plan: dict[str, int]) -> tuple[float, float]:
        """Predicted (accuracy drop in points, latency as a fraction of dense).

        Drops add up. Latency changes multiply: a conv whose input group and output group are
        both cut shrinks by the product of the two fractions, so adding the two changes would
        count the shared layer's saving twice (and predicts negative latencies for deep cuts).
        """
        d = sum(self.drop[g][k] for g, k in plan.items() if k in self.drop.get(g, {}))
        t = 1.0
        for g, k in plan.items():
            t *= 1.0 + self.latency.get(g, {}).get(k, 0.0)
        return d, t

    def to_dict(self) -> dict[str, Any]:
        return {"dense_accuracy": self.dense_accuracy,
                "drop": {g: {str(k): v for k, v in d.items()} for g, d in self.drop.items()},
                "latency": {g: {str(k): v for k, v in d.items()} for g, d in self.latency.items()}}


def build_tables(m: Measurer, val_x: torch.Tensor, val_y: torch.Tensor,
                 progress: Callable[[str], None] | None = None) -> Tables:
    """Cut each group alone to each of its kept counts: measured accuracy drop and latency change.

    No fine-tuning: BatchNorm statistics are re-estimated and the validation subset scored,
    which ranks groups cheaply; the latency change is an end-to-end timing of the cut file.
    """
    say = progress or (lambda s: None)
    dense_acc = accuracy(m.dense, val_x, val_y)
    drop: dict[str, dict[int, float]] = {}
    lat: dict[str, dict[int, float]] = {}
    for g in m.groups:
        drop[g.label], lat[g.label] = {g.size: 0.0}, {g.size: 0.0}
        for keep in g.keeps[1:]:
            model = m.build({g.label: keep})
            drop[g.label][keep] = 100.0 * (dense_acc - accuracy(model, val_x, val_y))
            lat[g.label][keep] = m.latency(model)["ratio"] - 1.0
            say(f"sensitivity {g.label}: keep {keep}/{g.size}: drop {drop[g.label][keep]:+.2f} points, "
                f"latency {lat[g.label][keep]:+.1%}")
    return Tables(dense_acc, drop, lat)
