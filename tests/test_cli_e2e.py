"""End-to-end: the real pipeline through the ``torchslim`` CLI on a slice of real data.

Fashion-MNIST (a few thousand images, with the shipped teacher) when its files
are installed; scikit-learn's digits otherwise. One run is checked file by
file and number by number; a second is killed with SIGKILL mid-training and
resumed, and must end with exactly the same metrics.
"""

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

ROOT = Path(__file__).resolve().parent.parent
HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists() or bool(
    os.environ.get("TORCHSLIM_DATA"))

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # subprocess runs of the CLI: tens of seconds; CI runs them


def _recipe() -> dict:
    if HAVE_FMNIST:
        data = {"dataset": "fashion-mnist", "val_size": 500, "train_limit": 3000, "test_limit": 1000}
        teacher = {"model": {"preset": "fmnist_teacher", "weights": str(ROOT / "recipes/weights/fmnist_teacher.slim")}}
    else:
        data = {"dataset": "digits", "val_size": 0.1}
        teacher = {"model": {"preset": "fmnist_teacher", "args": {"width": 8, "fc": 32}},
                   "train": {"epochs": 3, "lr": 0.003, "batch_size": 64}}
    train = {"epochs": 3, "lr": 0.003, "batch_size": 64}
    return {
        "name": "e2e", "seed": 0, "threads": 1, "data": data, "teacher": teacher,
        "student": {"model": {"preset": "fmnist_student"}, "baseline": train},
        "distill": {"kd": {"temperature": 4.0, "alpha": 0.1}, "train": train},
        "prune": {"sparsity": 0.9, "scope": "global"},
        "finetune": {"distill_from": "unpruned", "train": {**train, "epochs": 2, "lr": 0.001}},
        "evaluate": {"latency_batch_sizes": [1, 16], "latency_budget_s": 0.05},
    }


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchslim", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "e2e.yaml"
    path.write_text(yaml.safe_dump(_recipe()))
    return path


