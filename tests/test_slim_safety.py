"""A .slim file cannot make load() allocate what it likes; errors say what the file is.

Issue 14: items 2 (sizes checked on the meta device before allocating; input_shape
bounded and under the checksum), 8 (profile of a float16 file), 9 (normalization
recorded in .slim and ONNX), 15 (messages for .pt files, directories, --factory).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from torchslim.errors import ExportError
from torchslim.export import MAX_INPUT_ELEMENTS, export_onnx, load, read_metadata, save
from torchslim.measure import profile_file
from torchslim.models import create, create_from_factory

ROOT = Path(__file__).resolve().parents[1]


def tiny() -> nn.Module:
    return create("fmnist_student", width=4, fc=8).eval()


def rewrite(src, dst, edit) -> None:
    """Copy a .slim file, passing its JSON header (and tensors) through ``edit``; the checksum is kept."""
    with safe_open(os.fspath(src), "pt") as f:
        header = json.loads(f.metadata()["torchslim"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(header, tensors)
    save_file(tensors, os.fspath(dst), metadata={"torchslim": json.dumps(header)})


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- item 2: sizes --------------------------------------------------------------


@pytest.mark.parametrize("arg", ["width", "fc"])
def test_huge_spec_args_are_refused_fast_without_allocating(tmp_path, arg):
    path = save(tiny(), tmp_path / "m.slim")

    def huge(header, tensors):
        header["spec"]["args"][arg] = 10**12

    rewrite(path, tmp_path / "huge.slim", huge)
    rss, start = _maxrss_mb(), time.perf_counter()
    with pytest.raises(ExportError) as info:
        load(tmp_path / "huge.slim")
    assert time.perf_counter() - start < 5.0
    assert _maxrss_mb() - rss < 200  # nothing of the declared size was allocated
    assert "huge.slim" in str(info.value)


def test_header_sizes_are_bounded_by_the_file(tmp_path):
    path = save(tiny(), tmp_path / "m.slim")

    def huge_tensor(header, tensors):
        header["tensors"]["classifier.2.bias"]["shape"] = [10**12]

    rewrite(path, tmp_path / "a.slim", huge_tensor)
    with pytest.raises(ExportError, match="more than a file of"):
        load(tmp_path / "a.slim")


def test_huge_input_shape_is_refused(tmp_path):
    model = tiny()
    with pytest.raises(ExportError, match="elements per sample"):
        save(model, tmp_path / "a.slim", input_shape=[10**5, 10**5, 10**5])
    with pytest.raises(ExportError, match="input_shape"):
        save(model, tmp_path / "b.slim", input_shape=[1] * 9)
    assert not list(tmp_path.iterdir())
    path = save(model, tmp_path / "m.slim")

    def huge(header, tensors):
        header["input_shape"] = [1, 10**6, 10**6]

    rewrite(path, tmp_path / "c.slim", huge)
    for reader in (read_metadata, load, profile_file):
        with pytest.raises(ExportError, match="input_shape"):
            reader(tmp_path / "c.slim")
    assert MAX_INPUT_ELEMENTS == 10**8


@pytest.mark.parametrize("field, value", [("input_shape", [1, 14, 14]), ("normalization", {"mean": [0.0], "std": [2.0]}),
                                          ("metadata", {"accuracy": 1.0})])
def test_header_fields_are_under_the_checksum(tmp_path, field, value):
    path = save(tiny(), tmp_path / "m.slim", normalization={"mean": [0.5], "std": [0.25]})

    def edit(header, tensors):
        header[field] = value

    rewrite(path, tmp_path / "e.slim", edit)
    with pytest.raises(ExportError, match="checksum"):
        load(tmp_path / "e.slim")


# --- item 8: float16 files and profile ------------------------------------------------


def test_profile_of_a_float16_file(tmp_path):
    model = tiny().half()
    path = save(model, tmp_path / "h.slim")
    prof = profile_file(path, batch_sizes=(1,), latency=False)
    assert prof.params == sum(p.numel() for p in model.parameters())
    assert load(path).features[0].weight.dtype == torch.float32


def test_cli_profile_of_the_shipped_float16_teacher(capsys):
    path = ROOT / "recipes" / "weights" / "fmnist_teacher.slim"
    if not path.exists():
        pytest.skip("shipped weights not present")
    from torchslim.cli.main import main

    assert main(["profile", os.fspath(path), "--batch-sizes", "1"]) == 0
    assert "MACs / sample" in capsys.readouterr().out


# --- item 9: normalization ----------------------------------------------------------------


def test_normalization_roundtrips_in_slim(tmp_path):
    norm = {"mean": (0.2860,), "std": (0.3530,)}  # a dataset's splits.mean / splits.std are tuples
    path = save(tiny(), tmp_path / "m.slim", normalization=norm)
    assert read_metadata(path)["normalization"] == {"mean": [0.286], "std": [0.353]}
    assert read_metadata(save(tiny(), tmp_path / "n.slim"))["normalization"] is None
    for bad, message in [({"mean": [0.1]}, "exactly 'mean' and 'std'"), ({"mean": [0.1], "std": [0.0]}, "> 0"),
                         ({"mean": [0.1, 0.2], "std": [1.0]}, "std has 1"),
                         ({"mean": [0.1, 0.2], "std": [1.0, 1.0]}, "channels"),
                         ({"mean": [float("nan")], "std": [1.0]}, "finite")]:
        with pytest.raises(ExportError, match=message):
            save(tiny(), tmp_path / "bad.slim", normalization=bad)
    assert not (tmp_path / "bad.slim").exists()


def test_normalization_and_input_shape_in_onnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    export_onnx(tiny(), torch.randn(1, 1, 28, 28), path, exporter="torchscript",
                normalization={"mean": [0.286], "std": [0.353]})
    import onnx

    props = {p.key: p.value for p in onnx.load(os.fspath(path)).metadata_props}
    assert json.loads(props["torchslim.normalization.mean"]) == [0.286]
    assert json.loads(props["torchslim.normalization.std"]) == [0.353]
    assert json.loads(props["torchslim.input_shape"]) == [1, 28, 28]
    meta = read_metadata(path)
    assert meta["format"] == "onnx" and meta["input_shape"] == [1, 28, 28]
    assert meta["normalization"] == {"mean": [0.286], "std": [0.353]}
    with pytest.raises(ExportError, match="> 0"):
        export_onnx(tiny(), torch.randn(1, 1, 28, 28), tmp_path / "bad.onnx", normalization={"mean": [0], "std": [-1]})


# --- item 15: messages -------------------------------------------------------------------


def test_a_pytorch_pt_file_is_named_as_such(tmp_path):
    model = tiny()
    torch.save(model.state_dict(), tmp_path / "w.pt")  # zip archive
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # raw pickle
    assert zipfile.is_zipfile(tmp_path / "w.pt")
    for name in ("w.pt", "legacy.pt"):
        for reader in (load, read_metadata):
            with pytest.raises(ExportError, match=r"not a safetensors/\.slim file.*\.pt") as info:
                reader(tmp_path / name)
            assert "header too large" not in str(info.value) and name in str(info.value)


def test_a_directory_is_named_as_such(tmp_path):
    for reader in (load, read_metadata, profile_file):
        with pytest.raises(ExportError, match="is a directory"):
            reader(tmp_path)


@pytest.fixture
def user_factory(tmp_path, monkeypatch):
    name = "torchslim_test_safety_nets"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def build(width=4):
            return nn.Sequential(nn.Flatten(), nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 2))
    """))
    monkeypatch.syspath_prepend(os.fspath(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_untrusted_factory_message_fits_the_caller(tmp_path, user_factory):
    target = f"{user_factory}:build"
    path = save(create_from_factory(target), tmp_path / "u.slim", input_shape=[6])
    with pytest.raises(ExportError, match=r"pass factory='.*' to load\(\)"):
        load(path)
    with pytest.raises(ExportError, match=f"--factory {target}"):
        profile_file(path, batch_sizes=(1,), latency=False)
    with pytest.raises(ExportError, match="use --trust x"):
        load(path, factory_hint="use --trust x")
    assert profile_file(path, factory=target, batch_sizes=(1,), latency=False).params > 0
