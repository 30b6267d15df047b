"""benchmarks/deep_compression.py runs end to end on a tiny budget (slow: real Fashion-MNIST)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_deep_compression_benchmark_quick(tmp_path):
    require_fashion_mnist()
    # A subprocess: the script sets torch's thread pool, which a process can do only once.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "deep_compression.py"), "--quick",
                             "--models", "lenet300_100,fmnist_student", "--train-limit", "1000", "--threads", "1",
                             "--split", "val", "--bias-bits", "4", "--bits", "classifier.0=3",
                             "--cache", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    packed = {e["model"]: e for e in lines if e["kind"] == "packed"}
    assert set(packed) == {"lenet300_100", "fmnist_student"}
    assert all(e["bit_exact"] for e in packed.values())
    # Even this small budget prunes to the configured densities: far smaller than dense fp32.
    assert all(e["compression"] > 15 for e in packed.values())
    assert "| `classifier.0.bias` |" in packed["lenet300_100"]["table"]
    assert {e["model"] for e in lines if e["kind"] == "reference"} >= {"lenet300_100", "lenet5"}
    assert len(list((tmp_path / "cache").iterdir())) == 2  # dense + pruned models kept for the next sweep
