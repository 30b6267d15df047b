"""The examples in examples/ are part of the documentation: they must run."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_distill_and_prune_example(tmp_path):
    module = runpy.run_path(str(EXAMPLES / "distill_and_prune.py"))
    result = module["main"](tmp_path)
    assert result["sparsity"] >= 0.8 - 1e-3
    assert result["pruned_accuracy"] > 0.5 and result["distilled_accuracy"] > 0.5
    assert result["onnx_max_abs_diff"] < 1e-4
    assert (tmp_path / "student.slim").stat().st_size == result["file_bytes"]


@pytest.mark.slow  # a subprocess or a long example: CI runs it
def test_prune_your_own_model_example(tmp_path):
    module = runpy.run_path(str(EXAMPLES / "prune_your_own_model.py"))
    result = module["main"](tmp_path)
    assert result["macs_after"] <= 0.5 * result["macs_before"]
    assert result["params_after"] < result["params_before"]
    assert result["unsupported"] == []  # the residual add and the concat were both understood
    assert result["pruned_accuracy"] > 0.5
    assert result["reload_max_abs_diff"] == 0.0 and result["onnx_max_abs_diff"] < 1e-4
    assert (tmp_path / "small.slim").is_file()
