"""Canonical Huffman coding and the packed ``.slim`` artifact: round trips, every byte counted, bit-exact loads."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import torchslim as ts
from torchslim.prune import MagnitudePruning
from torchslim.quant import huffman
from torchslim.quant.pack import PackConfig, gaps_decode, gaps_encode, pack
from torchslim.quant.sharing import WeightSharing, finalize_sharing_, share_weights_

streams = st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=300)))


# ----------------------------------------------------------------- Huffman
@settings(max_examples=150, deadline=None)
@given(streams, st.integers(6, 15))
def test_huffman_round_trips_any_stream(stream, max_length):
    n, symbols = stream
    data = huffman.encode_stream(symbols, n, max_length)
    assert huffman.decode_stream(data, n, len(symbols)) == symbols


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300), st.integers(0, 9), st.integers(1, 12))
def test_one_symbol_and_empty_streams(count, symbol, alphabet_extra):
    n = symbol + alphabet_extra
    one = [symbol] * count
    data = huffman.encode_stream(one, n)
    assert huffman.decode_stream(data, n, count) == one
    assert len(data) == huffman.table_size(n) + math.ceil(count / 8)  # one bit per symbol
    assert huffman.decode_stream(huffman.encode_stream([], n), n, 0) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40), st.integers(6, 15))
def test_lengths_are_a_prefix_code_within_the_limit_and_beat_the_entropy_bound(freqs, max_length):
    used = sum(1 for f in freqs if f)
    if used > 2 ** max_length or used == 0:
        return
    lengths = huffman.code_lengths(freqs, max_length)
    assert max(lengths) <= max_length and all((f == 0) == (length == 0) for f, length in zip(freqs, lengths))
    assert sum(2.0 ** -length for length in lengths if length) <= 1.0
    bits = sum(f * length for f, length in zip(freqs, lengths))
    assert bits >= huffman.entropy_bits(freqs) - 1e-6
    unlimited = huffman.code_lengths(freqs, None)
    assert bits >= sum(f * length for f, length in zip(freqs, unlimited))  # a limit never helps
    if used > 1:
        assert bits < huffman.entropy_bits(freqs) + sum(freqs) + 1e-6  # Huffman: within one bit per symbol


def test_length_limit_binds_on_fibonacci_counts():
    fib = [1, 1]
    while len(fib) < 20:
        fib.append(fib[-1] + fib[-2])
    assert max(huffman.code_lengths(fib, None)) == 19
    lengths = huffman.code_lengths(fib, 10)
    assert max(lengths) == 10
    symbols = [s for s, f in enumerate(fib) for _ in range(min(f, 50))]
    assert huffman.decode_stream(huffman.encode_stream(symbols, 20, 10), 20, len(symbols)) == symbols


def test_damaged_huffman_streams_are_refused():
    data = huffman.encode_stream([0, 1, 2, 3] * 10, 4)
    with pytest.raises(ValueError):
        huffman.decode_stream(data[:-3], 4, 40)
    with pytest.raises(ValueError):
        huffman.decode_stream(data[:1], 4, 40)


# ----------------------------------------------------------------- relative index
@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=400), st.integers(1, 10))
def test_relative_index_with_fillers_round_trips(bits, index_bits):
    import numpy as np

    keep = np.array(bits, dtype=bool)
    positions = np.flatnonzero(keep)
    entries = gaps_encode(positions, index_bits)
    assert entries.size == 0 or entries.max() < 2 ** index_bits
    assert np.array_equal(gaps_decode(entries, index_bits), positions)


# ----------------------------------------------------------------- the artifact
def _shared(bits: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = ts.models.create("lenet300_100", hidden1=24, hidden2=12)
    ts.prune_(model, MagnitudePruning(sparsity=0.9))
    share_weights_(model, WeightSharing(linear_bits=bits))
    finalize_sharing_(model)
    return model.eval()


def _equal_bits(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("codec", ["huffman", "lzma", "zstd"])
def test_packed_model_loads_bit_exactly_with_its_masks(tmp_path, codec):
    if codec == "zstd":
        pytest.importorskip("zstandard")
    model = _shared()
    path = tmp_path / "m.packed.slim"
    report = pack(model, path, PackConfig(codec=codec), normalization={"mean": [0.5], "std": [0.25]})
    loaded = ts.load(path).eval()
    assert _equal_bits(model, loaded)  # masks included (weight_orig / weight_mask)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert report.file_bytes == os.path.getsize(path)
    assert sum(r.stored_bytes for r in report.layers) + report.header_bytes == report.file_bytes
    header = ts.export.read_metadata(path)
    assert header["normalization"] == {"mean": [0.5], "std": [0.25]} and header["spec"]["preset"] == "lenet300_100"


def test_packed_file_is_much_smaller_than_the_plain_slim_and_the_report_says_why(tmp_path):
    model = _shared()
    report = pack(model, tmp_path / "m.packed.slim")
    ts.save(model, tmp_path / "m.slim")
    assert report.file_bytes * 3 < os.path.getsize(tmp_path / "m.slim")
    first = next(r for r in report.layers if r.name == "classifier.0.weight")
    assert first.values == "codebook" and first.codebook_size <= 8 and first.weight_bits == 3
    assert first.positions in ("gaps", "bitmask") and "codes" in first.entropy and "positions" in first.entropy
    bias = next(r for r in report.layers if r.name == "classifier.0.bias")
    assert bias.values == "raw" and bias.positions == "all"
    table = report.table()
    assert "weight bits" in table and "`classifier.0.weight`" in table and "**total**" in table
    assert report.compression == pytest.approx(report.dense_bytes / report.file_bytes)


def test_any_model_packs_bit_exactly_dense_batchnorm_float16_and_signed_zeros(tmp_path):
    torch.manual_seed(0)
    model = ts.models.create("fmnist_student", width=4, fc=8).eval()  # BatchNorm buffers, int64 counter
    model(torch.randn(2, 1, 28, 28))
    pack(model, tmp_path / "a.slim")
    assert _equal_bits(model, ts.load(tmp_path / "a.slim"))
    half = ts.models.create("lenet300_100", hidden1=8, hidden2=4).half()
    pack(half, tmp_path / "h.slim")
    assert _equal_bits(half, ts.load(tmp_path / "h.slim", dtype=None))
    signed = ts.models.create("lenet300_100", hidden1=8, hidden2=4)
    ts.prune_(signed, MagnitudePruning(sparsity=0.5))
    layer = signed.classifier[0]
    kept = layer.weight_mask.nonzero()[:2]
    with torch.no_grad():  # a kept weight of -0.0 and one of +0.0: the mask keeps them, so must the file
        layer.weight_orig[kept[0][0], kept[0][1]] = -0.0
        layer.weight_orig[kept[1][0], kept[1][1]] = 0.0
    pack(signed, tmp_path / "s.slim")
    back = ts.load(tmp_path / "s.slim").classifier[0]
    on = layer.weight_mask.bool()  # outside the mask a -0.0 comes back +0.0, as in every .slim file
    assert torch.equal(back.weight_orig.view(torch.int32)[on], layer.weight_orig.view(torch.int32)[on])
    assert torch.equal(back.weight_mask, layer.weight_mask)


def test_damaged_or_truncated_packed_files_are_refused(tmp_path):
    path = tmp_path / "m.packed.slim"
    pack(_shared(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    (tmp_path / "bad.slim").write_bytes(bytes(data))
    with pytest.raises(ts.ExportError, match="checksum"):
        ts.load(tmp_path / "bad.slim")
    (tmp_path / "short.slim").write_bytes(bytes(data[:20]))
    with pytest.raises(ts.ExportError):
        ts.load(tmp_path / "short.slim")


def test_a_shared_model_not_yet_finalized_packs_as_finalized(tmp_path):
    torch.manual_seed(0)
    model = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
    ts.prune_(model, MagnitudePruning(sparsity=0.8))
    share_weights_(model, WeightSharing(linear_bits=2))
    pack(model, tmp_path / "m.slim")
    finalize_sharing_(model)
    assert _equal_bits(model, ts.load(tmp_path / "m.slim"))


def test_inputs_emptied_by_pruning_are_scanned_input_major(tmp_path):
    from torchslim.quant.unpack import read_packed

    torch.manual_seed(0)
    model = ts.models.create("lenet300_100", hidden1=32, hidden2=8)
    ts.prune_(model, MagnitudePruning(sparsity=0.5))
    with torch.no_grad():  # dead pixels: whole input columns pruned, as a first layer learns
        model.classifier[0].weight_mask[:, 100:700] = 0
        model.classifier[0].weight_orig.mul_(model.classifier[0].weight_mask)
    pack(model, tmp_path / "m.slim")
    header, _ = read_packed(tmp_path / "m.slim")
    assert header["tensors"]["classifier.0.weight"]["order"] == "columns"
    assert _equal_bits(model, ts.load(tmp_path / "m.slim"))


@pytest.mark.parametrize("edit", [
    lambda h: h["tensors"]["classifier.0.weight"].update(shape=[10**9, 10**9]),
    lambda h: h["tensors"]["classifier.0.weight"].update(kept=10**6),
    lambda h: h["tensors"]["classifier.0.weight"].update(positions="runs"),
    lambda h: h["tensors"]["classifier.0.weight"].update(index_bits=40),
    lambda h: h["tensors"]["classifier.0.weight"].update(k=0),
    lambda h: h["tensors"]["classifier.0.weight"]["bytes"].append(0),
    lambda h: h.update(codec="gzip"),
    lambda h: h.update(transforms=[{"type": "no_such_transform"}]),
])
def test_a_well_checksummed_but_malformed_header_is_an_export_error(tmp_path, edit):
    import hashlib
    import json
    import struct
    import zlib

    from torchslim.export.slim import PACKED_MAGIC

    path = tmp_path / "m.slim"
    pack(_shared(), path)
    data = path.read_bytes()[:-32]
    (n,) = struct.unpack_from("<I", data, 8)
    header = json.loads(zlib.decompress(data[12:12 + n]))
    edit(header)
    head = zlib.compress(json.dumps(header).encode())
    body = PACKED_MAGIC + struct.pack("<I", len(head)) + head + data[12 + n:]
    path.write_bytes(body + hashlib.sha256(body).digest())  # damage that a checksum cannot see
    with pytest.raises(ts.ExportError):
        ts.load(path)
