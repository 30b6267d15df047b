"""The unstructured pruning benchmark runs end to end (slow: real Fashion-MNIST)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_unstructured_pruning_benchmark_quick(tmp_path, capsys):
    from torchslim.data import resolve_dataset_dir
    from torchslim.errors import DataError

    try:
        resolve_dataset_dir("fashion-mnist", download=False)
    except DataError:
        pytest.skip("Fashion-MNIST is not available offline")
    module = runpy.run_path(str(ROOT / "benchmarks" / "unstructured_pruning.py"))
    png = tmp_path / "plot.png"
    assert module["main"](["--quick", "--sparsities", "0.9", "--train-limit", "2000", "--plot", str(png)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    results = [r for r in lines if r["kind"] == "result"]
    assert {r["method"] for r in results} == {"oneshot", "iterative", "agp", "agp_train", "torch"}
    assert all(abs(r["achieved_sparsity"] - 0.9) < 1e-4 for r in results)
    assert png.read_bytes()[:4] == b"\x89PNG"
