"""Int8 PTQ in ONNX Runtime (torchslim.quant) and ONNX Runtime latency (torchslim.measure.ort): tiny models."""

from __future__ import annotations

import copy
import types

import onnx
import pytest
import torch

import torchslim as ts
from torchslim.config import config_from_dict
from torchslim.errors import ConfigError, ModelError
from torchslim.measure import compare_ort_latency, ort_accuracy, ort_latency
from torchslim.quant import Int8Config, cpu_int8_profile, layer_node_map, quantize, resolved_types


@pytest.fixture(scope="module")
def data():
    """A learnable 3-class problem on 1x8x8 inputs, and a tiny conv-BN model trained on it."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (384,), generator=gen)
    x = torch.randn(384, 1, 8, 8, generator=gen) * 0.5
    x[:, 0, :, :] += (y.float() - 1).view(-1, 1, 1)  # each class shifts the image
    split = types.SimpleNamespace(x=x, y=y)
    torch.manual_seed(0)
    model = ts.models.create("fmnist_teacher", width=4, fc=16, input_size=8, num_classes=3)
    ts.fit(model, split, ts.TrainConfig(epochs=2, lr=0.01, batch_size=64), progress=False)
    return split, model


@pytest.fixture(scope="module")
def base(data):
    """The module's model quantized once; tests that need another int8 file reuse its fp32 export."""
    split, model = data
    return quantize(model, Int8Config(calibration_samples=64), calib=split)


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    return path


def test_config_round_trips_and_rejects_bad_values():
    c = Int8Config(calibration="percentile", percentile=99.9, exclude=["re:features\\..*"], per_channel=True)
    assert config_from_dict(c.to_dict()) == c
    for bad in ({"calibration": "kl"}, {"mode": "weights"}, {"reduce_range": "yes"}, {"exclude": ["re:("]},
                {"calibration_samples": 0}, {"opset": 11}):
        with pytest.raises(ConfigError):
            Int8Config(**bad)


def test_cpu_profile_picks_reduce_range_only_without_vnni(tmp_path):
    avx2 = cpu_int8_profile(_cpuinfo(tmp_path, "avx avx2 fma"))
    assert (avx2["isa"], avx2["activation_type"], avx2["weight_type"], avx2["reduce_range"]) == \
        ("avx2", "uint8", "int8", True)
    assert "vpmaddubsw" in avx2["why"]
    vnni = cpu_int8_profile(_cpuinfo(tmp_path, "avx2 avx512f avx512bw avx512_vnni"))
    assert (vnni["isa"], vnni["reduce_range"]) == ("avx512_vnni", False)
    assert cpu_int8_profile(_cpuinfo(tmp_path, "avx2 avx512f avx512bw"))["isa"] == "avx512"
    forced = resolved_types(Int8Config(reduce_range=False, activation_type="int8"), avx2)
    assert forced["scheme"] == "S8S8" and forced["reduce_range"] is False


