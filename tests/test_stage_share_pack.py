"""Pipeline stages ``share_weights`` and ``pack``: prune → share (centroids fine-tuned, distilling) → pack, on digits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim.pipeline import load_recipe, parse_recipe, run_recipe

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"epochs": 1, "lr": 0.003, "batch_size": 64}
MLP = {"preset": "lenet300_100", "args": {"hidden1": 32, "hidden2": 16}}


def _v2(stages: list[dict]) -> dict:
    return {"version": 2, "name": "dc", "seed": 0, "threads": 1, "data": {"dataset": "digits", "val_fraction": 0.15},
            "models": {"mlp": MLP}, "stages": stages}


STAGES = [
    {"kind": "train", "id": "trained", "train": TRAIN},
    {"kind": "prune", "id": "pruned", "method": {"sparsity": 0.8}},
    {"kind": "share_weights", "id": "shared", "method": {"linear_bits": 3}, "train": TRAIN, "teacher": "trained"},
    {"kind": "pack", "id": "packed"},
    {"kind": "evaluate", "latency": False},
]


def test_prune_share_pack_through_run_recipe(tmp_path):
    run = run_recipe(parse_recipe(_v2(STAGES)), out=tmp_path / "run", progress=False)
    summary = json.loads((run / "summary.json").read_text())
    packed = summary["stages"]["packed"]["report"]
    assert packed["bit_exact"] and packed["file_bytes"] == (run / "model.packed.slim").stat().st_size
    assert packed["compression"] > 5
    model = ts.load(run / "model.packed.slim")
    for layer in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        w = layer.weight
        assert torch.unique(w[w != 0]).numel() <= 8  # 3 bits
        assert torch.all(w[layer.weight_mask == 0] == 0)  # the prune stage's masks held
    shared = summary["stages"]["shared"]["report"]
    assert shared["epochs"] == 1 and all(v["bits"] == 3 for v in shared["layers"].values())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "shared" and "train_kd_loss" in r for r in records)  # centroids distilled
    report = (run / "report.md").read_text()
    assert "## Weight sharing: `shared`" in report and "## Packed artifact" in report and "weight bits" in report


def test_a_bad_sharing_pattern_fails_in_plan_before_training(tmp_path):
    stages = [dict(s) for s in STAGES]
    stages[0] = {**stages[0], "train": {**TRAIN, "epochs": 50}}
    stages[2] = {**stages[2], "method": {"overrides": {"re:nothing.*": 4}}}
    started = time.perf_counter()
    with pytest.raises(ts.ConfigError, match="nothing"):
        run_recipe(parse_recipe(_v2(stages)), out=tmp_path / "run", progress=False)
    assert time.perf_counter() - started < 10


def test_teacher_without_train_is_refused_when_the_recipe_is_read():
    with pytest.raises(ts.ConfigError, match="add 'train'"):
        parse_recipe(_v2([{"kind": "share_weights", "teacher": "mlp"}]))


def test_the_shipped_deep_compression_recipe_validates():
    recipe = load_recipe(ROOT / "recipes" / "fmnist_deep_compression.yaml")
    kinds = [s.kind for s in recipe.stages]
    assert kinds.index("prune") < kinds.index("share_weights") < kinds.index("pack")
    assert recipe.models["lenet"].preset == "lenet300_100"
