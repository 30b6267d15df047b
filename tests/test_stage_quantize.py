"""The ``quantize`` stage in a tiny v2 recipe on digits: files, report, plan-time checks."""

from __future__ import annotations

import json
import os

import pytest

from torchslim.errors import ConfigError
from torchslim.pipeline import parse_recipe, run_recipe

TEACHER = {"preset": "fmnist_teacher", "args": {"width": 4, "fc": 16}}
MLP = {"preset": "lenet300_100", "args": {"hidden1": 16, "hidden2": 8}}


def _recipe(stages: list[dict], model: dict = TEACHER) -> dict:
    return {"version": 2, "name": "q", "seed": 0, "threads": 1,
            "data": {"dataset": "digits", "val_fraction": 0.15, "train_limit": 256, "test_limit": 128},
            "models": {"net": model}, "stages": stages}


TRAIN = {"kind": "train", "id": "trained", "train": {"epochs": 1, "lr": 0.003, "batch_size": 64}}
QUANT = {"kind": "quantize", "method": {"calibration_samples": 64, "exclude": ["classifier.3"]},
         "latency_batch_sizes": [1, 16], "latency_budget_s": 0.05, "fallback_if_slower": False}


def test_quantize_stage_writes_int8_and_fp32_onnx_and_reports_ort_accuracy(tmp_path):
    run = run_recipe(parse_recipe(_recipe([TRAIN, QUANT])), out=tmp_path / "run", progress=False)
    assert (run / "model.int8.onnx").is_file() and (run / "model.fp32.onnx").is_file()
    assert (run / "model.int8.onnx").stat().st_size < (run / "model.fp32.onnx").stat().st_size
    summary = json.loads((run / "summary.json").read_text())
    rep = summary["stages"]["quantize"]["report"]
    assert rep["quant"]["excluded"] == ["classifier.3"] and rep["quant"]["bn_folded"]
    assert rep["quant"]["scheme"] == "U8S8" and rep["shipped"] == "int8"
    assert set(rep["accuracy"]) == {"ort_fp32", "ort_int8", "torch"}
    assert abs(rep["accuracy"]["ort_fp32"] - rep["accuracy"]["torch"]) < 1e-9  # the fp32 file is the model
    assert set(rep["latency"]) == {"1", "16"} and set(rep["latency"]["1"]) == {"ort_fp32", "ort_int8", "torch"}
    report = (run / "report.md").read_text()
    assert "## Quantization (quantize)" in report and "`model.int8.onnx`" in report and "ONNX Runtime" in report


def test_an_exclude_name_that_matches_no_layer_fails_in_plan_before_training(tmp_path):
    bad = {**QUANT, "method": {"exclude": ["classifier.9"]}}
    with pytest.raises(ConfigError, match="classifier.9"):
        run_recipe(parse_recipe(_recipe([TRAIN, bad])), out=tmp_path / "run", progress=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or "train_loss" not in metrics.read_text()  # nothing trained


def test_dynamic_mode_on_a_conv_model_fails_in_plan(tmp_path):
    with pytest.raises(ConfigError, match="Linear-only"):
        run_recipe(parse_recipe(_recipe([{"kind": "quantize", "method": {"mode": "dynamic"}}])),
                   out=tmp_path / "run", progress=False)


def test_the_slower_int8_file_is_not_shipped_when_fallback_is_on(tmp_path):
    # Dynamic int8 of a 16-8 MLP on 8x8 inputs: quantizing activations at run time costs more than it saves.
    stage = {"kind": "quantize", "method": {"mode": "dynamic"}, "latency_batch_sizes": [1],
             "latency_budget_s": 0.05}
    run = run_recipe(parse_recipe(_recipe([stage], MLP)), out=tmp_path / "run", progress=False)
    rep = json.loads((run / "summary.json").read_text())["stages"]["quantize"]["report"]
    assert rep["shipped"] == ("fp32" if rep["int8_slower"] else "int8")
    assert (run / "model.int8.onnx").is_file() == (rep["shipped"] == "int8")
    assert (run / "model.fp32.onnx").is_file()


def test_cli_quantize_writes_the_int8_file_and_prints_ort_accuracy(tmp_path, capsys):
    import torch

    import torchslim as ts
    from torchslim.cli.main import main

    torch.manual_seed(0)
    model = ts.models.create("fmnist_student", width=4, fc=8, input_size=8)
    ts.save(model, tmp_path / "m.slim", input_shape=[1, 8, 8])
    rc = main(["quantize", os.fspath(tmp_path / "m.slim"), "--data", "digits", "--out", os.fspath(tmp_path / "out"),
               "--calibration", "percentile", "--calibration-samples", "32", "--exclude", "classifier.2",
               "--no-latency"])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "out" / "m.int8.onnx").is_file() and (tmp_path / "out" / "m.fp32.onnx").is_file()
    assert "ONNX Runtime fp32" in out and "int8" in out and "kept float: classifier.2" in out
    assert main(["quantize", os.fspath(tmp_path / "m.slim"), "--data", "digits", "--exclude", "nope"]) == 2