def test_layer_names_map_to_onnx_nodes_in_order(data, tmp_path):
    _, model = data
    ts.export.export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    mapping = layer_node_map(model, torch.randn(1, 1, 8, 8), onnx.load(tmp_path / "m.onnx"))
    assert list(mapping) == ["features.0", "features.3", "features.7", "features.10", "classifier.0", "classifier.3"]
    ops = {n.name: n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert [ops[mapping[k]] for k in ("features.0", "classifier.3")] == ["Conv", "Gemm"]


def test_static_int8_runs_in_ort_close_to_float_and_leaves_the_model_unchanged(data, tmp_path):
    split, model = data
    before = copy.deepcopy(model.state_dict())
    q = quantize(model, Int8Config(calibration_samples=128), calib=split, workdir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    fp32, int8 = q.evaluate(split, precision="fp32")["accuracy"], q.evaluate(split)["accuracy"]
    assert fp32 > 0.8 and abs(fp32 - int8) <= 0.03
    assert fp32 == pytest.approx(ts.evaluate(model, split)["accuracy"])  # the fp32 file is the torch model
    graph = onnx.load(q.int8_path).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 0 and q.describe()["bn_folded"]
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)
    assert q.fp32_path.read_bytes() == q.fp32_onnx and q.int8_path.stat().st_size == q.int8_bytes < q.fp32_bytes
    d = q.describe()
    assert d["scheme"] == "U8S8" and d["int8_layers"][0] == "features.0" and d["excluded"] == []


@pytest.mark.parametrize("config", [Int8Config(calibration="percentile", calibration_samples=64, per_channel=True),
                                    Int8Config(calibration="entropy", calibration_samples=64)])
def test_percentile_entropy_and_per_channel(data, base, config):
    split, model = data
    q = quantize(model, config, calib=split, fp32_onnx=base.fp32_onnx)
    assert abs(q.evaluate(split)["accuracy"] - q.evaluate(split, precision="fp32")["accuracy"]) <= 0.05
    assert q.describe()["calibration"] == config.calibration


def test_excluded_layers_stay_float(data, base):
    split, model = data
    q = quantize(model, Int8Config(calibration_samples=32, exclude=["classifier.3", "re:features\\.(0|3)"]),
                 calib=split, fp32_onnx=base.fp32_onnx)
    assert q.excluded == ["features.0", "features.3", "classifier.3"]
    graph = onnx.load_from_string(q.int8_onnx).graph
    kept = {q.layers[n] for n in q.excluded}
    float_weight = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for node in graph.node:
        if node.name in kept:
            assert node.input[1] in float_weight  # a float weight, no DequantizeLinear in front
    with pytest.raises(ConfigError, match="classifier.7"):
        quantize(model, Int8Config(exclude=["classifier.7"]), calib=split)


def test_dynamic_is_for_linear_only_models(data):
    split, model = data
    with pytest.raises(ConfigError, match="Linear-only"):
        quantize(model, Int8Config(mode="dynamic"), example=split.x[:2])
    mlp = ts.models.create("lenet300_100", hidden1=16, hidden2=8, input_size=8, num_classes=3)
    q = quantize(mlp, Int8Config(mode="dynamic"), example=split.x[:2])
    ops = {n.op_type for n in onnx.load_from_string(q.int8_onnx).graph.node}
    assert "MatMulInteger" in ops and q.calibration_samples == 0
    assert abs(q.evaluate(split)["accuracy"] - q.evaluate(split, precision="fp32")["accuracy"]) <= 0.05
    with pytest.raises(ModelError, match="calibration"):
        quantize(mlp, Int8Config())


def test_ort_latency_and_alternated_comparison(data, base, tmp_path):
    split, model = data
    path = tmp_path / "m.onnx"
    path.write_bytes(base.fp32_onnx)
    one = ort_latency(path, (1, 8, 8), batch_size=4, threads=1, repeats=5)
    assert one["repeats"] == 5 and one["threads"] == 1 and 0 < one["median_ms"] <= one["p90_ms"]
    threads = torch.get_num_threads()
    both = compare_ort_latency({"a": path, "b": path.read_bytes()}, split.x[:1], 8, threads=1, repeats=6,
                               torch_models={"eager": model})
    assert sorted(both) == ["a", "b", "eager"] and both["a"]["repeats"] == both["eager"]["repeats"] == 6
    assert both["eager"]["runtime"] == "torch" and both["a"]["runtime"] == "onnxruntime"
    assert both["eager"]["threads"] == 1 and torch.get_num_threads() == threads and model.training
    with pytest.raises(ModelError, match="both ONNX and torch"):
        compare_ort_latency({"a": path}, split.x[:1], 2, repeats=1, torch_models={"a": model})
    assert ort_accuracy(path, split.x, split.y) == pytest.approx(ts.evaluate(model, split)["accuracy"])
    with pytest.raises(ModelError):
        ort_latency(path, (1, 8, 8), batch_size=0)
    with pytest.raises(ModelError):
        ort_latency(tmp_path / "missing.onnx", (1, 8, 8))


def test_layer_sweep_measures_each_layer_kept_float_and_builds_an_exclude_list(monkeypatch):
    from torchslim.quant.precision import int8_layer_sweep

    exports = []
    real = ts.export.export_onnx
    monkeypatch.setattr(ts.export, "export_onnx", lambda *a, **k: exports.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(1)
    split = types.SimpleNamespace(x=torch.randn(96, 1, 8, 8, generator=gen),
                                  y=torch.randint(0, 3, (96,), generator=gen))
    mlp = ts.models.create("lenet300_100", hidden1=16, hidden2=8, input_size=8, num_classes=3)
    sweep = int8_layer_sweep(mlp, Int8Config(calibration_samples=32), split, split, batch_sizes=(4,), budget_s=0.02)
    assert sorted(sweep["layers"]) == ["classifier.0", "classifier.2", "classifier.4"]
    for name, row in sweep["layers"].items():
        assert row["keep_float"] == (name in sweep["exclude"]) and set(row["latency_ms"]) == {"4"}
    assert 0.0 <= sweep["all_int8"]["accuracy"] <= 1.0 and isinstance(sweep["int8_slower_than_fp32"], bool)
    # One export serves every file of the sweep, and its parity check stays on the result.
    assert len(exports) == 1 and sweep["quantized"].export["max_abs_diff"] is not None


def test_a_given_fp32_export_is_quantized_without_exporting_again(data, base, tmp_path, monkeypatch):
    split, model = data
    first = base

    def no_export(*_a, **_k):
        raise AssertionError("quantize exported the model although fp32_onnx was given")

    monkeypatch.setattr(ts.export, "export_onnx", no_export)
    (tmp_path / "m.fp32.onnx").write_bytes(first.fp32_onnx)
    for given in (first.fp32_onnx, tmp_path / "m.fp32.onnx"):
        q = quantize(model, Int8Config(calibration_samples=64, exclude=["features.0"]), calib=split, fp32_onnx=given)
        assert q.fp32_onnx == first.fp32_onnx and q.excluded == ["features.0"] and q.layers == first.layers
        assert abs(q.evaluate(split)["accuracy"] - first.evaluate(split)["accuracy"]) <= 0.03
    with pytest.raises(ModelError, match="fp32_onnx is not an ONNX model"):
        quantize(model, Int8Config(calibration_samples=16), calib=split, fp32_onnx=b"not an onnx file")
    with pytest.raises(ModelError, match="fp32_onnx: cannot read"):
        quantize(model, Int8Config(calibration_samples=16), calib=split, fp32_onnx=tmp_path / "missing.onnx")
    other = ts.models.create("lenet300_100", hidden1=16, hidden2=8, input_size=8, num_classes=3)
    with pytest.raises(ModelError, match="cannot map layer names"):  # an export of another model
        quantize(other, Int8Config(calibration_samples=16), calib=split, fp32_onnx=first.fp32_onnx)



def test_a_float_layer_pools_before_its_relu_so_ort_keeps_the_pool_float(data, base, tmp_path):
    import onnxruntime as ort

    split, model = data
    assert base.moved == []  # nothing kept float, nothing moved
    q = quantize(model, Int8Config(calibration_samples=64, exclude=["features.3"]), calib=split,
                 fp32_onnx=base.fp32_onnx)
    ops = {n.name: n.op_type for n in onnx.load_from_string(q.int8_onnx).graph.node}
    assert [ops[n] for n in q.moved] == ["Relu", "MaxPool"] and q.describe()["pool_before_relu"] == q.moved
    # What ONNX Runtime runs: the pool on the float conv's output, the QuantizeLinear after it
    # (without the move, QDQ propagation put a uint8 MaxPool behind a QuantizeLinear).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(q.int8_onnx, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(tmp_path / "opt.onnx").graph
    producer = {o: n for n in graph.node for o in n.output}
    pools = [n for n in graph.node if n.op_type == "MaxPool"]
    assert any(producer[p.input[0]].op_type == "Conv" for p in pools)
    assert abs(q.evaluate(split)["accuracy"] - q.evaluate(split, precision="fp32")["accuracy"]) <= 0.03


def test_a_layer_stays_float_only_when_that_is_slower_at_no_batch_size():
    from torchslim.quant.precision import keep_float

    ref = {"1": 1.0, "256": 40.0}
    keep, why = keep_float({"1": 0.8, "256": 39.0}, ref, 0.90, 0.90)
    assert keep and why.startswith("b=1: 0.800 ms with it float")
    keep, why = keep_float({"1": 0.8, "256": 46.0}, ref, 0.90, 0.90)  # wins at b=1, pays 15% at b=256
    assert not keep and "b=256" in why and "stays int8" in why
    assert keep_float({"1": 1.0, "256": 40.5}, ref, 0.95, 0.90)[0]  # more accurate, no slower
    assert not keep_float({"1": 1.0, "256": 50.0}, ref, 0.95, 0.90)[0]  # more accurate but 25% slower
    assert keep_float({"1": 1.01, "256": 40.0}, ref, 0.9005, 0.90) == (False, "int8 is as fast and as accurate")