@pytest.fixture(scope="module")
def finished_run(recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    result = _cli("run", str(recipe_file), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| student, distilled |" in result.stdout
    return out


def test_run_folder_holds_every_artifact(finished_run):
    for name in ("recipe.yaml", "metrics.jsonl", "report.md", "summary.json", "model.slim", "model.onnx",
                 "plots/training_curves.png", "plots/pruned_layer_sparsity.png"):
        assert (finished_run / name).is_file(), name
    for stage in ("teacher", "student_alone", "distilled", "pruned", "finetuned"):
        assert (finished_run / "models" / f"{stage}.slim").is_file(), stage
    for stage in ("student_alone", "distilled", "finetuned"):  # checkpoints live in the store, by content key
        (entry,) = (finished_run / "store").glob(f"{stage}-*")
        assert (entry / "work" / f"{stage}.pt").is_file() and (entry / "result.json").is_file(), stage
    for png in (finished_run / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(finished_run.rglob("*.tmp")), "a temporary file was left behind"
    # the resolved recipe writes every default out, except in train sections (written as given, so the
    # rules for fields not given hold again when --resume reads it)
    resolved = yaml.safe_load((finished_run / "recipe.yaml").read_text())
    assert resolved["version"] == 2
    stages = {s["id"]: s for s in resolved["stages"]}
    assert stages["evaluate"]["latency_batch_sizes"] == [1, 16] and "temperature" in str(stages["distilled"])
    assert stages["distilled"]["train"] == {"epochs": 3, "lr": 0.003, "batch_size": 64}


def test_metrics_and_report_numbers_hold_together(finished_run):
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    epochs = {(r["stage"], r["epoch"]) for r in records if "epoch" in r}
    assert len(epochs) == len([r for r in records if "epoch" in r]), "an epoch is recorded twice"
    assert {("student_alone", 3), ("distilled", 3), ("finetuned", 2)} <= epochs
    distill_records = [r for r in records if r.get("stage") == "distilled" and "epoch" in r]
    assert all({"train_task_loss", "train_kd_loss", "val_accuracy"} <= r.keys() for r in distill_records)

    summary = json.loads((finished_run / "summary.json").read_text())
    rows = {r["key"]: r for r in summary["rows"]}
    assert list(rows) == ["teacher", "student_alone", "distilled", "pruned", "finetuned"]
    if HAVE_FMNIST:
        assert rows["teacher"]["accuracy"] > 0.9  # the shipped teacher, on 1000 real test images
    for row in rows.values():
        assert 0.5 < row["accuracy"] <= 1.0, row
        assert row["latency_ms"]["1"] > 0 and row["latency_ms"]["16"] > 0
        assert row["file_bytes"] == (finished_run / "models" / f"{row['key']}.slim").stat().st_size
    student = rows["distilled"]
    assert rows["teacher"]["params"] > 10 * student["params"]
    for key in ("pruned", "finetuned"):
        assert rows[key]["params"] == student["params"]
        assert rows[key]["nonzero"] < 0.15 * student["nonzero"]
        assert rows[key]["file_bytes"] * 5 < student["file_bytes"]
    assert abs(summary["stages"]["pruned"]["report"]["global_sparsity"] - 0.9) < 1e-3
    assert summary["stages"]["export"]["report"]["onnx"]["max_abs_diff"] < 1e-4

    report = (finished_run / "report.md").read_text()
    for label in ("teacher", "student, trained alone", "student, distilled", "pruned + fine-tuned"):
        assert f"| {label} |" in report
    assert f"{100 * rows['finetuned']['accuracy']:.2f}%" in report


def test_final_model_reloads_with_the_reported_accuracy(finished_run):
    import torch

    import torchslim as ts
    from torchslim.data import load_dataset

    recipe = ts.load_recipe(finished_run / "recipe.yaml")
    d = recipe.data
    splits = load_dataset(d.dataset, val_size=d.validation(),
                          train_limit=d.train_limit, test_limit=d.test_limit, seed=recipe.seed)
    summary = json.loads((finished_run / "summary.json").read_text())
    model = ts.load(finished_run / "model.slim")
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())  # masks finalized
    assert ts.evaluate(model, splits.test)["accuracy"] == summary["rows"][-1]["accuracy"]
    with torch.no_grad():
        assert model.eval()(splits.test.x[:2]).shape == (2, splits.num_classes)


def test_profile_validate_and_models_commands(finished_run, recipe_file):
    prof = _cli("profile", str(finished_run / "model.slim"), "--batch-sizes", "1", "4")
    assert prof.returncode == 0, prof.stderr
    assert "nonzero" in prof.stdout and "MACs" in prof.stdout
    val = _cli("validate", str(recipe_file))
    assert val.returncode == 0 and "valid" in val.stdout
    models = _cli("models")
    assert models.returncode == 0 and "fmnist_teacher" in models.stdout and "lenet300_100" in models.stdout


def test_bad_recipe_is_refused_with_the_key_named(tmp_path):
    bad = _recipe()
    bad["distill"]["kd"]["temprature"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = _cli("run", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "distill.kd.temprature: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli("run", str(ROOT / "recipes/fashion_mnist.yaml"), "--set", "stages.pruned.method.sparsity=1.5",
                  "--out", str(tmp_path / "o2"))
    assert result.returncode == 2 and "stages.2.method.sparsity: Input should be less than 1" in result.stderr


def test_sigkill_during_training_then_resume_gives_the_same_metrics(finished_run, recipe_file, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "torchslim", "run", str(recipe_file), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("store/distilled-*/work/distilled.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-distillation"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "models" / "distilled.slim").exists()  # killed mid-stage

    resumed = _cli("run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "student_alone: done before, loading it from the store" in resumed.stderr
    fresh = json.loads((finished_run / "summary.json").read_text())
    again = json.loads((out / "summary.json").read_text())
    for a, b in zip(fresh["rows"], again["rows"]):
        assert (a["key"], a["accuracy"], a["nonzero"]) == (b["key"], b["accuracy"], b["nonzero"])
    epochs = lambda s: [(r["stage"], r["epoch"], r["train_loss"]) for r in s]  # noqa: E731
    load = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert epochs([r for r in load(out) if "epoch" in r]) == epochs([r for r in load(finished_run) if "epoch" in r])
    # metrics.jsonl as a whole equals the uninterrupted run's, timings aside (and does not grow on resume)
    timing = {"seconds", "samples_per_second", "latency_ms", "latency_min_ms", "cache_seconds"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    fresh_records = strip(load(finished_run))
    assert strip(load(out)) == fresh_records
    assert _cli("run", "--resume", str(out)).returncode == 0
    assert strip(load(out)) == fresh_records
