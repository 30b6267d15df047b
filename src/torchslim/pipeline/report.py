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
           f"Dataset `{recipe.data.dataset}`; accuracy on its test split; "
           + ("latency is the median on this machine's CPU of passes timed in alternation across the models "
              "(so the ratios between rows hold on a busy machine). " if recipe.evaluate.latency
              else "latency not measured. ")
           + "Bytes on disk are the sizes of the `.slim` files as written.", "",
           results_table(summary["rows"]), ""]

    if "distilled" in rows:
        out += _distillation_section(summary["distill"], rows, metrics)
    if "pruning" in summary:
        if summary["pruning"].get("structured"):
            out += _structured_section(summary["pruning"], rows)
        else:
            out += _unstructured_section(summary["pruning"], rows, metrics)

    exp = summary.get("export", {})
    if exp:
        out += ["## Export", "", f"`model.slim`: {_bytes(exp['model_slim_bytes'])}."]
        if "onnx" in exp:
            out.append(f"`model.onnx` (opset {exp['onnx'].get('opset')}): largest absolute difference between "
                       f"onnxruntime and PyTorch outputs {exp['onnx']['max_abs_diff']:.2e}.")
        out.append("")

    out += ["## Time", "", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()]
    plots = sorted(p.name for p in (run.root / "plots").glob("*.png")) if (run.root / "plots").is_dir() else []
    out += ["", "Plots: " + ", ".join(f"`plots/{name}`" for name in plots) + ".", ""]
    atomic_write_text(run.root / "report.md", "\n".join(out))


def _unpruned_row(rows: dict[str, dict[str, Any]], pruning: dict[str, Any]) -> dict[str, Any] | None:
    """The row of the model the prune stage started from (None if it was not measured)."""
    return rows.get(pruning.get("from", ""))


def _loss_parts(metrics: list[dict[str, Any]], stage: str) -> dict[str, list[float]]:
    """Per-epoch values of every ``train_<part>_loss`` logged by ``stage``."""
    parts: dict[str, list[float]] = {}
    for m in metrics:
        if m.get("stage") == stage and "epoch" in m:
            for key, value in m.items():
                if key.startswith("train_") and key.endswith("_loss"):
                    name = key.removeprefix("train_")
                    parts.setdefault("total" if name == "loss" else name, []).append(value)
    return parts


def _distillation_section(d: dict[str, Any], rows: dict[str, dict[str, Any]],
                          metrics: list[dict[str, Any]]) -> list[str]:
    names = {"kd": "Hinton KD", "dkd": "Decoupled KD (DKD)", "hints": "FitNets hints", "attention": "attention transfer"}
    method = " + ".join(names.get(m, m) for m in d["method"].split("+"))
    line = f"{method}, T = {d['temperature']}"
    if "alpha" in d:
        line += f", α = {d['alpha']} (weight of the label loss)"
    line += ", loss weights " + ", ".join(f"{k} {v:g}" for k, v in d["weights"].items())
    line += f"; {d['epochs']} epochs"
    if d.get("teacher_outputs_used"):
        line += f"; teacher outputs {d['teacher_outputs_used']}"
        line += " (computed once, reused every epoch)" if d["teacher_outputs_used"] == "cached" else " (every batch)"
    out = ["## Distillation", "", line + "."]
    for key in ("hint_layers", "attention_layers"):
        if key in d:
            out.append(f"{'Hint' if key == 'hint_layers' else 'Attention'} pairs (student → teacher): "
                       + ", ".join(f"`{s}` → `{t}`" for s, t in d[key].items()) + ".")
    if "student_alone" in rows:
        gain = rows["distilled"]["accuracy"] - rows["student_alone"]["accuracy"]
        out.append(f"Gain over the same student trained alone for the same epochs: {100 * gain:+.2f} points.")
        if "teacher" in rows:
            gap = rows["teacher"]["accuracy"] - rows["student_alone"]["accuracy"]
            if gap > 0:
                out.append(f"Teacher–student gap recovered: {100 * gain / gap:.0f}%.")
    parts = _loss_parts(metrics, "distilled")
    if parts:
        out += ["", "Loss parts (first → last epoch; curves in `plots/distill_loss_parts.png`):", "",
                "| part | first epoch | last epoch |", "|---|---:|---:|"]
        out += [f"| {name} | {values[0]:.4f} | {values[-1]:.4f} |" for name, values in parts.items()]
    out.append("")
    return out


def _unstructured_section(p: dict[str, Any], rows: dict[str, dict[str, Any]],
                          metrics: list[dict[str, Any]]) -> list[str]:
    out = ["## Pruning", "", p["description"],
           f"Reached {100 * p['global_sparsity']:.2f}% sparsity over the pruned layers."]
    if p.get("exclusions"):
        out.append("Left unpruned by the selection: " + ", ".join(f"`{n}`" for n in p["exclusions"]) + ".")
    if "sensitivity" in p:
        out.append("Per-layer sparsities chosen from a sensitivity analysis (`sensitivity.md`, "
                   "`plots/sensitivity.png`): " + ", ".join(f"`{k}` {100 * v:.1f}%"
                                                            for k, v in p["sensitivity"]["allocated"].items()) + ".")
    ref = _unpruned_row(rows, p)
    if "finetuned" in rows and ref is not None:
        drop = rows["finetuned"]["accuracy"] - ref["accuracy"]
        out.append(f"Fine-tuned pruned model vs. unpruned: {100 * drop:+.2f} points; file "
                   f"{ref['file_bytes'] / max(rows['finetuned']['file_bytes'], 1):.1f}× smaller.")
    rounds = [m for m in metrics if m.get("stage") == "prune" and m.get("event") == "round"]
    if rounds:
        out += ["", "| round | target sparsity | reached |", "|---:|---:|---:|"]
        out += [f"| {r['round']} | {100 * r['target_sparsity']:.2f}% | {100 * r['global_sparsity']:.2f}% |"
                for r in rounds]
    out += ["", p["table"], ""]
    return out


