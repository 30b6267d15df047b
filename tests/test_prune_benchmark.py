"""The unstructured pruning benchmark runs end to end (slow: real Fashion-MNIST)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_unstructured_pruning_benchmark_quick(tmp_path, capsys):
    require_fashion_mnist()
    module = runpy.run_path(str(ROOT / "benchmarks" / "unstructured_pruning.py"))
    png = tmp_path / "plot.png"
    assert module["main"](["--quick", "--sparsities", "0.9", "--train-limit", "2000", "--plot", str(png)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    results = [r for r in lines if r["kind"] == "result"]
    assert {r["method"] for r in results} == {"oneshot", "iterative", "agp", "agp_train", "torch"}
    assert all(abs(r["achieved_sparsity"] - 0.9) < 1e-4 for r in results)
    assert png.read_bytes()[:4] == b"\x89PNG"


def _events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _run_script(name: str, *args: str) -> list[dict]:
    # A subprocess: benchmark scripts set torch's thread pools, which a process can do only once.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True,
                            text=True, timeout=1200, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return _events(result.stdout)


@pytest.mark.slow
def test_structured_pruning_benchmark_quick():
    # Torch-Pruning is a benchmark-only install; the torchslim side must run without it.
    events = _run_script("structured_pruning.py", "--quick", "--no-torch-pruning", "--models", "lenet5",
                         "--factors", "2", "--train-limit", "1000", "--test-limit", "500", "--lenet-epochs", "1",
                         "--latency-rounds", "1")
    pruned = [e for e in events if e["event"] == "pruned"]
    assert pruned and all(e["macs_ratio"] <= 0.5 + 1e-6 for e in pruned)
    others = {e["model"]: e for e in events if e["event"] == "other_models"}
    assert others["resnet56"]["ok"] and others["mobilenetv2"]["ok"]  # 2x fewer MACs, no error


@pytest.mark.slow
def test_distillation_benchmark_quick():
    events = _run_script("distillation.py", "--quick", "--epochs", "1", "--train-limit", "2000",
                         "--methods", "alone,kd_online,kd_cached,dkd")
    runs = [e for e in events if e.get("event") == "run"]
    assert {r["method"] for r in runs} == {"alone", "kd_online", "kd_cached", "dkd"}
    cached = next(r for r in runs if r["method"] == "kd_cached")
    online = next(r for r in runs if r["method"] == "kd_online")
    # the same loss, whether the teacher's logits come from the fp16 cache or the teacher
    assert cached["test_accuracy"] == pytest.approx(online["test_accuracy"], abs=0.02)
