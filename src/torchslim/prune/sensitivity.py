"""Sensitivity analysis: prune each layer alone at a sweep of sparsities, measure accuracy.

:func:`sensitivity_analysis` leaves the model exactly as it found it (same
parameter objects, bit-identical values, same masks) and returns a
:class:`SensitivityResult`: a markdown table, a PNG plot, a JSON-able dict,
and :meth:`SensitivityResult.layer_sparsities`, which turns the curves into
per-layer sparsities for a global target ("prune the robust layers more").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import Field, field_validator, model_validator

from torchslim.config import Config
from torchslim.errors import ConfigError
from torchslim.prune.importance import compute_scores
from torchslim.prune.masking import layer_prune_count, mask_by_count
from torchslim.prune.masks import get_mask, is_masked
from torchslim.prune.unstructured import UnstructuredPruning, importance_context, pruning_layers


class SensitivityConfig(Config):
    """What a sensitivity analysis sweeps.

    Attributes:
        sparsities: the sparsities each layer is pruned to, alone, strictly increasing in (0, 1).
        pruning: the criterion (``criterion``, ``structural``, ``taylor_*``, ``seed``) and the
            layers (``layer_types``, ``include``, ``exclude``, ``exclude_first_last``, ``null``
            overrides) to analyse, and ``min_kept``. Its target (``sparsity``, ``scope``,
            non-null overrides) is not used; it must be set by ``sparsity`` (the default).
        max_samples: evaluate on the first this-many validation samples (None: all).
        batch_size: evaluation batch size.

    Example:
        >>> SensitivityConfig(sparsities=[0.5, 0.9]).pruning.criterion  # a layer alone: the same order as |w|
        'lamp'
    """

    sparsities: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98], min_length=1)
    pruning: UnstructuredPruning = Field(default_factory=UnstructuredPruning)
    max_samples: int | None = Field(None, ge=1)
    batch_size: int = Field(1024, ge=1)

    @field_validator("sparsities")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < s < 1.0 for s in v):
            raise ValueError("every sparsity must be in (0, 1)")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("sparsities must be strictly increasing")
        return v

    @model_validator(mode="after")
    def _by_sparsity(self) -> "SensitivityConfig":
        if self.pruning.target != "sparsity":
            raise ValueError(f"pruning must be set by 'sparsity' for a sweep, not by {self.pruning.target!r}")
        return self


@dataclass
class SensitivityResult:
    """Accuracy (and loss) of the model with one layer pruned at a time.

    Attributes:
        criterion: the criterion that ranked the weights (``"l1"``, ``"l1, structural"``, ...).
        sparsities: the sweep.
        baseline: ``{"accuracy", "loss"}`` of the model as given.
        layers: per layer name: ``{"numel", "accuracy": [...], "loss": [...]}``, one entry per sparsity.
        samples: how many validation samples were evaluated.
        min_kept: the minimum kept per layer during the sweep (and for allocation).
    """

    criterion: str
    sparsities: list[float]
    baseline: dict[str, float]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: int = 0
    min_kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``from_dict`` reads it back)."""
        return {"criterion": self.criterion, "sparsities": list(self.sparsities), "baseline": dict(self.baseline),
                "layers": {k: {"numel": v["numel"], "accuracy": list(v["accuracy"]), "loss": list(v["loss"])}
                           for k, v in self.layers.items()},
                "samples": self.samples, "min_kept": self.min_kept}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SensitivityResult":
        """Rebuild a result from :meth:`to_dict`."""
        return cls(criterion=data["criterion"], sparsities=list(data["sparsities"]), baseline=dict(data["baseline"]),
                   layers={k: dict(v) for k, v in data["layers"].items()}, samples=int(data.get("samples", 0)),
                   min_kept=int(data.get("min_kept", 0)))

    def drops(self, name: str) -> list[float]:
        """Accuracy drop (baseline minus accuracy, in [0, 1]) of layer ``name`` at each sparsity."""
        return [self.baseline["accuracy"] - a for a in self.layers[name]["accuracy"]]

    def table(self) -> str:
        """A markdown table: one row per layer, accuracy (%) at each sparsity."""
        head = "| layer | weights | " + " | ".join(f"{100 * s:g}%" for s in self.sparsities) + " |"
        rule = "|---|---:|" + "---:|" * len(self.sparsities)
        rows = [f"| {name} | {v['numel']} | " + " | ".join(f"{100 * a:.2f}" for a in v["accuracy"]) + " |"
                for name, v in self.layers.items()]
        note = (f"Validation accuracy (%) with one layer pruned alone ({self.criterion}); "
                f"unpruned: {100 * self.baseline['accuracy']:.2f}% on {self.samples} samples.")
        return "\n".join([note, "", head, rule, *rows])

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write a PNG of accuracy vs. sparsity, one line per layer; returns the path.

        The file is written atomically (complete or absent, never half-written).
        """
        # A bare Figure renders through the Agg canvas without touching pyplot's global state.
        from matplotlib.figure import Figure

        from torchslim.atomic import atomic_write_with

        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot(1, 1, 1)
        xs = [0.0] + [100 * s for s in self.sparsities]
        for name, v in self.layers.items():
            ax.plot(xs, [100 * self.baseline["accuracy"]] + [100 * a for a in v["accuracy"]], marker="o",
                    markersize=3, label=f"{name} ({v['numel']})")
        ax.axhline(100 * self.baseline["accuracy"], color="grey", linestyle="--", linewidth=1, label="unpruned")
        ax.set_xlabel("sparsity of the one pruned layer (%)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(title or f"Per-layer pruning sensitivity ({self.criterion})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        target = Path(path)
        atomic_write_with(target, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        return target

    def _max_sparsity_within(self, name: str, tolerance: float) -> float:
        """Largest sparsity whose (monotone, interpolated) accuracy drop stays <= ``tolerance``."""
        prev_s, prev_d, worst = 0.0, 0.0, 0.0
        for s, d in zip(self.sparsities, self.drops(name)):
            worst = max(worst, d)  # a later, smaller drop does not undo an earlier one
            if worst > tolerance:
                return prev_s + (tolerance - prev_d) / (worst - prev_d) * (s - prev_s)
            prev_s, prev_d = s, worst
        return prev_s

    def layer_sparsities(self, target: float, *, min_kept: int | None = None) -> dict[str, float]:
        """Per-layer sparsities that prune the robust layers more and total exactly ``target``.

        For a tolerance ``t``, each layer gets the largest sparsity whose accuracy
        drop stays under ``t`` (drops made monotone and interpolated linearly
        between sweep points); ``t`` is bisected until the weight-weighted mean
        sparsity is ``target``. The kept fractions are then scaled by one factor so
        the total is exact (this also reaches targets beyond the sweep), and
        counts are rounded so the layers together remove ``round(target * total)``
        weights. Every layer keeps at least ``min_kept`` weights.

        Args:
            target: global sparsity over the analysed layers, in [0, 1).
            min_kept: minimum kept per layer (default: the analysis's ``min_kept``).

        Returns:
            ``{layer name: sparsity}``; feed it to :meth:`pruning_config`, or to
            ``UnstructuredPruning(overrides=...)`` yourself.
        """
        if not 0.0 <= target < 1.0:
            raise ConfigError(f"target must be in [0, 1), got {target}")
        min_kept = self.min_kept if min_kept is None else min_kept
        names = list(self.layers)
        numel = {n: int(self.layers[n]["numel"]) for n in names}
        total = sum(numel.values())

        def mean_sparsity(tol: float) -> float:
            return sum(numel[n] * self._max_sparsity_within(n, tol) for n in names) / total

        lo, hi = 0.0, max([max(self.drops(n)) for n in names] + [0.0]) + 1e-9
        if mean_sparsity(hi) <= target:
            lo = hi
        else:
            for _ in range(100):
                mid = (lo + hi) / 2
                if mean_sparsity(mid) < target:
                    lo = mid
                else:
                    hi = mid
        keep = {n: 1.0 - self._max_sparsity_within(n, hi) for n in names}

        # One factor on every kept fraction makes the total exact.
        floor = {n: min(1.0, min_kept / numel[n]) for n in names}

        def kept(beta: float) -> float:
            return sum(numel[n] * min(1.0, max(floor[n], beta * keep[n])) for n in names)

        goal = (1.0 - target) * total
        b_lo, b_hi = 0.0, 1.0
        while kept(b_hi) < goal and b_hi < 1e9:
            b_hi *= 2
        for _ in range(200):
            mid = (b_lo + b_hi) / 2
            if kept(mid) < goal:
                b_lo = mid
            else:
                b_hi = mid
        exact = {n: numel[n] * (1.0 - min(1.0, max(floor[n], b_hi * keep[n]))) for n in names}

        # Largest-remainder rounding: integer counts summing to round(target * total).
        caps = {n: numel[n] - min(numel[n], min_kept) for n in names}
        counts = {n: min(caps[n], math.floor(exact[n])) for n in names}
        short = round(target * total) - sum(counts.values())
        for n in sorted(names, key=lambda n: exact[n] - math.floor(exact[n]), reverse=True):
            if short <= 0:
                break
            if counts[n] < caps[n]:
                counts[n] += 1
                short -= 1
        return {n: counts[n] / numel[n] for n in names}

    def pruning_config(self, target: float, base: UnstructuredPruning | None = None) -> UnstructuredPruning:
        """``base`` (default l1) with every analysed layer pinned to its :meth:`layer_sparsities`.

        Example:
            >>> r = SensitivityResult("l1", [0.5, 0.9], {"accuracy": 0.9, "loss": 0.3},
            ...     {"a": {"numel": 100, "accuracy": [0.9, 0.9], "loss": [0.3, 0.3]},
            ...      "b": {"numel": 100, "accuracy": [0.8, 0.5], "loss": [0.6, 0.9]}})
            >>> r.layer_sparsities(0.6)
            {'a': 0.9, 'b': 0.3}
        """
        base = base or UnstructuredPruning()
        sparsities = self.layer_sparsities(target)
        data = {**base.model_dump(), "sparsity": target, "threshold": None, "han_quality": None, "n_m": None,
                "scope": "layer", "overrides": {**base.overrides, **sparsities}}
        return UnstructuredPruning(**data)


def sensitivity_analysis(
    model: nn.Module,
    val: Any,
    config: SensitivityConfig | None = None,
    *,
    data: Any = None,
    objective: Any = None,
    device: str | torch.device = "cpu",
) -> SensitivityResult:
    """Prune each layer alone at each of ``config.sparsities``, measure validation accuracy.

    The model is restored exactly after every measurement: the same parameter
    objects hold bit-identical values, masks are untouched, and BatchNorm
    statistics never move (evaluation runs in eval mode). Layers already
    masked keep their pruned weights pruned.

    Args:
        model: a trained model (masked or not), on ``device``.
        val: the split to measure on (``x``, ``y``); see ``config.max_samples``.
        config: sweep, criterion and layers (default :class:`SensitivityConfig`).
        data: split for gradient criteria (``taylor``, ``snip``); scores come from the
            unpruned model once.
        objective: loss for gradient criteria (default cross-entropy).
        device: where evaluation runs.

    Returns:
        A :class:`SensitivityResult`.

    Example:
        >>> import torch, torchslim as ts
        >>> from types import SimpleNamespace
        >>> from torchslim.prune import SensitivityConfig, sensitivity_analysis
        >>> model = ts.models.create("lenet300_100", input_size=8, hidden1=16, hidden2=8)
        >>> val = SimpleNamespace(x=torch.randn(64, 1, 8, 8), y=torch.arange(64) % 10)
        >>> result = sensitivity_analysis(model, val, SensitivityConfig(sparsities=[0.5, 0.9]))
        >>> list(result.layers)
        ['classifier.0', 'classifier.2', 'classifier.4']
    """
    from torchslim.train.loop import evaluate

    config = config or SensitivityConfig()
    pruning = config.pruning
    chosen = pruning_layers(model, pruning)
    layers = [(n, m) for n, m, _ in chosen]
    context = importance_context(model, pruning, layers, data, objective)
    scores = compute_scores(layers, pruning.criterion, context, structural=pruning.structural)
    if config.max_samples is not None:
        val = _Head(val.x[:config.max_samples], val.y[:config.max_samples])

    def measure() -> dict[str, float]:
        return evaluate(model, val, batch_size=config.batch_size, device=device)

    baseline = measure()
    label = pruning.criterion + (", structural" if pruning.structural else "")
    result = SensitivityResult(criterion=label, sparsities=list(config.sparsities), baseline=baseline,
                               samples=len(val.y), min_kept=pruning.min_kept)
    for (name, module), s in zip(layers, scores):
        previous = get_mask(module)
        param = module.weight_orig if is_masked(module) else module.weight
        saved = param.detach().clone()
        acc, loss = [], []
        try:
            for sparsity in config.sparsities:
                mask = mask_by_count(s, layer_prune_count(s.numel(), sparsity, pruning.min_kept, previous), previous)
                with torch.no_grad():
                    param.copy_(saved * mask.to(saved.dtype))
                m = measure()
                acc.append(m["accuracy"])
                loss.append(m["loss"])
        finally:
            with torch.no_grad():
                param.copy_(saved)
                if is_masked(module):
                    # The pre-hook's cached `weight` was computed from pruned values; refresh it.
                    module.weight = module.weight_orig * module.weight_mask
        result.layers[name] = {"numel": s.numel(), "accuracy": acc, "loss": loss}
    return result


@dataclass
class _Head:
    x: torch.Tensor
    y: torch.Tensor
