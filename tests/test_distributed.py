"""Two gloo processes under torchrun give the single-process result.

Every step's batch is split across the ranks and DDP averages the gradients,
so a model without BatchNorm follows the same trajectory up to float summation
order. Stated tolerance: accuracies within 1 point, pruned weight counts equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # subprocess runs of the CLI: tens of seconds; CI runs them

RECIPE = {
    "name": "ddp", "seed": 0, "threads": 1,
    "data": {"dataset": "digits", "val_size": 0.1},
    "teacher": {"model": {"preset": "lenet300_100", "args": {"hidden1": 64, "hidden2": 32}},
                "train": {"epochs": 4, "lr": 0.003, "batch_size": 64}},
    "student": {"model": {"preset": "lenet300_100", "args": {"hidden1": 16, "hidden2": 8}},
                "baseline": {"epochs": 4, "lr": 0.003, "batch_size": 64}},
    "distill": {"train": {"epochs": 4, "lr": 0.003, "batch_size": 64}},
    "prune": {"sparsity": 0.8, "schedule": "gradual"},
    "finetune": {"train": {"epochs": 2, "lr": 0.001, "batch_size": 64}},
    "evaluate": {"latency_batch_sizes": [1], "latency_budget_s": 0.02},
    "export": {"onnx": False},
}


def _rows(run: Path) -> dict:
    return {r["key"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}


def test_two_gloo_processes_match_one_process(tmp_path):
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "torchslim", "run", str(recipe), "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "torchslim", "run", str(recipe), "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout.count("run folder:") == 1  # rank 0 alone reports

    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert list(one) == list(two)
    for key in one:
        assert abs(one[key]["accuracy"] - two[key]["accuracy"]) <= 0.01, key
        assert one[key]["nonzero"] == two[key]["nonzero"], key
    # rank 0 alone wrote the run folder: one copy of each file, no leftovers from rank 1
    assert sorted(p.name for p in (tmp_path / "two" / "models").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "models").iterdir())
    assert not list((tmp_path / "two").rglob("*.tmp"))
