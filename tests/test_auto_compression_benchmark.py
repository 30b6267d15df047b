"""benchmarks/auto_compression.py runs end to end in --smoke mode (slow: real Fashion-MNIST)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_auto_compression_benchmark_smoke(tmp_path):
    pytest.importorskip("optuna")
    pytest.importorskip("onnxruntime.quantization")
    require_fashion_mnist()
    out = tmp_path / "run"
    # A subprocess: the script sets torch's thread pool, which a process can do only once.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "auto_compression.py"), "--smoke",
                             "--batch", "64", "--trials", "2", "--reproduce", "--out", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = {e["kind"] for e in lines}
    assert {"config", "dense", "point", "tables_error", "finalists", "chosen", "refinement",
            "chosen_without_trials", "reproduce", "uniform_vs_front", "summary"} <= kinds
    config = next(e for e in lines if e["kind"] == "config")
    assert config["smoke"] and config["train"] == 2000 and config["val"] == 500 and config["test"] == 500
    points = [e for e in lines if e["kind"] == "point"]
    summary = next(e for e in lines if e["kind"] == "summary")
    assert summary["points"] == len(points) and summary["front"] == sum(p["on_front"] for p in points)
    assert {p["source"] for p in points} >= {"dense", "sweep", "uniform", "trial"}
    assert {p["precision"] for p in points} == {"fp32", "int8"}
    chosen = {e["budget"]: e for e in lines if e["kind"] == "chosen"}
    assert set(chosen) == {"max_drop_0.5", "latency_0.25x"}
    # Every feasible chosen model is faster than the dense file, and the "latency" one within its bound.
    assert all(c["ort_speedup"] > 1 for c in chosen.values() if c["feasible"])
    if chosen["latency_0.25x"]["feasible"]:
        assert chosen["latency_0.25x"]["latency_ratio"] <= 0.25
    # The emitted recipe, run by the pipeline, rebuilds the chosen file.
    assert next(e for e in lines if e["kind"] == "reproduce")["within_0.1"]
    assert (out / "pareto.json").is_file() and (out / "recipe.yaml").is_file() and (out / "store").is_dir()
    # The baselines at equal accuracy after the fine-tune: a ladder of uniform plans, each probe named.
    ladders = [e for e in lines if e["kind"] == "uniform_at_equal_accuracy"]
    for row in ladders:  # per precision at most 2 probes (--smoke); none when the choice is itself uniform
        assert len(row["uniform"]) <= 4 and all("matches" in u for u in row["uniform"])
        if not row["uniform"]:
            assert row["speedup"] == 1.0 and row["match_latency_ratio"] == row["chosen_latency_ratio"]
            continue
        matched = [u for u in row["uniform"] if u["matches"]]
        assert (row["speedup"] is None) == (not matched)
        if matched:
            fastest = min(u["latency_ratio"] for u in matched)
            assert row["speedup"] == pytest.approx(fastest / row["chosen_latency_ratio"])
            assert all(u["val_drop"] <= row["chosen_val_drop"] + 1e-9 for u in matched)
    tp = [e for e in lines if e["kind"] in ("torch_pruning", "torch_pruning_at_equal_accuracy")]
    skipped = [e for e in lines if e["kind"] == "skip" and e["what"] == "torch_pruning"]
    assert tp or skipped
    for row in (e for e in tp if e["kind"] == "torch_pruning_at_equal_accuracy"):
        assert len(row["probes"]) == 2
        assert (row["speedup"] is None) == (row["match_global_ratio"] is None)
