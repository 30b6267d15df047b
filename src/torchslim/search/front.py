"""Measured points, the Pareto front over (accuracy, latency), and its JSON and plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchslim.atomic import atomic_path


@dataclass
class Point:
    """One plan, built and measured end to end.

    Attributes:
        plan: ``{group label: kept channels}``.
        source: ``"dense"``, ``"sweep"`` (the Lagrangian allocation), ``"uniform"`` (baseline) or
            ``"trial"`` (an Optuna trial refining the front, ``extra["trial"]`` its number).
        accuracy: validation accuracy in [0, 1] after the cut and BatchNorm re-estimation, or after
            the search's trial fine-tune when it has one (``extra["trial_finetune_epochs"]``).
        drop: accuracy points lost against the dense model (validation).
        latency_p50_ms / latency_p90_ms: end-to-end latency at the budget's batch.
        latency_ratio: median latency over the dense model's, timed in alternation with it.
        bytes: fp32 ONNX file size.
        macs: multiply-accumulates per sample.
        predicted_drop / predicted_latency: what the per-group tables predicted (None for the dense model).
        batch / runtime: where it was timed.
    """

    plan: dict[str, int]
    source: str
    accuracy: float
    drop: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_ratio: float
    bytes: int
    macs: int
    predicted_drop: float | None = None
    predicted_latency: float | None = None
    batch: int = 1
    runtime: str = "ort"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dominates(a: Point, b: Point) -> bool:
    """Whether ``a`` is at least as accurate and as fast as ``b``, and strictly better in one."""
    return (a.accuracy >= b.accuracy and a.latency_ratio <= b.latency_ratio
            and (a.accuracy > b.accuracy or a.latency_ratio < b.latency_ratio))


def pareto_front(points: list[Point]) -> list[Point]:
    """The non-dominated points, fastest first.

    A plan measured twice (by the sweep and as a uniform baseline) is two points: the
    better measurement dominates the other, and the front is checked against every
    measurement, not a chosen one.
    """
    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: p.latency_ratio)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` as indented JSON."""
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")


def plot_front(path: str | Path, points: list[Point], front: list[Point], chosen: Point | None,
               title: str = "", ylabel: str = "validation accuracy before fine-tuning (%)") -> None:
    """Accuracy against measured latency: every point, the front as a line, the chosen plan starred.

    Uses a matplotlib ``Figure`` (never pyplot), so nothing global is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for source, marker, colour in (("sweep", "o", "tab:blue"), ("uniform", "s", "tab:orange"),
                                   ("trial", "^", "tab:green"), ("dense", "D", "black")):
        pts = [p for p in points if p.source == source]
        if pts:
            ax.scatter([p.latency_ratio for p in pts], [100 * p.accuracy for p in pts], marker=marker,
                       color=colour, alpha=0.7, label=source)
    ax.plot([p.latency_ratio for p in front], [100 * p.accuracy for p in front], "-", color="tab:blue",
            label="Pareto front")
    if chosen is not None:
        ax.scatter([chosen.latency_ratio], [100 * chosen.accuracy], marker="*", s=200, color="tab:red",
                   label="chosen", zorder=5)
    ax.set_xlabel("latency / dense latency (measured end to end)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "measured front")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
