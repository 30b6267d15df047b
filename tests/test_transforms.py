"""The transform log (torchslim.core.transforms) and what export does with it.

Channels removed, then masks, then finalize, each saved and loaded bit-identically;
older files (version 1 and 2) still load; a user's own nn.Module without a factory
reloads into a fresh instance; measure and export never import prune.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from torchslim.core import transforms
from torchslim.core.masks import finalize_, is_masked
from torchslim.errors import ExportError, ModelError
from torchslim.export import load, read_metadata, save
from torchslim.models import create

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _prune_channels(model, ratio=0.5):
    from torchslim.prune.structured import ChannelPruning, prune_channels

    result = prune_channels(model, torch.randn(1, 1, 28, 28), ChannelPruning(ratio=ratio))
    return getattr(result, "model", result)  # a result object (.model) or the model itself


def _magnitude(model, sparsity=0.6):
    from torchslim.prune import MagnitudePruning, prune_

    prune_(model, MagnitudePruning(sparsity=sparsity))


def tiny() -> nn.Module:
    model = create("fmnist_student", width=4, fc=8)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.train()
        model(torch.randn(8, 1, 28, 28))
    return model.eval()


def assert_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)  # finalize_ re-registers weights after biases: order may differ
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    x = torch.randn(3, 1, 28, 28)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# --- import isolation ----------------------------------------------------------


def test_measure_and_export_do_not_import_prune():
    # torchslim/__init__.py imports every package, so bind the bare package first
    # (its __path__ only) to see what export and measure import themselves.
    code = (
        "import sys, types, importlib.util\n"
        "spec = importlib.util.find_spec('torchslim')\n"
        "pkg = types.ModuleType('torchslim'); pkg.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['torchslim'] = pkg\n"
        "import torchslim.export, torchslim.measure, torchslim.core.transforms\n"
        "bad = sorted(m for m in sys.modules if m.startswith('torchslim.prune'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_channel_replay_is_found_without_importing_prune_first(tmp_path):
    small = _prune_channels(tiny())
    path = save(small, tmp_path / "p.slim")
    code = (
        "import sys, types, importlib.util, torch\n"
        "spec = importlib.util.find_spec('torchslim')\n"
        "pkg = types.ModuleType('torchslim'); pkg.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['torchslim'] = pkg\n"
        "from torchslim.export import load\n"
        f"m = load({os.fspath(path)!r})\n"
        "print(m.features[0].out_channels)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == small.features[0].out_channels


# --- the registry ----------------------------------------------------------------


def test_unknown_type_and_malformed_records_are_refused():
    with pytest.raises(ModelError, match="unknown transform type 'quantized_v9'"):
        transforms.check_log([{"type": "quantized_v9"}])
    with pytest.raises(ModelError, match="transform 0"):
        transforms.check_log([{"no": "type"}])
    with pytest.raises(ModelError, match="malformed"):
        transforms.check_log([{"type": "masks", "layers": "features.0.weight"}])
    with pytest.raises(ModelError, match="malformed"):
        transforms.check_log([{"type": "channels_removed", "ops": [{"target": 3}]}])


def test_a_registered_type_is_replayed_in_order(tmp_path):
    calls = []

    def replay(model, record):
        calls.append(record["n"])
        model.extra = nn.Linear(2, record["n"])  # a transform that adds a layer

    transforms.register_transform("test_add_layer", replay=replay)
    try:
        model = nn.Sequential(nn.Linear(3, 2))
        model.extra = nn.Linear(2, 5)
        transforms.record_transform_(model, {"type": "test_add_layer", "n": 5})
        path = save(model, tmp_path / "m.slim")
        assert read_metadata(path)["transforms"] == [{"type": "test_add_layer", "n": 5}]
        again = load(path, model=nn.Sequential(nn.Linear(3, 2)))
        assert calls == [5, 5]  # once on the shape probe, once for real
        assert torch.equal(again.extra.weight, model.extra.weight)
        assert transforms.get_transforms(again) == [{"type": "test_add_layer", "n": 5}]
    finally:
        transforms._REGISTRY.pop("test_add_layer")


def test_save_refuses_a_log_of_unknown_type(tmp_path):
    model = tiny()
    transforms.record_transform_(model, {"type": "not_registered"})
    with pytest.raises(ExportError, match="unknown transform type"):
        save(model, tmp_path / "m.slim")


# --- round trips -------------------------------------------------------------------


def test_channels_then_masks_then_finalize_roundtrip(tmp_path):
    small = _prune_channels(tiny())
    path = save(small, tmp_path / "a.slim")
    header = read_metadata(path)
    assert header["version"] == 3 and [r["type"] for r in header["transforms"]] == ["channels_removed"]
    assert header["spec"] == tiny().torchslim_spec  # the spec is the unpruned architecture
    assert_identical(small, load(path))

    _magnitude(small)
    path = save(small, tmp_path / "b.slim")
    header = read_metadata(path)
    assert [r["type"] for r in header["transforms"]] == ["channels_removed", "masks"]
    assert header["transforms"][1]["layers"] == header["masked"] and header["masked"]
    loaded = load(path)
    assert_identical(small, loaded)
    assert all(is_masked(loaded.get_submodule(n.rpartition(".")[0])) for n in header["masked"])

    finalize_(small)
    path = save(small, tmp_path / "c.slim")
    assert [r["type"] for r in read_metadata(path)["transforms"]] == ["channels_removed"]
    assert_identical(small, load(path))


def test_pruning_a_reloaded_model_appends_to_its_log(tmp_path):
    small = _prune_channels(tiny())
    loaded = load(save(small, tmp_path / "a.slim"))
    smaller = _prune_channels(loaded, ratio=0.5)
    path = save(smaller, tmp_path / "b.slim")
    log = read_metadata(path)["transforms"]
    assert [r["type"] for r in log] == ["channels_removed", "channels_removed"]
    assert_identical(smaller, load(path))


# --- older files --------------------------------------------------------------------


def _old_digest(tensors):
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_old_format(src: Path, dst: Path) -> None:
    """Rewrite a version-3 file the way save() wrote it before the transform log (version 1 or 2).

    Version 1/2 headers had ``masked``, ``history`` (version 2 only), no
    ``transforms`` or ``normalization``, and a checksum over the tensors alone.
    """
    with safe_open(os.fspath(src), "pt") as f:
        header = json.loads(f.metadata()["torchslim"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    log = header.pop("transforms")
    header.pop("normalization")
    history = [{"ops": r["ops"]} for r in log if r["type"] == "channels_removed"]
    old = {"format": "torchslim.slim", "version": 2 if history else 1, "spec": header["spec"],
           "input_shape": header["input_shape"], "tensors": header["tensors"],
           "masked": sorted(n for r in log if r["type"] == "masks" for n in r["layers"]),
           "metadata": header["metadata"], "sha256": _old_digest(tensors)}
    if history:
        old["history"] = history
    save_file(tensors, os.fspath(dst), metadata={"torchslim": json.dumps(old)})


def test_old_version_1_and_2_files_still_load(tmp_path):
    dense = tiny()
    write_old_format(save(dense, tmp_path / "d.slim"), tmp_path / "d1.slim")
    assert read_metadata(tmp_path / "d1.slim")["version"] == 1
    assert_identical(dense, load(tmp_path / "d1.slim"))

    small = _prune_channels(tiny())
    _magnitude(small)
    write_old_format(save(small, tmp_path / "p.slim"), tmp_path / "p2.slim")
    header = read_metadata(tmp_path / "p2.slim")
    assert header["version"] == 2 and "history" in header
    assert [r["type"] for r in header["transforms"]] == ["channels_removed", "masks"]
    assert_identical(small, load(tmp_path / "p2.slim"))
    # an old file re-saved is written in the new format, same model
    again = load(save(load(tmp_path / "p2.slim"), tmp_path / "p3.slim"))
    assert read_metadata(tmp_path / "p3.slim")["version"] == 3
    assert_identical(small, again)


def test_shipped_float16_teacher_loads_in_float32():
    path = ROOT / "recipes" / "weights" / "fmnist_teacher.slim"
    if not path.exists():
        pytest.skip("shipped weights not present")
    model = load(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    half = load(path, dtype=None)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    for k, v in half.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v.float(), model.state_dict()[k])
    with pytest.raises(ExportError, match="dtype"):
        load(path, dtype=torch.int8)


# --- a user's own module --------------------------------------------------------------


class MyNet(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 28 * 28, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_user_module_without_factory_roundtrips(tmp_path):
    net = MyNet().eval()
    path = save(net, tmp_path / "mine.slim", input_shape=[1, 28, 28])
    fresh = MyNet()
    loaded = load(path, model=fresh)
    assert loaded is fresh
    assert_identical(net, loaded)


def test_user_module_after_channel_removal_and_masks(tmp_path):
    small = _prune_channels(MyNet().eval())
    assert small.conv.out_channels < 6
    path = save(small, tmp_path / "a.slim")
    assert_identical(small, load(path, model=MyNet()))
    _magnitude(small)
    path = save(small, tmp_path / "b.slim")
    assert_identical(small, load(path, model=MyNet()))


def test_wrong_user_model_names_the_first_mismatching_tensor(tmp_path):
    path = save(MyNet(), tmp_path / "mine.slim")
    fresh = MyNet(width=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ExportError, match=r"tensor 'conv.weight' has shape \[6, 1, 3, 3\] in the file but \[5, 1, 3, 3\]"):
        load(path, model=fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched
    with pytest.raises(ExportError, match="not in the file"):
        load(path, model=nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ExportError, match="not both"):
        load(path, model=MyNet(), factory="x:y")
