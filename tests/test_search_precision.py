"""The precision axis of torchslim.search: int8 twins of the measured plans, an int8 choice, its files and recipe.

The search fixture (about 20 s on a loaded 2-core machine: 4 quantizations, a fine-tune and the
default-exporter export of the chosen int8 file) backs the slow tier; the checks of bad input are fast.
One tiny search (digits, a width-8 fmnist_teacher, one searchable group, keep 100% or 50%) under a
size budget that only int8 files meet, so the chosen point is int8; timings use batch 16 and 10 ms
of timing per point (noisy but real).
"""

from __future__ import annotations

import json

import pytest
import yaml

import torchslim as ts
import torchslim.search as search
from torchslim.errors import ConfigError
from torchslim.search import Budget, SearchSpace
from conftest import digits_teacher

pytest.importorskip("onnxruntime.quantization")
onnx = pytest.importorskip("onnx")

from torchslim.measure.ort import ort_accuracy  # noqa: E402
import torchslim.search.api as search_api  # noqa: E402
from torchslim.search.precision import int8_config  # noqa: E402

DATA = {"dataset": "digits", "val_fraction": 0.1}
# The packed axes off: these tests meet their size bound with the int8 file (test_search_packed.py
# covers the sparse / shared points).
SPACE = SearchSpace(keep=[1.0, 0.5], bn_batches=1, max_candidates=1, exclude=["re:features.*"],
                    int8_calibration_samples=128, sparsity=[], share_bits=[])


@pytest.fixture(scope="module")
def model(splits):
    return digits_teacher(splits.train, epochs=4)


@pytest.fixture(scope="module")
def dense_fp32(model, splits, tmp_path_factory):
    """The dense model's fp32 file as the search exports it (TorchScript exporter)."""
    path = tmp_path_factory.mktemp("dense") / "dense.onnx"
    ts.export.export_onnx(model, splits.train.x[:2], path, check=False, exporter="torchscript")
    return path


@pytest.fixture(scope="module")
def result(model, splits, dense_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto_int8")
    # The one fp32 cut (half of classifier.0) keeps 83% of the bytes: only int8 files fit in 75%.
    budget = Budget(size_bytes=int(0.75 * dense_fp32.stat().st_size), batch=16, latency_budget_s=0.01)
    # int8_layers="sweep": the per-layer sweep on the dense model decides which layers stay float.
    # Its choice rests on timings, so on a loaded machine it may keep classifier.0 float and no
    # file fits the budget: the real sweep runs, then its answer is pinned to the first conv
    # (what it chooses on a quiet machine) so that what follows is deterministic.
    real = search_api.layer_precision

    def pinned(*args, **kwargs):
        config, why = real(*args, **kwargs)
        return config.model_copy(update={"exclude": ("features.0",)}), why

    space = SPACE.model_copy(update={"int8_layers": "sweep"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search_api, "layer_precision", pinned)
        r = search.search(model, splits.train, splits.val, budget, space, finetune=ts.TrainConfig(epochs=1),
                          test=splits.test, out=out, recipe_data=DATA, uniform=False)
    return r, out


@pytest.mark.slow
def test_every_measured_plan_has_an_int8_twin_on_the_same_plan(result, splits, model, dense_fp32):
    r, _ = result
    fp32 = [p for p in r.points if p.precision == "fp32"]
    int8 = [p for p in r.points if p.precision == "int8"]
    assert {p.source for p in fp32} == {"dense", "sweep"} and len(int8) == len(fp32)
    for p in fp32:
        twin = next(q for q in int8 if q.plan == p.plan and q.source == p.source)
        assert twin.bytes < p.bytes and twin.macs == p.macs and twin.latency_p50_ms > 0
        assert twin.extra["int8"]["fp32_twin_accuracy"] == p.accuracy
    # The int8 point's accuracy is its file's, run in ONNX Runtime on the whole validation split;
    # every twin keeps float the layers the sweep chose on the dense model.
    d8 = next(q for q in int8 if q.source == "dense")
    excluded = d8.extra["int8"]["excluded"]
    assert all(q.extra["int8"]["excluded"] == excluded for q in int8)
    config = int8_config(SPACE).model_copy(update={"exclude": tuple(excluded)})
    dense_int8 = ts.quant.quantize(model, config, calib=splits.train, fp32_onnx=dense_fp32)
    assert d8.accuracy == pytest.approx(ort_accuracy(dense_int8.int8_onnx, splits.val.x, splits.val.y, threads=1))
    assert d8.bytes == dense_int8.int8_bytes
    assert r.prediction_error["points"] == 1  # the fp32 sweep point only: int8 points have no prediction


@pytest.mark.slow
def test_int8_choice_ships_the_int8_file_and_a_quantize_stage(result, splits):
    r, out = result
    # Off the accuracy-latency front (int8 is slower on a model this small), chosen by size among all points.
    assert r.chosen.precision == "int8" and r.chosen in r.points and r.chosen.bytes <= r.dense.bytes * 0.75
    assert r.metrics["precision"] == "int8" and r.quantized is not None
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "QuantizeLinear" in ops  # model.onnx is the int8 file; the float export sits beside it
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(out / "model.fp32.onnx")).graph.node}
    assert r.metrics["val_accuracy"] == pytest.approx(
        ort_accuracy(str(out / "model.onnx"), splits.val.x, splits.val.y, threads=1))
    payload = json.loads((out / "pareto.json").read_text())
    assert payload["precision"] == ["fp32", "int8"] and payload["chosen"]["precision"] == "int8"
    assert {row["precision"] for row in payload["points"]} == {"fp32", "int8"}
    recipe = ts.pipeline.parse_recipe(yaml.safe_load((out / "recipe.yaml").read_text()), "recipe.yaml",
                                      base_dir=out)
    kinds = [s.kind for s in recipe.stages]
    assert kinds[-3:] == ["quantize", "evaluate", "export"]
    q = recipe.stages[kinds.index("quantize")]
    assert q.method == r.quantized.config and q.fallback_if_slower is False
    kept = next(p for p in r.points if p.precision == "int8" and p.source == "dense").extra["int8"]["excluded"]
    assert list(q.method.exclude) == r.metrics["kept_float"] == list(r.quantized.excluded) == kept
    assert "precision | val acc" in r.summary() and "int8 file in ONNX Runtime" in r.summary()


