"""What a report says about pruning: one line on the method, one table of layers."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from torchslim.prune.iterative import IterativeSchedule
from torchslim.prune.magnitude import MagnitudePruning, as_unstructured
from torchslim.prune.masks import global_sparsity, layer_sparsity, masked_layers
from torchslim.prune.schedule import AGPSchedule
from torchslim.prune.unstructured import UnstructuredPruning

_CRITERION_TEXT = {
    "l1": "weight magnitude |w| (L1)",
    "l2": "weight magnitude w² (L2)",
    "lamp": "LAMP, layer-adaptive magnitude w² / Σ larger w² (Lee et al. 2021)",
    "taylor": "first-order Taylor |w·∂L/∂w|",
    "snip": "SNIP connection sensitivity",
    "random": "random scores (control)",
}


def _pct(x: float) -> str:
    return f"{100 * x:.4g}%"


def describe_pruning(
    pruning: UnstructuredPruning | MagnitudePruning,
    schedule: AGPSchedule | IterativeSchedule | None = None,
) -> str:
    """One sentence naming criterion, selection, scope and schedule.

    Args:
        pruning: the config that was applied.
        schedule: :class:`AGPSchedule` (gradual), :class:`IterativeSchedule`
            (prune -> retrain rounds) or None (one-shot).

    Example:
        >>> from torchslim.prune import UnstructuredPruning, AGPSchedule
        >>> describe_pruning(UnstructuredPruning(sparsity=0.9, exclude_first_last=True),
        ...                  AGPSchedule(final_sparsity=0.9, end_step=1000, frequency=10))  # doctest: +NORMALIZE_WHITESPACE
        'Criterion: LAMP, layer-adaptive magnitude w² / Σ larger w² (Lee et al. 2021); selection: 90% sparsity
        ranked globally, at least 1 weight kept per layer, first and last layers excluded; schedule: gradual (AGP, Zhu & Gupta) from 0% to 90% over
        steps 0-1000, masks updated every 10 steps.'
    """
    cfg = as_unstructured(pruning) if isinstance(pruning, MagnitudePruning) else pruning
    crit = _CRITERION_TEXT.get(cfg.criterion, f"user criterion {cfg.criterion!r}")
    if cfg.criterion in ("taylor", "snip"):
        crit += f" over {cfg.taylor_batches} batches of {cfg.taylor_batch_size}"
    if cfg.structural:
        crit += ", averaged per output unit (structural)"
    if cfg.target == "sparsity":
        sel = f"{_pct(cfg.sparsity)} sparsity " + ("ranked globally" if cfg.scope == "global" else "in every layer")
    elif cfg.target == "threshold":
        sel = f"scores below {cfg.threshold:g} removed"
    elif cfg.target == "han_quality":
        sel = f"Han et al.'s rule, |w| < {cfg.han_quality:g}·std(w) removed per layer"
        crit = "weight magnitude"
    else:
        sel = f"{cfg.n_m[0]}:{cfg.n_m[1]} semi-structured (N of every M inputs kept)"
    parts = [sel]
    if cfg.n_m is None and cfg.min_kept > 0:
        parts.append(f"at least {cfg.min_kept} weight{'s' if cfg.min_kept != 1 else ''} kept per layer")
    if cfg.exclude_first_last:
        parts.append("first and last layers excluded")
    if cfg.exclude:
        parts.append("excluded: " + ", ".join(cfg.exclude))
    if cfg.include:
        parts.append("only: " + ", ".join(cfg.include))
    if cfg.overrides:
        parts.append("overrides: " + ", ".join(f"{k}={'unpruned' if v is None else _pct(v)}"
                                               for k, v in cfg.overrides.items()))
    if schedule is None:
        sched = "one-shot"
    elif isinstance(schedule, AGPSchedule):
        sched = (f"gradual (AGP, Zhu & Gupta) from {_pct(schedule.initial_sparsity)} to "
                 f"{_pct(schedule.final_sparsity)} over steps {schedule.start_step}-{schedule.end_step}, "
                 f"masks updated every {schedule.frequency} steps")
    else:
        sched = f"iterative, {schedule.rounds} prune→retrain rounds ({schedule.ramp} ramp)"
        if schedule.rewind_epoch is not None:
            sched += f", weights rewound to epoch {schedule.rewind_epoch} of round 1"
    return f"Criterion: {crit}; selection: {', '.join(parts)}; schedule: {sched}."


def sparsity_table(model: nn.Module, layers: list[tuple[str, nn.Module]] | None = None) -> str:
    """A markdown table of per-layer sparsity (default: the masked layers, else every Linear/Conv).

    Example:
        >>> import torch.nn as nn
        >>> print(sparsity_table(nn.Sequential(nn.Linear(2, 2))))
        | layer | weights | zeros | sparsity |
        |---|---:|---:|---:|
        | 0 | 4 | 0 | 0.00% |
        | **total** | 4 | 0 | 0.00% |
    """
    if layers is None:
        layers = masked_layers(model) or None
    stats = layer_sparsity(model, layers)
    rows = ["| layer | weights | zeros | sparsity |", "|---|---:|---:|---:|"]
    for name, s in stats.items():
        rows.append(f"| {name} | {s['total']} | {s['zeros']} | {100 * s['sparsity']:.2f}% |")
    total = sum(s["total"] for s in stats.values())
    zeros = sum(s["zeros"] for s in stats.values())
    rows.append(f"| **total** | {total} | {zeros} | {100 * zeros / max(total, 1):.2f}% |")
    return "\n".join(rows)


def pruning_summary(
    model: nn.Module,
    pruning: UnstructuredPruning | MagnitudePruning,
    schedule: AGPSchedule | IterativeSchedule | None = None,
) -> dict[str, Any]:
    """What a report needs: ``description`` (one line), ``table`` (markdown), ``layers``, ``global_sparsity``.

    ``layers`` and ``global_sparsity`` are read from the model's masked layers
    (every Linear/Conv when none is masked, e.g. after :func:`finalize_`).
    """
    layers = masked_layers(model) or None
    return {
        "description": describe_pruning(pruning, schedule),
        "table": sparsity_table(model, layers),
        "layers": layer_sparsity(model, layers),
        "global_sparsity": global_sparsity(model, layers),
        "config": pruning.to_dict(),
        "schedule": None if schedule is None else schedule.to_dict(),
    }
