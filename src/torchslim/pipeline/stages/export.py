"""``export``: the deployable files: ``model.slim`` (masks made permanent) and ``model.onnx``."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch.nn as nn
from pydantic import Field

from torchslim import export as ts_export
from torchslim.pipeline.formatting import human_bytes
from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.prune import finalize_


class ExportStage(StageConfig):
    """Export of the input model.

    Attributes:
        onnx: write ``model.onnx`` and check it against onnxruntime.
        onnx_atol: largest accepted difference between onnxruntime and PyTorch outputs.
        weights_dtype: storage type of the floating-point tensors in ``model.slim``;
            ``float16`` halves the file.
    """

    kind: Literal["export"] = "export"
    onnx: bool = True
    onnx_atol: float = Field(1e-4, gt=0.0)
    weights_dtype: Literal["float32", "float16"] = "float32"


@register_stage
class Export(Stage):
    kind = "export"
    Config = ExportStage
    produces_model = False

    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        c, files = self.config, ctx.entry.files
        final = copy.deepcopy(model).cpu().eval()
        finalize_(final)
        report: dict[str, Any] = {}
        if not ctx.dist.is_main:
            return StageResult(model, [], report, produces_model=False)
        files.mkdir(parents=True, exist_ok=True)
        stored = copy.deepcopy(final).half() if c.weights_dtype == "float16" else final
        meta = {"recipe": ctx.recipe.name, "weights_dtype": c.weights_dtype}
        ts_export.save(stored, files / "model.slim", input_shape=list(ctx.splits.input_shape), metadata=meta,
                       **_normalization(ctx, ts_export.save))
        report["model_slim_bytes"] = (files / "model.slim").stat().st_size
        names = ["model.slim"]
        if c.onnx:
            result = ts_export.export_onnx(final, ctx.splits.test.x[:8], files / "model.onnx", atol=c.onnx_atol,
                                           **_normalization(ctx, ts_export.export_onnx))
            report["onnx"] = {k: v for k, v in result.items() if k != "path"}
            names.append("model.onnx")
        return StageResult(model, [], report, names, produces_model=False)

    @classmethod
    def section(cls, report: dict[str, Any], rows: dict[str, dict[str, Any]], stage_id: str,
                records: list[dict[str, Any]]) -> list[str]:
        if not report:
            return []
        out = ["## Export", "", f"`model.slim`: {human_bytes(report['model_slim_bytes'])}."]
        if "onnx" in report:
            out.append(f"`model.onnx` (opset {report['onnx'].get('opset')}): largest absolute difference between "
                       f"onnxruntime and PyTorch outputs {report['onnx']['max_abs_diff']:.2e}.")
        return out + [""]


def _normalization(ctx: Any, writer: Any) -> dict[str, Any]:
    """The input normalisation a deployer must apply, for writers that record it."""
    import inspect  # noqa: PLC0415

    if "normalization" not in inspect.signature(writer).parameters:
        return {}
    return {"normalization": {"mean": list(ctx.splits.mean), "std": list(ctx.splits.std)}}