def _structured_section(p: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[str]:
    cfg, report = p["config"], p.get("report", {})
    if cfg.get("target_macs") is not None:
        target = f"target: keep {100 * cfg['target_macs']:.0f}% of the MACs"
    elif cfg.get("target_params") is not None:
        target = f"target: {cfg['target_params']:,} parameters"
    else:
        target = f"ratio {cfg['ratio']} of the channels"
    line = (f"Channels removed physically (a smaller dense model, no masks): importance `{cfg['importance']}`, "
            f"{target}, {cfg['scope']} scope, {cfg['steps']} step{'s' if cfg['steps'] != 1 else ''}, "
            f"channel counts rounded to a multiple of {cfg['round_to']}")
    if p.get("between_steps_epochs"):
        line += f", {p['between_steps_epochs']} fine-tuning epochs between steps"
    out = ["## Structured pruning", "", line + "."]
    if report:
        out.append(f"MACs {_human(report['macs_before'])} → {_human(report['macs_after'])} "
                   f"({report['macs_before'] / max(report['macs_after'], 1):.2f}× fewer), parameters "
                   f"{report['params_before']:,} → {report['params_after']:,} "
                   f"({report['params_before'] / max(report['params_after'], 1):.2f}× fewer)"
                   + ("" if report.get("target_met", True) else "; **the target was not reached**") + ".")
    ref, pruned = _unpruned_row(rows, p), rows.get("finetuned") or rows.get("pruned")
    if ref is not None and pruned is not None:
        macs_ratio = pruned["macs"] / max(ref["macs"], 1)
        out += ["", "| measure | unpruned | pruned | pruned / unpruned |", "|---|---:|---:|---:|"]
        out.append(f"| accuracy | {100 * ref['accuracy']:.2f}% | {100 * pruned['accuracy']:.2f}% | "
                   f"{100 * (pruned['accuracy'] - ref['accuracy']):+.2f} points |")
        out.append(f"| MACs | {_human(ref['macs'])} | {_human(pruned['macs'])} | {macs_ratio:.3f} |")
        out.append(f"| params | {ref['params']:,} | {pruned['params']:,} | {pruned['params'] / max(ref['params'], 1):.3f} |")
        out.append(f"| bytes on disk | {_bytes(ref['file_bytes'])} | {_bytes(pruned['file_bytes'])} | "
                   f"{pruned['file_bytes'] / max(ref['file_bytes'], 1):.3f} |")
        # The fastest of the alternated passes: the best estimate of each model's own cost.
        fastest = "latency_min_ms" if "latency_min_ms" in ref else "latency_ms"
        for b, t in ref.get(fastest, {}).items():
            if b in pruned.get(fastest, {}):
                ratio = pruned[fastest][b] / t
                out.append(f"| fastest pass b={b} (ms) | {t:.3f} | {pruned[fastest][b]:.3f} | {ratio:.3f} "
                           f"({ratio / macs_ratio:.2f}× the MACs ratio) |")
    if report.get("unsupported"):
        out += ["", "Left unpruned because the dependency graph cannot see through them:"]
        out += [f"- {item}" for item in report["unsupported"]]
    if report.get("steps"):
        out += ["", "| step | MACs | params | channels removed |", "|---:|---:|---:|---|"]
        for st in report["steps"]:
            removed = ", ".join(f"{k}: {v}" for k, v in st["removed"].items() if v) or "none"
            out.append(f"| {st['step']} | {_human(st['macs'])} | {st['params']:,} | {removed} |")
    out.append("")
    return out


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
    parts = _loss_parts(metrics, "distilled")
    if parts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, values in parts.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
        ax.set(title="distillation loss parts", xlabel="epoch", ylabel="loss (unweighted)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write_with(run.plot("distill_loss_parts.png"), lambda p: fig.savefig(p, dpi=100, format="png"))
        plt.close(fig)
    if "pruning" in summary and "layers" in summary["pruning"]:
        layers = summary["pruning"]["layers"]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers) + 2), 4))
        ax.bar(range(len(layers)), [100 * s["sparsity"] for s in layers.values()])
        ax.set_xticks(range(len(layers)), list(layers), rotation=45, ha="right")
        ax.set(title="per-layer sparsity", ylabel="sparsity (%)", ylim=(0, 100))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        atomic_write_with(run.plot("layer_sparsity.png"), lambda p: fig.savefig(p, dpi=100, format="png"))
        plt.close(fig)
