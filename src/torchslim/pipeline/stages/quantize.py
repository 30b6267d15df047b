"""``quantize``: int8 post-training quantization in ONNX Runtime, measured in ONNX Runtime and torch.

The method is the library's :class:`~torchslim.quant.Int8Config` unchanged,
calibrated on the training split. The stage writes ``model.fp32.onnx`` and
``model.int8.onnx`` and reports accuracy on the test split of both files run
in ONNX Runtime (never a torch simulation of int8), beside the torch model's,
and latency of both files in ONNX Runtime beside torch eager (all three timed
in alternation, threads pinned to torch's count).

With ``fallback_if_slower`` (the default), an int8 file slower than the fp32
file at every measured batch size is not shipped: the report says so and
``model.int8.onnx`` is not written (int8 that runs slower is no gain; see the
per-layer ``exclude`` to keep the layers that lose float).

``precision: auto`` decides the per-layer precision by measurement first:
:func:`~torchslim.quant.precision.int8_layer_sweep` on ``precision_samples``
validation inputs keeps float every layer whose int8 form makes the model
slower (at some measured batch size) or less accurate in ONNX Runtime; the
report lists them with the numbers. Whatever the choice, the report names
every batch size where the shipped int8 file is still slower than fp32.

``qat`` trains instead of calibrating: quantization-aware training with the
float model (or ``qat.teacher``) as teacher, through the run's ``fit`` (so it
checkpoints and resumes like any training stage); the int8 file carries the
learned scales, and the report gives its top-1 agreement with the fake-quant
torch model and the largest logit difference.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from torchslim import measure as ts_measure
from torchslim.errors import ConfigError
from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.config import Config
from torchslim.quant import Int8Config, check_int8, quantize
from torchslim.quant.precision import int8_layer_sweep
from torchslim.quant.qat import QAT_LAYERS, QATConfig, export_qat, prepare_qat, qat_agreement, qat_layers
from torchslim.train import TrainConfig, evaluate
from torchslim.train.distributed import broadcast_object


def _bytes(n: int) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or suffix == "GiB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1024
    return str(n)


class QATOptions(Config):
    """Quantization-aware training inside the ``quantize`` stage.

    Attributes:
        train: how to train (QAT fine-tunes: a few epochs at a low learning rate).
        teacher: the teacher, a name from ``models`` or an earlier stage's ``id``
            (default: the stage's float input model).
        method: the fake-quant settings (:class:`~torchslim.quant.qat.QATConfig`).
    """

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, lr=1e-4))
    teacher: str | None = None
    method: QATConfig = Field(default_factory=QATConfig)


class QuantizeStage(StageConfig):
    """Int8 quantization of the input model (it passes through unchanged: the output is ONNX files).

    Attributes:
        method: how to quantize (:class:`~torchslim.quant.Int8Config`; its
            ``calibration_samples`` are drawn from the training split).
        latency: time the fp32 and int8 files in ONNX Runtime and the model in torch.
        latency_batch_sizes: batch sizes to time.
        latency_budget_s: seconds of timed runs per measurement.
        fallback_if_slower: do not ship an int8 file that is slower than fp32 at every
            measured batch size (needs ``latency``).
        precision: ``int8`` (every Conv/Linear not in ``method.exclude``) or ``auto`` (the
            per-layer sweep decides which stay float; see the module docstring).
        precision_samples: validation inputs each file of the sweep is evaluated on.
        qat: quantization-aware training + distillation instead of calibration (None: PTQ).
    """

    kind: Literal["quantize"] = "quantize"
    method: Int8Config = Field(default_factory=Int8Config)
    latency: bool = True
    latency_batch_sizes: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [1, 256],
                                                                             min_length=1)
    latency_budget_s: float = Field(1.0, gt=0.0, le=60.0)
    fallback_if_slower: bool = True
    precision: Literal["int8", "auto"] = "int8"
    precision_samples: int = Field(1000, ge=1, le=1_000_000)
    qat: QATOptions | None = None

    def references(self) -> list[str]:
        return [self.qat.teacher] if self.qat is not None and self.qat.teacher else []


@register_stage
class Quantize(Stage):
    kind = "quantize"
    Config = QuantizeStage
    produces_model = False

    def plan(self, ctx: Any, model: nn.Module) -> nn.Module:
        # Layer names, dynamic-on-convs and a missing onnxruntime fail here, before anything trains.
        c = self.config
        check_int8(model, c.method, ctx.example)
        if c.qat is not None:
            if c.method.mode == "dynamic":
                raise ConfigError("quantize: qat needs static int8 (method.mode: static)")
            qat_layers(model, c.qat.method)
            if c.qat.teacher is not None:
                ctx.get(c.qat.teacher)
        return model

    def _sweep(self, ctx: Any, model: nn.Module, threads: int) -> dict[str, Any]:
        c = self.config
        val = ctx.splits.val if len(ctx.splits.val.y) else ctx.splits.train
        norm = {"mean": list(ctx.splits.mean), "std": list(ctx.splits.std)}
        return int8_layer_sweep(model, c.method, ctx.splits.train, val, batch_sizes=c.latency_batch_sizes,
                                max_samples=c.precision_samples, threads=threads, budget_s=c.latency_budget_s,
                                example=ctx.splits.test.x[:8], normalization=norm)

    def _train_qat(self, ctx: Any, model: nn.Module, exclude: list[str]) -> tuple[nn.Module, QATConfig, list]:
        opts = self.config.qat
        names = {n for n, m in model.named_modules() if isinstance(m, QAT_LAYERS)}
        extra = tuple(n for n in exclude if n in names and n not in opts.method.exclude)
        config = opts.method.model_copy(update={"exclude": tuple(opts.method.exclude) + extra})
        qmodel = prepare_qat(model, config, calib=ctx.splits.train).to(ctx.device)
        teacher = None
        if config.distill:
            teacher = ctx.copy_of(opts.teacher) if opts.teacher else copy.deepcopy(model).to(ctx.device)
        records = ctx.fit(qmodel, self.id, opts.train, ctx.entry, seed=ctx.seed(self.id), teacher=teacher,
                          objective=config.objective)
        return qmodel.cpu().eval(), config, records

    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        c, files = self.config, ctx.entry.files
        model = model.cpu().eval()
        threads = torch.get_num_threads()
        main = ctx.dist.is_main
        sweep = self._sweep(ctx, model, threads) if c.precision == "auto" and main else None
        exclude = list(sweep["final"]["exclude"]) if sweep is not None else list(c.method.exclude)
        trained = None
        if c.qat is not None:  # every process trains (DDP); rank 0 alone measures and writes
            exclude = broadcast_object(exclude, ctx.dist)
            trained = self._train_qat(ctx, model, exclude)
        if not main:
            return StageResult(model, [], {}, produces_model=False)
        files.mkdir(parents=True, exist_ok=True)
        norm = {"mean": list(ctx.splits.mean), "std": list(ctx.splits.std)}
        test = ctx.splits.test
        records: list[dict[str, Any]] = []
        agreement = None
        if trained is not None:
            qmodel, config, records = trained
            q = export_qat(qmodel, config, test.x[:8], normalization=norm, history=records)
            agreement = qat_agreement(q, test, threads=threads)
        elif sweep is not None:
            q = sweep["quantized"]  # the sweep's file with its choice of float layers, already made
        else:
            q = quantize(model, c.method, calib=ctx.splits.train, example=test.x[:8], normalization=norm)
        accuracy = {"ort_fp32": q.evaluate(test, precision="fp32", threads=threads)["accuracy"],
                    "ort_int8": q.evaluate(test, threads=threads)["accuracy"],
                    "torch": evaluate(model, test, device=torch.device("cpu"))["accuracy"]}
        if agreement is not None:
            accuracy["torch_fake_quant"] = agreement["torch_accuracy"]
        latency: dict[str, dict[str, float]] = {}
        if c.latency:
            example = test.x[:1]
            for b in c.latency_batch_sizes:
                # torch eager joins the same rotation, so all three ratios come from one alternated run.
                t = ts_measure.compare_ort_latency({"fp32": q.fp32_onnx, "int8": q.int8_onnx}, example, b,
                                                   threads=threads, budget_s=c.latency_budget_s,
                                                   torch_models={"torch": model})
                latency[str(b)] = {"ort_fp32": t["fp32"]["median_ms"], "ort_int8": t["int8"]["median_ms"],
                                   "torch": t["torch"]["median_ms"]}
        slower = bool(latency) and all(v["ort_int8"] > v["ort_fp32"] for v in latency.values())
        slower_at = [b for b, v in latency.items() if v["ort_int8"] > v["ort_fp32"]]
        # The sweep may keep every layer float: the "int8" file is then a float model, nothing to ship.
        all_float = bool(q.layers) and set(q.excluded) >= set(q.layers)
        shipped = "fp32" if (slower or all_float) and c.fallback_if_slower else "int8"
        q.export_onnx(files / "model.fp32.onnx", precision="fp32")
        names = ["model.fp32.onnx"]
        if shipped == "int8":
            q.export_onnx(files / "model.int8.onnx")
            names.append("model.int8.onnx")
        report = {"quant": q.describe(), "accuracy": accuracy, "test_samples": len(test.y), "latency": latency,
                  "threads": threads, "int8_slower": slower, "shipped": shipped, "files": names,
                  "layers": q.layers, "int8_slower_at": slower_at, "precision": c.precision,
                  "all_layers_float": all_float,
                  "sweep": _sweep_report(sweep), "qat": agreement}
        record = {"stage": self.id, "event": "quantize", "int8_accuracy_ort": accuracy["ort_int8"],
                  "fp32_accuracy_ort": accuracy["ort_fp32"], "int8_bytes": q.int8_bytes, "fp32_bytes": q.fp32_bytes,
                  "shipped": shipped, "int8_slower_at": slower_at}
        if agreement is not None:
            record.update(qat_agreement=agreement["agreement"], qat_max_logit_diff=agreement["max_logit_diff"])
        return StageResult(model, [*records, record], report, names, produces_model=False)

    @classmethod
    def section(cls, report: dict[str, Any], rows: dict[str, dict[str, Any]], stage_id: str,
                records: list[dict[str, Any]]) -> list[str]:
        if not report:
            return []
        d, acc, lat = report["quant"], report["accuracy"], report["latency"]
        sizes = list(lat)
        head = ["model", "runtime", "bits", "bytes on disk", "accuracy"] + [f"latency b={b} (ms)" for b in sizes]
        table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def row(label: str, runtime: str, bits: str, size: str, accuracy: float, key: str) -> str:
            cells = [label, runtime, bits, size, f"{100 * accuracy:.2f}%"] + [f"{lat[b][key]:.3f}" for b in sizes]
            return "| " + " | ".join(cells) + " |"

        table.append(row("fp32 (torch eager)", "torch", "32", "-", acc["torch"], "torch"))
        table.append(row("`model.fp32.onnx`", "ONNX Runtime", "32", _bytes(d["fp32_bytes"]), acc["ort_fp32"],
                         "ort_fp32"))
        table.append(row("`model.int8.onnx`" if report["shipped"] == "int8" else "int8 (not shipped)",
                         "ONNX Runtime", "8", _bytes(d["int8_bytes"]), acc["ort_int8"], "ort_int8"))
        what = (f"static int8 (QDQ), {d['calibration']} calibration on {d['calibration_samples']} training inputs"
                if d["mode"] == "static" else "dynamic int8 (weights int8, activation ranges at run time)"
                if d["mode"] == "dynamic" else "int8 QDQ with the scales of quantization-aware training")
        out = [f"## Quantization ({stage_id})", "",
               f"{what}; {'per-channel' if d['per_channel'] else 'per-tensor'} weights; {d['scheme']}"
               f"{' with reduce_range (7-bit weights)' if d['reduce_range'] else ', full-range weights'}: "
               f"{d['why']}. BatchNorm {'folded' if d['bn_folded'] else 'NOT folded'}. "
               f"Layers kept float: {', '.join(f'`{n}`' for n in d['excluded']) or 'none'}"
               + (f" (pool before ReLU after them: {', '.join(f'`{n}`' for n in d['pool_before_relu'])})"
                  if d.get("pool_before_relu") else "") + ".", "",
               f"Accuracy on {report['test_samples']} test samples, the ONNX files run in ONNX Runtime; latency "
               f"is the median with {report['threads']} threads (ONNX Runtime's fp32 and int8 and torch eager "
               "timed in alternation).", "", *table, "",
               f"int8 file {d['size_ratio']:.2f}x smaller than fp32; accuracy "
               f"{100 * (acc['ort_int8'] - acc['ort_fp32']):+.2f} points in ONNX Runtime."]
        if lat:
            speed = ", ".join(f"{lat[b]['ort_fp32'] / lat[b]['ort_int8']:.2f}x at b={b}" for b in sizes)
            out.append(f"int8 vs fp32 in ONNX Runtime: {speed}; ONNX Runtime int8 vs torch eager: "
                       + ", ".join(f"{lat[b]['torch'] / lat[b]['ort_int8']:.2f}x at b={b}" for b in sizes) + ".")
        if report.get("qat"):
            a = report["qat"]
            out.append(f"Quantization-aware training ({d.get('epochs', 0)} epoch(s), "
                       f"{'distilled from the float model' if d.get('distilled') else 'labels only'}, activation "
                       f"ranges {d['calibration']}): the int8 file in ONNX Runtime agrees with the fake-quant torch "
                       f"model on {100 * a['agreement']:.2f}% of {a['samples']} test samples (top-1); largest logit "
                       f"difference {a['max_logit_diff']:.4g}, mean {a['mean_logit_diff']:.4g}.")
        out.extend(_sweep_lines(report.get("sweep")))
        if report.get("all_layers_float"):
            out.append("Every Conv/Linear layer stays float, so int8 gains nothing on this model: "
                       + ("`model.int8.onnx` was not written; deploy `model.fp32.onnx`."
                          if report["shipped"] == "fp32" else "written anyway (fallback_if_slower: false)."))
        if report.get("int8_slower_at"):
            out.append("The int8 file is SLOWER than the fp32 file in ONNX Runtime at batch size "
                       + ", ".join(report["int8_slower_at"])
                       + (" even with the per-layer precision above." if report.get("sweep") else "."))
        if report["int8_slower"]:
            out.append("int8 is slower than fp32 at every measured batch size: "
                       + ("`model.int8.onnx` was not written; deploy `model.fp32.onnx`." if report["shipped"] == "fp32"
                          else "written anyway (fallback_if_slower: false)."))
        return out + [""]


def _sweep_report(sweep: dict[str, Any] | None) -> dict[str, Any] | None:
    if sweep is None:
        return None
    return {k: sweep[k] for k in ("all_int8", "fp32", "layers", "exclude", "final", "slower_at", "samples")}


def _sweep_lines(sweep: dict[str, Any] | None) -> list[str]:
    """The per-layer precision table: each layer's int8-vs-float measurement and the decision."""
    if not sweep:
        return []
    sizes = list(sweep["fp32"]["latency_ms"])
    head = ["file", "accuracy"] + [f"b={b} (ms)" for b in sizes] + ["decision"]
    lines = ["", f"Per-layer precision (ONNX Runtime, {sweep['samples']} validation samples; each row keeps one "
                 "layer float, the rest int8):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, acc: float, lat: dict[str, float], decision: str) -> str:
        return "| " + " | ".join([label, f"{100 * acc:.2f}%", *(f"{lat[b]:.3f}" for b in sizes), decision]) + " |"

    lines.append(row("fp32", sweep["fp32"]["accuracy"], sweep["fp32"]["latency_ms"], "-"))
    lines.append(row("all int8", sweep["all_int8"]["accuracy"], sweep["all_int8"]["latency_ms"], "-"))
    for name, layer in sweep["layers"].items():
        decision = f"float: {layer['why']}" if layer["keep_float"] else "int8"
        lines.append(row(f"`{name}` float", layer["accuracy"], layer["latency_ms"], decision))
    if sweep.get("final") and sweep["final"]["exclude"]:
        lines.append(row("chosen", sweep["final"]["accuracy"], sweep["final"]["latency_ms"],
                         "float: " + ", ".join(f"`{n}`" for n in sweep["final"]["exclude"])))
    lines.append("")
    if sweep.get("final") and sweep["final"].get("fallback"):
        lines.append(f"Measured together, {sweep['final']['fallback']}.")
    chosen = sweep["final"]["exclude"] if sweep.get("final") else sweep["exclude"]
    lines.append("Layers kept float by the sweep: " + (", ".join(f"`{n}`" for n in chosen) or "none") + ".")
    return lines
