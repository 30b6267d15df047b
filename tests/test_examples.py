"""The examples in examples/ are part of the documentation: they must run."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_distill_and_prune_example(tmp_path):
    module = runpy.run_path(str(EXAMPLES / "distill_and_prune.py"))
    result = module["main"](tmp_path)
    assert result["sparsity"] >= 0.8 - 1e-3
    assert result["pruned_accuracy"] > 0.5 and result["distilled_accuracy"] > 0.5
    assert result["onnx_max_abs_diff"] < 1e-4
    assert (tmp_path / "student.slim").stat().st_size == result["file_bytes"]
