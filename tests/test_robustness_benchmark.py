"""The robustness matrix benchmark runs end to end in --quick mode (slow: real Fashion-MNIST)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_robustness_benchmark_quick():
    require_fashion_mnist()
    # A subprocess: the script sets torch's thread pools, which a process can do only once. Two
    # workers, so the jobs' way through other processes (how the full matrix runs) is exercised.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "robustness.py"), "--quick", "--workers", "2"],
                            capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    config = next(e for e in events if e["event"] == "config")
    assert config["dataset"] == "fashion-mnist" and config["train_samples"] == 1000 and config["workers"] == 2
    cells = [e for e in events if e["event"] == "cell"]
    assert {(c["cell"], c["ours"], c["peer"]) for c in cells if c["cell"] == "kd"} == {
        ("kd", side, peer) for side in ("kd_default", "dkd_default") for peer in ("alone", "tutorial_kd")}
    assert {c["setting"] for c in cells if c["cell"] == "unstructured"} == {"0.9", "0.95", "0.98"}
    channels = [c for c in cells if c["cell"] == "channels"]
    skipped = [e for e in events if e["event"] == "skip" and e["cell"] == "channels"]
    assert (channels and {c["setting"] for c in channels} == {"2x", "4x"}) or skipped
    for c in cells:  # every comparison names a winner and its spread
        assert c["winner"] in ("torchslim", "peer", "tie") and c["se"] >= 0 and 0 <= c["ours_mean"] <= 1
    runs = [e for e in events if e["event"] == "run" and e["cell"] == "channels"]
    assert all(r["macs_ratio"] <= 1 / 2 + 1e-6 if r["setting"] == "2x" else r["macs_ratio"] <= 1 / 4 + 1e-6
               for r in runs)
    assert "winner" in result.stderr and "comparisons" in result.stderr  # the summary table
