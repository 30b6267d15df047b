"""Tests for torchslim.export: the .slim file (save/load/read_metadata) and ONNX export."""

from __future__ import annotations

import copy
import json
import os
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import torchslim.atomic as atomic
from torchslim.errors import ExportError
from torchslim.export import export_onnx, load, read_metadata, save
from torchslim.models import create, create_from_factory, get_spec
from torchslim.prune import MagnitudePruning, apply_mask_, finalize_, is_masked, prune_


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_cnn() -> nn.Module:
    model = create("fmnist_student", width=4, fc=8)
    # Non-trivial BatchNorm statistics, so that buffers are checked too.
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 1, 28, 28))
    return model.eval()


def x28(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28)


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def rewrite_header(src, dst, edit) -> None:
    """Copy a .slim file, passing its JSON header (and stored tensors) through ``edit``."""
    with safe_open(os.fspath(src), "pt") as f:
        header = json.loads(f.metadata()["torchslim"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(header, tensors)
    save_file(tensors, os.fspath(dst), metadata={"torchslim": json.dumps(header)})


# --- round trips ------------------------------------------------------------


def test_roundtrip_dense(tmp_path):
    model = tiny_cnn()
    path = save(model, tmp_path / "m.slim", metadata={"accuracy": 0.9})
    loaded = load(path)
    assert same_outputs(model, loaded, x28())
    assert get_spec(loaded) == get_spec(model)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    header = read_metadata(path)
    assert header["format"] == "torchslim.slim" and header["version"] == 3
    assert header["metadata"] == {"accuracy": 0.9}
    assert header["input_shape"] == [1, 28, 28]  # inferred from the preset
    assert header["masked"] == [] and header["transforms"] == [] and header["normalization"] is None


def test_roundtrip_masked_keeps_masks_and_training(tmp_path):
    model = tiny_cnn()
    prune_(model, MagnitudePruning(sparsity=0.7))
    # a kept weight that happens to be exactly zero must stay kept (mask 1)
    fc = model.classifier[0]
    kept = fc.weight_mask.nonzero()[0]
    with torch.no_grad():
        fc.weight_orig[tuple(kept)] = 0.0
    path = save(model, tmp_path / "m.slim")
    header = read_metadata(path)
    assert header["masked"] == sorted(["features.0.weight", "features.4.weight", "classifier.0.weight", "classifier.2.weight"])
    assert not any(k.endswith(("_orig", "_mask")) for k in header["tensors"])
    assert all(header["tensors"][k]["encoding"] == "bitmask" for k in header["masked"])

    loaded = load(path)
    assert same_outputs(model, loaded, x28())
    for name, module in model.named_modules():
        if is_masked(module):
            twin = loaded.get_submodule(name)
            assert is_masked(twin)
            assert torch.equal(twin.weight_mask, module.weight_mask)
            assert torch.equal(twin.weight_orig, module.weight_orig)
    assert loaded.classifier[0].weight_mask[tuple(kept)] == 1

    # still trainable: pruned positions get exactly zero gradient
    loaded.train()
    loaded(x28(4)).sum().backward()
    for module in loaded.modules():
        if is_masked(module):
            assert isinstance(module.weight_orig, nn.Parameter) and module.weight_orig.grad is not None
            assert torch.all(module.weight_orig.grad[module.weight_mask == 0] == 0)
            assert module.weight_orig.grad[module.weight_mask == 1].abs().sum() > 0


def test_roundtrip_finalized_pruned(tmp_path):
    model = tiny_cnn()
    prune_(model, MagnitudePruning(sparsity=0.8))
    finalize_(model)
    path = save(model, tmp_path / "m.slim")
    loaded = load(path)
    assert not any(is_masked(m) for m in loaded.modules())
    assert same_outputs(model, loaded, x28())
    header = read_metadata(path)
    assert header["masked"] == []
    assert header["tensors"]["classifier.0.weight"]["encoding"] == "bitmask"  # sparse, so stored sparsely
    assert header["tensors"]["features.1.running_var"]["encoding"] == "dense"


def test_roundtrip_half_precision_and_special_values(tmp_path):
    model = create("lenet300_100", hidden1=16, hidden2=8)
    with torch.no_grad():
        model.classifier[0].weight[:10] = 0.0
        model.classifier[0].weight[10, 0] = float("inf")
        model.classifier[0].weight[10, 1] = float("nan")
    model = model.half()
    path = save(model, tmp_path / "h.slim")
    assert load(path).classifier[0].weight.dtype == torch.float32  # float16 is only how it is stored
    loaded = load(path, dtype=None)  # keep the stored dtype
    for k, v in model.state_dict().items():
        assert loaded.state_dict()[k].dtype == torch.float16
        assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(loaded.state_dict()[k]))
    assert torch.isnan(loaded.classifier[0].weight[10, 1])


def test_pruned_file_is_at_least_5x_smaller(tmp_path):
    dense = create("fmnist_student")
    pruned = copy.deepcopy(dense)
    prune_(pruned, MagnitudePruning(sparsity=0.9))
    dense_size = save(dense, tmp_path / "dense.slim").stat().st_size
    pruned_size = save(pruned, tmp_path / "pruned.slim").stat().st_size
    finalize_(pruned)
    final_size = save(pruned, tmp_path / "final.slim").stat().st_size
    assert dense_size / pruned_size >= 5.0, dense_size / pruned_size
    assert dense_size / final_size >= 5.0, dense_size / final_size


# --- refusing bad files -------------------------------------------------------


def test_truncated_and_corrupt_files(tmp_path):
    path = save(tiny_cnn(), tmp_path / "m.slim")
    data = path.read_bytes()
    unreadable = "truncated or corrupt"
    cases = {
        "truncated": (data[: len(data) // 2], unreadable),
        "header-only": (data[:20], unreadable),
        "empty": (b"", unreadable),
        "garbage": (b"not a safetensors file at all" * 10, "not a safetensors/.slim file"),
        "flipped": (data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:], "checksum"),  # damaged tensor data
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.slim"
        bad.write_bytes(content)
        with pytest.raises(ExportError, match=message) as info:
            load(bad)
        assert f"{name}.slim" in str(info.value)  # the error names the file
    with pytest.raises(ExportError, match="no such file"):
        load(tmp_path / "missing.slim")


def test_not_a_slim_file(tmp_path):
    save_file({"w": torch.zeros(2)}, os.fspath(tmp_path / "plain.safetensors"))
    with pytest.raises(ExportError, match="not a torchslim"):
        load(tmp_path / "plain.safetensors")
    with pytest.raises(ExportError, match="not a torchslim"):
        read_metadata(tmp_path / "plain.safetensors")


def test_wrong_shape_in_header(tmp_path):
    path = save(tiny_cnn(), tmp_path / "m.slim")

    def wrong_header_shape(header, tensors):
        header["tensors"]["classifier.2.bias"]["shape"] = [11]

    rewrite_header(path, tmp_path / "a.slim", wrong_header_shape)
    with pytest.raises(ExportError, match="classifier.2.bias.*shape"):
        load(tmp_path / "a.slim")

    # header and data agree with each other but not with the architecture the spec builds
    def other_architecture(header, tensors):
        header["spec"]["args"]["num_classes"] = 11

    rewrite_header(path, tmp_path / "b.slim", other_architecture)
    with pytest.raises(ExportError, match="shape"):
        load(tmp_path / "b.slim")


def test_missing_tensor_and_bad_version(tmp_path):
    path = save(tiny_cnn(), tmp_path / "m.slim")

    def drop(header, tensors):
        del tensors["classifier.2.bias"]

    rewrite_header(path, tmp_path / "a.slim", drop)
    with pytest.raises(ExportError, match="missing.*classifier.2.bias"):
        load(tmp_path / "a.slim")

    def newer(header, tensors):
        header["version"] = 99

    rewrite_header(path, tmp_path / "b.slim", newer)
    with pytest.raises(ExportError, match="newer torchslim"):
        load(tmp_path / "b.slim")


# --- specs and factories ------------------------------------------------------


def test_model_without_spec_needs_an_instance_to_load(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    path = save(model, tmp_path / "m.slim")
    assert read_metadata(path)["spec"] is None
    with pytest.raises(ExportError, match=r"no architecture spec.*model=MyNet\(\)"):
        load(path)
    again = load(path, model=nn.Sequential(nn.Linear(3, 2)))
    x = torch.randn(4, 3)
    assert torch.equal(again(x), model(x))


def test_bad_metadata_and_input_shape(tmp_path):
    model = create("lenet300_100", hidden1=16, hidden2=8)
    with pytest.raises(ExportError, match="JSON"):
        save(model, tmp_path / "a.slim", metadata={"bad": object()})
    with pytest.raises(ExportError, match="input_shape"):
        save(model, tmp_path / "b.slim", input_shape=[1, 0, 28])
    assert not list(tmp_path.iterdir())
    save(model, tmp_path / "c.slim", input_shape=torch.Size([1, 28, 28]))
    assert read_metadata(tmp_path / "c.slim")["input_shape"] == [1, 28, 28]


@pytest.fixture
def user_factory(tmp_path, monkeypatch):
    name = "torchslim_test_user_nets"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def build(width=4):
            return nn.Sequential(nn.Flatten(), nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 2))
    """))
    monkeypatch.syspath_prepend(os.fspath(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_factory_spec_needs_trust(tmp_path, user_factory):
    target = f"{user_factory}:build"
    model = create_from_factory(target, width=5)
    path = save(model, tmp_path / "user.slim", input_shape=[6])
    sys.modules.pop(user_factory)

    with pytest.raises(ExportError, match=f"factory='{target}'"):
        load(path)
    assert user_factory not in sys.modules  # refusing never imported the user's code
    with pytest.raises(ExportError, match="but factory="):
        load(path, factory="os:system")
    assert user_factory not in sys.modules

    x = torch.randn(3, 6)
    assert same_outputs(model, load(path, factory=target), x)
    from torchslim_test_user_nets import build

    assert same_outputs(model, load(path, factory=build), x)


def test_explicit_spec(tmp_path):
    model = create("lenet300_100", hidden1=16, hidden2=8)
    plain = nn.Module()
    plain.classifier = model.classifier  # same structure, no spec attached
    path = save(plain, tmp_path / "m.slim", spec=get_spec(model))
    assert same_outputs(model, load(path), torch.randn(2, 1, 28, 28))


# --- atomic writes ---------------------------------------------------------


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    model = tiny_cnn()
    path = tmp_path / "m.slim"
    save(model, path)
    save(model, path)  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["m.slim"]
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    prune_(model, MagnitudePruning(sparsity=0.5))
    with pytest.raises(OSError, match="disk full"):
        save(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.slim"]
    assert path.read_bytes() == before  # the old file is intact


# --- ONNX ----------------------------------------------------------------


def test_onnx_export_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_cnn()
    prune_(model, MagnitudePruning(sparsity=0.5))
    model.train()
    info = export_onnx(model, x28(1), tmp_path / "m.onnx")
    assert info["max_abs_diff"] < 1e-5
    assert info["bytes"] == os.path.getsize(tmp_path / "m.onnx")
    assert isinstance(info["opset"], int) and info["opset"] > 0
    assert info["exporter"] in ("dynamo", "torchscript")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert model.training and is_masked(model.features[0])  # exported a copy

    import onnxruntime

    session = onnxruntime.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    x = x28(7)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), model(x), atol=1e-5)


def test_onnx_torchscript_exporter_and_failed_check(tmp_path):
    pytest.importorskip("onnxruntime")
    model = create("lenet300_100", hidden1=16, hidden2=8)
    info = export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "a.onnx", exporter="torchscript")
    assert info["exporter"] == "torchscript" and info["max_abs_diff"] < 1e-5
    with pytest.raises(ExportError, match="differ"):
        export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "b.onnx", exporter="torchscript", atol=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]  # a failed check leaves no file
