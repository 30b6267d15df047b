"""Damaged and hostile ``.slim`` files and checkpoints raise torchslim's own errors, quickly.

Two kinds of mutation for each format:

* bytes: flips, overwrites, truncation and insertions anywhere in a valid file
  (what a bad disk or an interrupted copy does); the checksums should catch
  almost all of these.
* content with the checksum recomputed (what a hostile sender does): a ``.slim``
  header with a field replaced, removed or added, or a checkpoint whose
  payload is another object or damaged ``torch.save`` bytes, re-signed so that
  the checks after the checksum are what is tested.

Loading must succeed or raise a :class:`~torchslim.errors.TorchSlimError`,
never another exception, within a bounded time. The address space is capped
for the duration (2 GiB above what the process already maps), so a header
that makes the loader allocate a huge tensor fails the test with a
``RuntimeError``/``MemoryError`` instead of exhausting the machine.
Strategies follow ``tests/fuzz_strategies.py``; examples are kept few so the
file runs in a few seconds (``benchmarks/fuzz_parsers.py`` style runs can
raise them).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import resource
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as st_save

import torchslim as ts
from fuzz_strategies import documents
from torchslim.errors import TorchSlimError
from torchslim.export.slim import HEADER_KEY, _digest
from torchslim.train.checkpoint import _MAGIC, load_checkpoint, model_signature, save_checkpoint

# derandomize: the same examples every run, so a failure is never a one-off.
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_SECONDS = 5.0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return ts.models.create("lenet300_100", input_size=4, num_classes=3, hidden1=6, hidden2=5)


@pytest.fixture(scope="module")
def slim_file(tmp_path_factory) -> tuple[bytes, dict, dict[str, torch.Tensor]]:
    """A valid masked .slim file: its bytes, its header and its stored tensors."""
    model = _model()
    ts.prune_(model, ts.UnstructuredPruning(sparsity=0.5))
    path = tmp_path_factory.mktemp("slim") / "m.slim"
    ts.save(model, path, input_shape=[1, 4, 4], normalization={"mean": [0.5], "std": [0.25]})
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return path.read_bytes(), header, tensors


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> bytes:
    model = _model()
    path = tmp_path_factory.mktemp("ckpt") / "c.pt"
    save_checkpoint(path, {"model": model.state_dict(), "epoch": 1, "step": 0, "history": [],
                           "signature": model_signature(model)})
    return path.read_bytes()


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    """Cap the address space at what is mapped now plus 2 GiB while the fuzz tests run."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + (2 << 30)
    if hard != resource.RLIM_INFINITY and hard < cap:
        cap = hard
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """``data`` with a few random flips, overwrites, cuts or insertions."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "header"]))
        # "header" aims at the first bytes, where the lengths and the JSON live.
        at = draw(st.integers(0, max(0, min(len(out), 200 if kind == "header" else len(out)) - 1)))
        if kind in ("flip", "header") and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[at:at + len(chunk)] = chunk
        elif kind == "truncate":
            del out[at:]
        else:
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


def _expect_torchslim_error(call) -> None:
    started = time.perf_counter()
    try:
        call()
    except TorchSlimError:
        pass
    assert time.perf_counter() - started <= MAX_SECONDS


# ----------------------------------------------------------------------------- .slim
def _write_slim(path: Path, header: dict, tensors: dict[str, torch.Tensor], resign: bool) -> None:
    if resign:
        try:
            header = {**header, "sha256": _digest(tensors, header)}
        except (TypeError, ValueError):  # a mutation JSON cannot hold (NaN): left unsigned
            pass
    path.write_bytes(st_save(tensors, metadata={HEADER_KEY: json.dumps(header)}))


HEADER_FIELDS = ["format", "version", "spec", "input_shape", "normalization", "tensors", "transforms", "metadata",
                 "sha256"]
hostile_values = st.one_of(
    documents,
    st.integers(-2**70, 2**70),
    st.lists(st.integers(-1, 10**12), max_size=6),
    st.fixed_dictionaries({"preset": st.sampled_from(["lenet300_100", "lenet5", "no_such"]),
                           "args": st.dictionaries(st.sampled_from(["hidden1", "hidden2", "input_size", "num_classes",
                                                                    "in_channels", "bogus"]),
                                                   st.one_of(st.integers(-5, 10**12), documents), max_size=3)}),
    st.fixed_dictionaries({"factory": st.sampled_from(["os:system", "builtins:eval", "no.such:fn"])}),
)


@st.composite
def header_mutations(draw, header: dict) -> dict:
    """``header`` with a field (or a field inside ``spec``, ``tensors`` or ``transforms``) replaced,
    removed or added."""
    out = copy.deepcopy(header)
    for _ in range(draw(st.integers(1, 3))):
        target = out
        path = draw(st.sampled_from(["top", "spec.args", "tensors", "tensor", "transforms"]))
        if path == "spec.args" and isinstance(out.get("spec"), dict) and isinstance(out["spec"].get("args"), dict):
            target = out["spec"]["args"]
        elif path == "tensors" and isinstance(out.get("tensors"), dict):
            target = out["tensors"]
        elif path == "tensor" and isinstance(out.get("tensors"), dict) and out["tensors"]:
            entry = out["tensors"][draw(st.sampled_from(sorted(out["tensors"])))]
            target = entry if isinstance(entry, dict) else out
        elif path == "transforms" and isinstance(out.get("transforms"), list) and out["transforms"]:
            record = out["transforms"][draw(st.integers(0, len(out["transforms"]) - 1))]
            target = record if isinstance(record, dict) else out
        keys = sorted(target) if target is not out else HEADER_FIELDS
        key = draw(st.one_of(st.sampled_from(keys), st.text(max_size=6))) if keys else draw(st.text(max_size=6))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(hostile_values)
    return out


@FUZZ
@given(data=st.data())
def test_damaged_slim_bytes_raise_only_torchslim_errors(data, slim_file, tmp_path):
    original, _, _ = slim_file
    path = tmp_path / "fuzz.slim"
    path.write_bytes(data.draw(byte_mutations(original)))
    _expect_torchslim_error(lambda: ts.load(path))


@FUZZ
@given(data=st.data(), resign=st.booleans())
def test_hostile_slim_headers_raise_only_torchslim_errors(data, resign, slim_file, tmp_path):
    _, header, tensors = slim_file
    path = tmp_path / "fuzz.slim"
    _write_slim(path, data.draw(header_mutations(header)), tensors, resign)
    _expect_torchslim_error(lambda: ts.export.read_metadata(path))
    _expect_torchslim_error(lambda: ts.load(path))  # never imports the factory a file names: none trusted


def test_resigned_unchanged_header_still_loads(slim_file, tmp_path):
    # The mutation helper's own check: re-signing a header it did not change gives a loadable file.
    _, header, tensors = slim_file
    _write_slim(tmp_path / "same.slim", header, tensors, resign=True)
    assert sum(p.numel() for p in ts.load(tmp_path / "same.slim").parameters()) > 0


# ----------------------------------------------------------------------------- checkpoints
def _signed_checkpoint(payload: bytes) -> bytes:
    return _MAGIC + f"sha256 {hashlib.sha256(payload).hexdigest()} bytes {len(payload)}\n".encode() + payload


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


checkpoint_objects = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
              st.lists(st.integers(0, 4), max_size=3).map(lambda s: torch.zeros(s))),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["model", "optimizer", "epoch", "step", "history", "signature", "partial",
                                         "rng", "x"]), children, max_size=5)),
    max_leaves=12,
)


@FUZZ
@given(data=st.data())
def test_damaged_checkpoint_bytes_raise_only_torchslim_errors(data, checkpoint_file, tmp_path):
    path = tmp_path / "fuzz.pt"
    path.write_bytes(data.draw(byte_mutations(checkpoint_file)))
    _expect_torchslim_error(lambda: load_checkpoint(path, _model()))


@FUZZ
@given(data=st.data())
def test_hostile_checkpoint_payloads_raise_only_torchslim_errors(data, checkpoint_file, tmp_path):
    if data.draw(st.booleans()):
        obj = data.draw(checkpoint_objects)
        payload = _torch_bytes(obj)  # another object, correctly signed
    else:
        payload = data.draw(byte_mutations(checkpoint_file[checkpoint_file.index(b"\n", len(_MAGIC)) + 1:]))
    path = tmp_path / "fuzz.pt"
    path.write_bytes(_signed_checkpoint(payload))
    _expect_torchslim_error(lambda: load_checkpoint(path, _model()))
    _expect_torchslim_error(lambda: load_checkpoint(path))


@pytest.mark.parametrize("signature", [[1], "abc"])
def test_signed_checkpoint_with_a_non_dict_signature(signature, tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(_signed_checkpoint(_torch_bytes({"signature": signature})))
    with pytest.raises(TorchSlimError):
        load_checkpoint(path, _model())


@pytest.mark.parametrize("drop", ["optimizer", "rng", "history"])
def test_fit_names_a_signed_checkpoint_that_lacks_training_state(drop, tmp_path):
    # The checksum and the model signature match; the training state is not what fit wrote.
    from conftest import make_blobs
    from torchslim.errors import TrainingError
    from torchslim.train import TrainConfig, fit

    data, config = make_blobs(32, classes=3, shape=(1, 4, 4)), TrainConfig(epochs=2, batch_size=16)
    model, path = _model(), tmp_path / "c.pt"
    fit(model, data, config.model_copy(update={"epochs": 1}), checkpoint_path=path, progress=False)
    state = load_checkpoint(path, model)
    del state[drop]
    save_checkpoint(path, state)
    with pytest.raises(TrainingError, match=rf"does not hold a training state.*{drop}"):
        fit(_model(), data, config, checkpoint_path=path, progress=False)
