"""SIGKILL at any stage, then --resume: the same final metrics, nothing corrupt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import torchslim as ts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # subprocess runs of the CLI: tens of seconds; CI runs them

TRAIN = {"epochs": 25, "lr": 0.002, "batch_size": 32}
RECIPE = {
    "name": "kill", "seed": 1, "threads": 1,
    "data": {"dataset": "digits", "val_size": 0.1},
    "teacher": {"model": {"preset": "lenet300_100", "args": {"hidden1": 256, "hidden2": 128}}, "train": TRAIN},
    "student": {"model": {"preset": "lenet300_100", "args": {"hidden1": 128, "hidden2": 64}}},
    "distill": {"train": TRAIN},
    "prune": {"sparsity": 0.9, "schedule": "gradual"},
    "finetune": {"train": TRAIN},
    "evaluate": {"latency": False},
    "export": {"onnx": False},
}


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torchslim", "run", str(recipe), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _epochs(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["epoch"], r["train_loss"], r.get("val_accuracy")) for r in records if "epoch" in r]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kill") / "kill.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = _start(recipe, out)
    assert proc.wait(timeout=600) == 0
    return out


@pytest.mark.parametrize("stage", ["teacher", "distilled", "finetuned"])
def test_kill_during_a_stage_then_resume(stage, recipe, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = _start(recipe, out)
    deadline = time.time() + 600  # checkpoints live in the stage's store entry
    while not list(out.glob(f"store/{stage}-*/work/{stage}.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "models" / f"{stage}.slim").exists(), f"{stage} finished before the kill"

    # Nothing half-written: every JSON line parses, every finished model loads.
    if (out / "metrics.jsonl").exists():  # a kill right after the first checkpoint precedes it
        for line in (out / "metrics.jsonl").read_text().splitlines():
            json.loads(line)
    for model_file in (out / "models").glob("*.slim"):
        ts.load(model_file)

    resumed = subprocess.run([sys.executable, "-m", "torchslim", "run", "--resume", str(out)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _epochs(out) == _epochs(uninterrupted)
    # the whole metrics.jsonl equals the uninterrupted run's, timings aside
    timing = {"seconds", "samples_per_second", "cache_seconds"}
    strip = lambda run: [{k: v for k, v in json.loads(x).items() if k not in timing}  # noqa: E731
                         for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(out) == strip(uninterrupted)
    straight = json.loads((uninterrupted / "summary.json").read_text())["rows"]
    again = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["key"], r["accuracy"], r["nonzero"]) for r in again] == \
        [(r["key"], r["accuracy"], r["nonzero"]) for r in straight]
    assert not list(out.rglob("*.tmp"))
