"""Bad input gets a clear error naming the problem, before training time is spent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import torchslim as ts
from torchslim.errors import ConfigError, ModelError

ROOT = Path(__file__).resolve().parent.parent


def _recipe(**sections) -> dict:
    doc = {
        "name": "bad", "data": {"dataset": "digits", "val_size": 0.1},
        "student": {"model": {"preset": "lenet300_100", "args": {"hidden1": 8, "hidden2": 4}},
                    "baseline": {"epochs": 1}},
        "evaluate": {"latency": False}, "export": {"onnx": False},
    }
    doc.update(sections)
    return doc


def _run(doc: dict, tmp_path: Path) -> None:
    ts.run_recipe(ts.pipeline.parse_recipe(doc), out=tmp_path / "run", progress=False)


def test_teacher_with_nan_weights_is_refused_by_name(tmp_path):
    teacher = ts.models.create("lenet300_100", input_size=8, hidden1=8, hidden2=4)
    with torch.no_grad():
        teacher.classifier[2].weight[0, 0] = float("nan")
    ts.save(teacher, tmp_path / "t.slim")
    doc = _recipe(teacher={"model": {"preset": "lenet300_100", "weights": str(tmp_path / "t.slim")}},
                  distill={"train": {"epochs": 1}})
    with pytest.raises(ModelError, match=r"teacher: classifier\.2\.weight holds 1 NaN/Inf"):
        _run(doc, tmp_path)


def test_model_that_rejects_the_input_shape(tmp_path):
    doc = _recipe()
    doc["student"]["model"]["args"]["in_channels"] = 3  # digits are 1-channel
    with pytest.raises(ModelError, match=r"student rejects inputs of shape \(2, 1, 8, 8\)"):
        _run(doc, tmp_path)


def test_teacher_and_student_with_different_outputs(tmp_path):
    doc = _recipe(teacher={"model": {"preset": "lenet300_100", "args": {"num_classes": 4}}, "train": {"epochs": 1}},
                  distill={"train": {"epochs": 1}})
    with pytest.raises(ModelError, match=r"teacher_init returns \(2, 4\).*expected \(2, 10\).*num_classes=10"):
        _run(doc, tmp_path)


def test_weights_file_for_another_model(tmp_path):
    ts.save(ts.models.create("lenet5", input_size=8), tmp_path / "lenet5.slim")
    doc = _recipe(teacher={"model": {"preset": "lenet300_100", "weights": str(tmp_path / "lenet5.slim")}},
                  distill={"train": {"epochs": 1}})
    with pytest.raises(ModelError, match="holds a 'lenet5' model, but the recipe names 'lenet300_100'"):
        _run(doc, tmp_path)


def test_unwritable_output_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write to output folder"):
        ts.run_recipe(ts.pipeline.parse_recipe(_recipe()), out=blocker / "run", progress=False)


def test_non_empty_output_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        ts.run_recipe(ts.pipeline.parse_recipe(_recipe()), out=out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a torchslim run folder"):
        ts.resume_run(tmp_path)


def test_cli_prints_one_line_errors_without_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(seed=-1)))
    result = subprocess.run([sys.executable, "-m", "torchslim", "run", str(tmp_path / "r.yaml")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "seed: Input should be greater than or equal to 0" in result.stderr
    assert "Traceback" not in result.stderr
