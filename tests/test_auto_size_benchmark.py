"""benchmarks/auto_size.py runs end to end in --smoke mode (slow: real Fashion-MNIST)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_auto_size_benchmark_smoke(tmp_path):
    pytest.importorskip("optuna")
    require_fashion_mnist()
    out = tmp_path / "run"
    # A subprocess: the script sets torch's thread pool, which a process can do only once.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "auto_size.py"), "--smoke", "--batch", "64",
                             "--trials", "2", "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {e["kind"]: e for e in (json.loads(line) for line in result.stdout.splitlines())}
    assert {"config", "dense", "chosen", "deep_compression_user", "summary"} <= set(lines)
    config, chosen, summary = lines["config"], lines["chosen"], lines["summary"]
    assert config["smoke"] and config["train"] == 2000 and config["test"] == 500
    bound = config["size_bytes"]
    assert bound == summary["bound"] and 0 < bound < lines["dense"]["onnx_bytes"]
    # The chosen file is measured after the full fine-tune and still meets the bound.
    assert chosen["bytes"] <= bound and summary["chosen_bytes"] == chosen["bytes"]
    assert summary["packed_points"] >= 1 and summary["points"] > summary["packed_points"]
    # Each of the 2 trials (unless it drew a plan already measured) is also measured as a packed file.
    assert 1 <= summary["trial_packed_points"] <= 2 and summary["trial_packed_within_bound"] <= 2
    if chosen["precision"] == "packed":
        assert set(chosen["codes"]) and all("/" in c for c in chosen["codes"].values())
    user = lines["deep_compression_user"]
    assert 0 < user["global_sparsity"] < 1 and user["within_bound"] == (user["bytes"] <= bound)
    if "uniform" in lines:  # chosen by its proxy within the bound; k-means after the fine-tune may code it larger
        assert 0 < lines["uniform"]["bytes"] < lines["dense"]["onnx_bytes"]
    assert (out / "pareto.json").is_file() and (out / "recipe.yaml").is_file()