STUDENT = {"preset": "fmnist_student", "args": {"width": 4, "fc": 8}}


def test_precision_auto_sweeps_each_layer_and_reports_which_stayed_float(tmp_path):
    stage = {"kind": "quantize", "precision": "auto", "precision_samples": 64, "method": {"calibration_samples": 32},
             "latency_batch_sizes": [1, 16], "latency_budget_s": 0.02, "fallback_if_slower": False}
    # Three Linear layers: the sweep quantizes the model 4 or 5 times (all int8, each layer float, the choice).
    run = run_recipe(parse_recipe(_recipe([stage], MLP)), out=tmp_path / "run", progress=False)
    rep = json.loads((run / "summary.json").read_text())["stages"]["quantize"]["report"]
    sweep = rep["sweep"]
    assert set(sweep["layers"]) == set(rep["layers"]) and len(sweep["layers"]) == 3
    kept = [n for n, v in sweep["layers"].items() if v["keep_float"]]
    assert sweep["exclude"] == kept  # the per-layer rule
    assert sweep["final"]["exclude"] == rep["quant"]["excluded"]  # the measured choice is what was quantized
    # the final file is never slower than fp32 where the sweep measured it, unless every layer is float
    assert not sweep["slower_at"] or set(sweep["final"]["exclude"]) == set(sweep["layers"])
    assert all(set(v["latency_ms"]) == {"1", "16"} for v in sweep["layers"].values())
    assert rep["int8_slower_at"] == [b for b, v in rep["latency"].items() if v["ort_int8"] > v["ort_fp32"]]
    report = (run / "report.md").read_text()
    assert "Per-layer precision" in report and "Layers kept float by the sweep" in report


def test_qat_option_trains_through_fit_and_the_int8_file_matches_the_fake_quant_model(tmp_path):
    stage = {"kind": "quantize", "latency": False,
             "qat": {"train": {"epochs": 1, "lr": 0.001, "batch_size": 64}, "teacher": "net",
                     "method": {"calibration_samples": 64}}}
    run = run_recipe(parse_recipe(_recipe([TRAIN, stage])), out=tmp_path / "run", progress=False)
    rep = json.loads((run / "summary.json").read_text())["stages"]["quantize"]["report"]
    assert rep["quant"]["mode"] == "qat" and rep["quant"]["epochs"] == 1 and rep["shipped"] == "int8"
    assert rep["qat"]["agreement"] >= 0.995 and rep["qat"]["max_logit_diff"] < 0.05
    assert (run / "model.int8.onnx").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "quantize" and "train_kd_loss" in r for r in metrics)
    assert "Quantization-aware training" in (run / "report.md").read_text()


def test_qat_teacher_that_does_not_exist_fails_in_plan(tmp_path):
    stage = {"kind": "quantize", "qat": {"teacher": "nope"}}
    with pytest.raises(ConfigError, match="nope"):
        run_recipe(parse_recipe(_recipe([TRAIN, stage])), out=tmp_path / "run", progress=False)
