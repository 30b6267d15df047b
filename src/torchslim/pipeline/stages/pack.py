"""``pack``: the Deep Compression artifact, ``model.packed.slim``, and where every byte went.

The method is the library's :class:`~torchslim.quant.pack.PackConfig`
unchanged. The file is read back with :func:`torchslim.export.load` and checked
bit-exact against the input, and its test accuracy is the packed file's own.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from torchslim import export as ts_export
from torchslim.pipeline.stages.base import Stage, StageConfig, StageResult, register_stage
from torchslim.quant.pack import PackConfig, pack
from torchslim.train import evaluate

FILE = "model.packed.slim"


class PackStage(StageConfig):
    """Packing of the input model.

    Attributes:
        method: codec and limits (:class:`~torchslim.quant.pack.PackConfig`).
    """

    kind: Literal["pack"] = "pack"
    method: PackConfig = Field(default_factory=PackConfig)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@register_stage
class Pack(Stage):
    kind = "pack"
    Config = PackStage
    produces_model = False

    def run(self, ctx: Any, model: nn.Module) -> StageResult:
        if not ctx.dist.is_main:
            return StageResult(model, [], {}, produces_model=False)
        files = ctx.entry.files
        files.mkdir(parents=True, exist_ok=True)
        source = copy.deepcopy(model).cpu().eval()
        result = pack(source, files / FILE, self.config.method, input_shape=list(ctx.splits.input_shape),
                      normalization={"mean": list(ctx.splits.mean), "std": list(ctx.splits.std)},
                      metadata={"recipe": ctx.recipe.name, "stage": self.id})
        loaded = ts_export.load(files / FILE)
        report = {k: v for k, v in result.to_dict().items() if k != "path"}
        report.update(table=result.table(), bit_exact=_same_state(source, loaded), input=self.input_name,
                      test_accuracy=evaluate(loaded, ctx.splits.test)["accuracy"])
        return StageResult(model, [], report, [FILE], produces_model=False)

    @classmethod
    def section(cls, report: dict[str, Any], rows: dict[str, dict[str, Any]], stage_id: str,
                records: list[dict[str, Any]]) -> list[str]:
        if not report:
            return []
        out = [f"## Packed artifact: `{FILE}`", "",
               f"{report['file_bytes']:,} bytes ({report['codec']}), **{report['compression']:.1f}× smaller** than "
               f"the dense fp32 tensors ({report['dense_fp32_bytes']:,} bytes). Read back with `ts.load`: "
               + ("bit-exact" if report["bit_exact"] else "**NOT bit-exact**")
               + f", test accuracy {100 * report['test_accuracy']:.2f}%.", "", report["table"]]
        start = rows.get(report.get("input") or "")
        if start is not None:
            out += ["", f"Against `{report['input']}` as evaluated: "
                    f"{100 * (report['test_accuracy'] - start['accuracy']):+.2f} points."]
        return out + [""]