def test_precision_checked_before_anything_is_measured(splits):
    model = ts.models.create("fmnist_teacher", input_size=8, num_classes=10, width=8, fc=32).eval()  # never trained
    with pytest.raises(ConfigError, match="ONNX Runtime"):
        search.search(model, splits.train, splits.val, Budget(max_drop=1, runtime="torch", batch=16),
                      SPACE.model_copy(update={"precision": ["int8"]}))
    with pytest.raises(ConfigError, match="trials refine fp32"):
        search.search(model, splits.train, splits.val, Budget(max_drop=1, batch=16),
                      SPACE.model_copy(update={"precision": ["int8"]}), trials=2)
    for bad in ([], ["int8", "int8"], ["int4"]):
        with pytest.raises(Exception, match="precision"):
            SearchSpace(precision=bad)
    spaces = (SearchSpace(precision=["fp32", "int8"]), SearchSpace())
    assert all(ts.config_from_dict(s.to_dict()) == s for s in spaces)


def test_cli_precision_flag():
    from torchslim.cli.auto import _PRECISION
    from torchslim.cli.main import build_parser

    args = build_parser().parse_args(["auto", "m.slim", "--data", "digits", "--max-drop", "0.5", "--precision", "int8"])
    assert _PRECISION[args.precision] == ["int8"]
    default = build_parser().parse_args(["auto", "m.slim", "--data", "digits", "--max-drop", "0.5"])
    assert default.precision is None and default.int8_layers == "all"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["auto", "m.slim", "--data", "digits", "--max-drop", "0.5", "--precision", "int4"])


@pytest.mark.slow
def test_recipe_reproduces_the_chosen_int8_file(result, splits, tmp_path):
    r, out = result
    run = ts.run_recipe(out / "recipe.yaml", out=tmp_path / "run", progress=False)
    again = ort_accuracy(str(run / "model.int8.onnx"), splits.test.x, splits.test.y, threads=1)
    assert abs(100 * again - 100 * r.metrics["test_accuracy"]) <= 0.1


def test_int8_gain_within_noise_keeps_the_fp32_twin():
    from torchslim.search import Point
    from torchslim.search.precision import prefer_fp32_twin

    plan = {"a": 4}
    fp32 = Point(plan, "dense", 0.88, 0.0, 10.0, 11.0, 1.0, 600, 100)
    near = Point(plan, "dense", 0.8802, -0.02, 9.95, 11.0, 0.995, 160, 100, precision="int8")
    fast = Point(plan, "dense", 0.8802, -0.02, 5.0, 6.0, 0.5, 160, 100, precision="int8")
    budget = Budget(max_drop=0.5)
    assert prefer_fp32_twin(near, [fp32, near], budget) is fp32  # 0.5% faster: timing noise
    assert prefer_fp32_twin(fast, [fp32, fast], budget) is fast
    assert prefer_fp32_twin(near, [fp32, near], Budget(latency=1.0)) is near  # accuracy-maximised: untouched
