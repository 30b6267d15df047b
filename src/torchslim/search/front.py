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
        source: ``"dense"``, ``"sweep"`` (the Lagrangian allocation), ``"global"`` (a global
            importance ranking's widths, :func:`~torchslim.search.space.global_plan`), ``"uniform"``
            (baseline) or ``"trial"`` (an Optuna trial refining the front, ``extra["trial"]`` its number).
        accuracy: validation accuracy in [0, 1] after the cut and BatchNorm re-estimation, or after
            the search's trial fine-tune when it has one (``extra["trial_finetune_epochs"]``).
        drop: accuracy points lost against the dense model (validation).
        latency_p50_ms / latency_p90_ms: end-to-end latency at the budget's batch.
        latency_ratio: median latency over the dense model's, timed in alternation with it.
        bytes: size of the file measured (the fp32 ONNX file, or the int8 one for ``precision="int8"``).
        macs: multiply-accumulates per sample.
        predicted_drop / predicted_latency: what the per-group tables predicted (None for the dense model).
        batch / runtime: where it was timed.
        precision: ``"fp32"`` or ``"int8"`` (the plan's model quantized to static int8 in ONNX
            Runtime, calibrated on training inputs; accuracy is that file's, run in ONNX Runtime,
            and ``extra["int8"]`` says how it was made). An int8 point has the ``source`` of the
            fp32 point it was quantized from (the dense model's int8 file is ``source="dense"``).
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
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dominates(a: Point, b: Point) -> bool:
    """Whether ``a`` is at least as accurate and as fast as ``b``, and strictly better in one."""
    return (a.accuracy >= b.accuracy and a.latency_ratio <= b.latency_ratio
            and (a.accuracy > b.accuracy or a.latency_ratio < b.latency_ratio))


def size_front(points: list[Point]) -> list[Point]:
    """The points no other point beats on both accuracy and bytes, smallest first."""
    front = [p for p in points if not any(q.accuracy >= p.accuracy and q.bytes <= p.bytes and
                                          (q.accuracy > p.accuracy or q.bytes < p.bytes) for q in points)]
    return sorted(front, key=lambda p: p.bytes)


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
               title: str = "", ylabel: str = "validation accuracy before fine-tuning (%)",
               x: str = "latency") -> None:
    """Accuracy against measured latency (or, ``x="bytes"``, file size): every point, the front, the choice starred.

    Uses a matplotlib ``Figure`` (never pyplot), so nothing global is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    where = (lambda p: p.latency_ratio) if x == "latency" else (lambda p: p.bytes)  # noqa: E731
    for source, marker, colour in (("sweep", "o", "tab:blue"), ("global", "v", "tab:purple"),
                                   ("uniform", "s", "tab:orange"),
                                   ("trial", "^", "tab:green"), ("dense", "D", "black")):
        for precision in ("fp32", "int8", "packed"):
            pts = [p for p in points if p.source == source and p.precision == precision]
            if pts:
                # int8 points hollow, packed ones crosses, so the precisions of one plan read apart.
                style = {"facecolors": "none", "edgecolors": colour} if precision == "int8" else {"color": colour}
                ax.scatter([where(p) for p in pts], [100 * p.accuracy for p in pts],
                           marker="x" if precision == "packed" else marker, alpha=0.7,
                           label=source if precision == "fp32" else f"{source} {precision}", **style)
    line = sorted(front, key=where)
    ax.plot([where(p) for p in line], [100 * p.accuracy for p in line], "-", color="tab:blue", label="Pareto front")
    if chosen is not None:
        ax.scatter([where(chosen)], [100 * chosen.accuracy], marker="*", s=200, color="tab:red",
                   label="chosen", zorder=5)
    if x == "latency":
        ax.set_xlabel("latency / dense latency (measured end to end)")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("bytes of the file that ships (ONNX, int8 ONNX or packed .slim; measured)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "measured front")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
