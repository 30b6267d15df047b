"""``report.md``, ``summary.json`` and the PNG plots of a run folder.

The report is the before/after table of the evaluated models, then one
section per stage, rendered by the stage's own ``section`` (the report knows
no stage by name). Plots are matplotlib ``Figure`` objects, never pyplot, so
importing torchslim neither imports pyplot nor changes matplotlib's backend.
"""

from __future__ import annotations

from typing import Any

from torchslim.atomic import atomic_write_text, atomic_write_with
from torchslim.pipeline.formatting import human_bytes, human_count
from torchslim.pipeline.rundir import RunDir


def results_table(rows: list[dict[str, Any]]) -> str:
    """The before/after table: one row per model."""
    sizes = sorted({int(b) for r in rows for b in r.get("latency_ms", {})})
    head = ["model", "accuracy", "params", "nonzero", "MACs", "bytes on disk"] + [f"latency b={b} (ms)" for b in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lat = r.get("latency_ms", {})
        cells = [r["model"], f"{100 * r['accuracy']:.2f}%", f"{r['params']:,}", f"{r['nonzero']:,}",
                 human_count(r["macs"]), human_bytes(r["file_bytes"]) if r.get("file_bytes") is not None else "-"]
        cells += [f"{lat[str(b)]:.3f}" if str(b) in lat else "-" for b in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(run: RunDir, recipe: Any, summary: dict[str, Any], records: list[dict[str, Any]],
                  results: list[tuple[Any, Any]]) -> None:
    """Write ``summary.json``, the plots and ``report.md`` of a finished run."""
    run.write_json("summary.json", summary)
    write_plots(run, records, results)
    rows = {r["key"]: r for r in summary["rows"]}
    _descendants(results)
    latency = any("latency_ms" in r for r in summary["rows"])
    out = [f"# torchslim report: {recipe.name}", "",
           f"Dataset `{recipe.data.dataset}`; accuracy on its test split; "
           + ("latency is the median on this machine's CPU of passes timed in alternation across the models "
              "(so the ratios between rows hold on a busy machine). " if latency else "latency not measured. ")
           + "Bytes on disk are the sizes of the `.slim` files as written.", "",
           results_table(summary["rows"]), "",
           "Stages: " + " → ".join(f"`{s.id}` ({s.kind})" for s, _ in results) + ".", ""]
    for stage, result in results:
        out += type(stage).section(result.report, rows, stage.id, records)
    out += ["## Time", "", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()]
    plots = sorted(p.name for p in (run.root / "plots").glob("*.png")) if (run.root / "plots").is_dir() else []
    out += ["", "Plots: " + ", ".join(f"`plots/{name}`" for name in plots) + ".", ""]
    atomic_write_text(run.root / "report.md", "\n".join(out))


def _descendants(results: list[tuple[Any, Any]]) -> None:
    """Tell each stage report which later training stage continued from its output (the report compares them)."""
    for stage, result in results:
        later = [s.id for s, _ in results if s.input_name == stage.id and s.trains]
        if later:
            result.report["finetuned_by"] = later[-1]


def write_plots(run: RunDir, records: list[dict[str, Any]], results: list[tuple[Any, Any]]) -> None:
    """Training curves (loss and validation accuracy per training run) and every stage's own plots."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (plots are optional work at the end)

    curves: dict[str, list[dict[str, Any]]] = {}
    for m in records:
        if "epoch" in m and "train_loss" in m:
            curves.setdefault(m["stage"], []).append(m)
    figures: dict[str, Any] = {}
    if curves:
        fig = Figure(figsize=(11, 4))
        ax_loss, ax_acc = fig.subplots(1, 2)
        for name, recs in curves.items():
            epochs = [r["epoch"] for r in recs]
            ax_loss.plot(epochs, [r["train_loss"] for r in recs], marker="o", label=name)
            if "val_accuracy" in recs[0]:
                ax_acc.plot(epochs, [100 * r["val_accuracy"] for r in recs], marker="o", label=name)
        ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
        ax_acc.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        figures["training_curves.png"] = fig
    for stage, result in results:
        if result.report:
            figures.update(type(stage).plots(result.report, stage.id, records))
    for name, fig in figures.items():
        atomic_write_with(run.plot(name), lambda p, fig=fig: fig.savefig(p, dpi=100, format="png"))
