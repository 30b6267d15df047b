"""``report.md`` and the PNG plots of a run folder."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a screen
import matplotlib.pyplot as plt  # noqa: E402

from torchslim.pipeline.recipe import Recipe  # noqa: E402
from torchslim.pipeline.rundir import RunDir  # noqa: E402
from torchslim.atomic import atomic_write_text, atomic_write_with  # noqa: E402


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix or unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def _bytes(n: int) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or suffix == "GiB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1024
    return str(n)


def results_table(rows: list[dict[str, Any]]) -> str:
    """The before/after table: one row per model."""
    sizes = sorted({int(b) for r in rows for b in r.get("latency_ms", {})})
    head = ["model", "accuracy", "params", "nonzero", "MACs", "bytes on disk"] + [f"latency b={b} (ms)" for b in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lat = r.get("latency_ms", {})
        cells = [r["model"], f"{100 * r['accuracy']:.2f}%", f"{r['params']:,}", f"{r['nonzero']:,}",
                 _human(r["macs"]), _bytes(r["file_bytes"])]
        cells += [f"{lat[str(b)] if str(b) in lat else lat.get(b, float('nan')):.3f}" for b in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run: RunDir, recipe: Recipe, summary: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    """Write ``report.md``: the table, then what each stage did and what it cost."""
    rows = {r["key"]: r for r in summary["rows"]}
    out = [f"# torchslim report: {recipe.name}", "",
           f"Dataset `{recipe.data.dataset}`; accuracy on its test split; latency is the median on this machine's "
           f"CPU ({'measured' if recipe.evaluate.latency else 'not measured'}). "
           "Bytes on disk are the sizes of the `.slim` files as written.", "",
           results_table(summary["rows"]), ""]

    if "distilled" in rows:
        kd = summary["distill"]["kd"]
        out += ["## Distillation", "",
                f"Hinton KD, T = {kd['temperature']}, α = {kd['alpha']} (weight of the label loss), "
                f"{summary['distill']['epochs']} epochs."]
        if "student_alone" in rows:
            gain = rows["distilled"]["accuracy"] - rows["student_alone"]["accuracy"]
            out.append(f"Gain over the same student trained alone for the same epochs: {100 * gain:+.2f} points.")
        if "teacher" in rows and "student_alone" in rows:
            gap = rows["teacher"]["accuracy"] - rows["student_alone"]["accuracy"]
            if gap > 0:
                out.append(f"Teacher–student gap recovered: {100 * gain / gap:.0f}%.")
        out.append("")

    if "pruning" in summary:
        p = summary["pruning"]
        cfg = p["config"]
        target = f"sparsity {cfg['sparsity']}" if cfg.get("sparsity") is not None else f"threshold {cfg['threshold']}"
        schedule = ("one-shot, then fine-tuned" if p.get("schedule", "oneshot") == "oneshot"
                    else "gradual (AGP, Zhu & Gupta) during fine-tuning")
        out += ["## Pruning", "",
                f"Magnitude pruning, {schedule}, {cfg['scope']} scope, {target}, layer types {', '.join(cfg['layer_types'])}"
                + (f", excluded {', '.join(cfg['exclude'])}" if cfg["exclude"] else "")
                + (f", only {', '.join(cfg['include'])}" if cfg["include"] else "")
                + f". Reached {100 * p['global_sparsity']:.2f}% sparsity over the pruned layers.", ""]
        if "finetuned" in rows:
            ref = rows.get("distilled") or rows.get("student_alone")
            if ref is not None:
                drop = rows["finetuned"]["accuracy"] - ref["accuracy"]
                out.append(f"Fine-tuned pruned model vs. unpruned: {100 * drop:+.2f} points; file "
                           f"{ref['file_bytes'] / max(rows['finetuned']['file_bytes'], 1):.1f}× smaller.")
                out.append("")
        out += ["| layer | weights | zeros | sparsity |", "|---|---|---|---|"]
        for name, s in p["layers"].items():
            out.append(f"| {name} | {s['total']:,} | {s['zeros']:,} | {100 * s['sparsity']:.1f}% |")
        out.append("")

    exp = summary.get("export", {})
    if exp:
        out += ["## Export", "", f"`model.slim`: {_bytes(exp['model_slim_bytes'])}."]
        if "onnx" in exp:
            out.append(f"`model.onnx` (opset {exp['onnx'].get('opset')}): largest absolute difference between "
                       f"onnxruntime and PyTorch outputs {exp['onnx']['max_abs_diff']:.2e}.")
        out.append("")

    out += ["## Time", "", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()]
    out += ["", "Plots: `plots/training_curves.png`" + (", `plots/layer_sparsity.png`" if "pruning" in summary else "") + ".", ""]
    atomic_write_text(run.root / "report.md", "\n".join(out))


def write_plots(run: RunDir, metrics: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Training curves (loss and validation accuracy per stage) and per-layer sparsity."""
    stages: dict[str, list[dict[str, Any]]] = {}
    for m in metrics:
        if "epoch" in m and "train_loss" in m:
            stages.setdefault(m["stage"], []).append(m)
    if stages:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        for stage, recs in stages.items():
            epochs = [r["epoch"] for r in recs]
            ax_loss.plot(epochs, [r["train_loss"] for r in recs], marker="o", label=stage)
            if "val_accuracy" in recs[0]:
                ax_acc.plot(epochs, [100 * r["val_accuracy"] for r in recs], marker="o", label=stage)
        ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
        ax_acc.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        atomic_write_with(run.plot("training_curves.png"), lambda p: fig.savefig(p, dpi=100, format="png"))
        plt.close(fig)
    if "pruning" in summary:
        layers = summary["pruning"]["layers"]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers) + 2), 4))
        ax.bar(range(len(layers)), [100 * s["sparsity"] for s in layers.values()])
        ax.set_xticks(range(len(layers)), list(layers), rotation=45, ha="right")
        ax.set(title="per-layer sparsity", ylabel="sparsity (%)", ylim=(0, 100))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        atomic_write_with(run.plot("layer_sparsity.png"), lambda p: fig.savefig(p, dpi=100, format="png"))
        plt.close(fig)
