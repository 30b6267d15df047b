"""``quantize``: int8 post-training quantization in ONNX Runtime, measured in ONNX Runtime and torch.

The method is the library's :class:`~torchslim.quant.Int8Config` unchanged,
calibrated on the training split. The stage writes ``model.fp32.onnx`` and
``model.int8.onnx`` and reports accuracy on the test split of both files run
in ONNX Runtime (never a torch simulation of int8), beside the torch model's,
and latency of both files in ONNX Runtime (timed in alternation, threads
pinned to torch's count) beside torch eager.

With ``fallback_if_slower`` (the default), an int8 file slower than the fp32
file at every measured batch size is not shipped: the report says so and
``model.int8.onnx`` is not written (int8 that runs slower is no gain; see the
per-layer ``exclude`` to keep the layers that lose float).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from torchslim import measure as ts_measure
from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.quant import Int8Config, check_int8, quantize
from torchslim.train import evaluate


def _bytes(n: int) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or suffix == "GiB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1024
    return str(n)


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
    """

    kind: Literal["quantize"] = "quantize"
    method: Int8Config = Field(default_factory=Int8Config)
    latency: bool = True
    latency_batch_sizes: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [1, 256],
                                                                             min_length=1)
    latency_budget_s: float = Field(1.0, gt=0.0, le=60.0)
    fallback_if_slower: bool = True


@register_stage
class Quantize(Stage):
    kind = "quantize"
    Config = QuantizeStage
    produces_model = False

    def plan(self, ctx: Any, model: nn.Module) -> nn.Module:
        # Layer names, dynamic-on-convs and a missing onnxruntime fail here, before anything trains.
        check_int8(model, self.config.method, ctx.example)
        return model

    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        c, files = self.config, ctx.entry.files
        if not ctx.dist.is_main:
            return StageResult(model, [], {}, produces_model=False)
        files.mkdir(parents=True, exist_ok=True)
        model = model.cpu().eval()
        norm = {"mean": list(ctx.splits.mean), "std": list(ctx.splits.std)}
        q = quantize(model, c.method, calib=ctx.splits.train, example=ctx.splits.test.x[:8], normalization=norm)
        test = ctx.splits.test
        threads = torch.get_num_threads()
        accuracy = {"ort_fp32": q.evaluate(test, precision="fp32", threads=threads)["accuracy"],
                    "ort_int8": q.evaluate(test, threads=threads)["accuracy"],
                    "torch": evaluate(model, test, device=torch.device("cpu"))["accuracy"]}
        latency: dict[str, dict[str, float]] = {}
        if c.latency:
            example = test.x[:1]
            for b in c.latency_batch_sizes:
                ort = ts_measure.compare_ort_latency({"fp32": q.fp32_onnx, "int8": q.int8_onnx}, example, b,
                                                     threads=threads, budget_s=c.latency_budget_s)
                eager = ts_measure.measure_latency(model, example, b, threads=threads, budget_s=c.latency_budget_s)
                latency[str(b)] = {"ort_fp32": ort["fp32"]["median_ms"], "ort_int8": ort["int8"]["median_ms"],
                                   "torch": eager["median_ms"]}
        slower = bool(latency) and all(v["ort_int8"] > v["ort_fp32"] for v in latency.values())
        shipped = "fp32" if slower and c.fallback_if_slower else "int8"
        q.export_onnx(files / "model.fp32.onnx", precision="fp32")
        names = ["model.fp32.onnx"]
        if shipped == "int8":
            q.export_onnx(files / "model.int8.onnx")
            names.append("model.int8.onnx")
        report = {"quant": q.describe(), "accuracy": accuracy, "test_samples": len(test.y), "latency": latency,
                  "threads": threads, "int8_slower": slower, "shipped": shipped, "files": names,
                  "layers": q.layers}
        record = {"stage": self.id, "event": "quantize", "int8_accuracy_ort": accuracy["ort_int8"],
                  "fp32_accuracy_ort": accuracy["ort_fp32"], "int8_bytes": q.int8_bytes, "fp32_bytes": q.fp32_bytes,
                  "shipped": shipped}
        return StageResult(model, [record], report, names, produces_model=False)

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
                if d["mode"] == "static" else "dynamic int8 (weights int8, activation ranges at run time)")
        out = [f"## Quantization ({stage_id})", "",
               f"{what}; {'per-channel' if d['per_channel'] else 'per-tensor'} weights; {d['scheme']}"
               f"{' with reduce_range (7-bit weights)' if d['reduce_range'] else ', full-range weights'}: "
               f"{d['why']}. BatchNorm {'folded' if d['bn_folded'] else 'NOT folded'}. "
               f"Layers kept float: {', '.join(f'`{n}`' for n in d['excluded']) or 'none'}.", "",
               f"Accuracy on {report['test_samples']} test samples, the ONNX files run in ONNX Runtime; latency "
               f"is the median with {report['threads']} threads (ONNX Runtime's fp32 and int8 timed in "
               "alternation).", "", *table, "",
               f"int8 file {d['size_ratio']:.2f}x smaller than fp32; accuracy "
               f"{100 * (acc['ort_int8'] - acc['ort_fp32']):+.2f} points in ONNX Runtime."]
        if lat:
            speed = ", ".join(f"{lat[b]['ort_fp32'] / lat[b]['ort_int8']:.2f}x at b={b}" for b in sizes)
            out.append(f"int8 vs fp32 in ONNX Runtime: {speed}; ONNX Runtime int8 vs torch eager: "
                       + ", ".join(f"{lat[b]['torch'] / lat[b]['ort_int8']:.2f}x at b={b}" for b in sizes) + ".")
        if report["int8_slower"]:
            out.append("int8 is slower than fp32 at every measured batch size: "
                       + ("`model.int8.onnx` was not written; deploy `model.fp32.onnx`." if report["shipped"] == "fp32"
                          else "written anyway (fallback_if_slower: false)."))
        return out + [""]
