"""The packed ``.slim`` form: Deep Compression's storage (codebook, codes, sparse positions, entropy coded).

:func:`pack` writes a model as small as the library can make it, and
:func:`torchslim.export.load` reads it back like any ``.slim`` file (the first
bytes tell the two forms apart; the reader is :mod:`torchslim.quant.unpack`),
computing bit-exactly what the packed model computed. Every tensor of the effective state dict is stored, each as two parts:

* **positions** of the stored entries: ``all`` (a dense tensor), or, when it has
  zeros (or a mask), the smaller for that tensor of ``gaps`` (Deep Compression's
  relative index: for each stored entry the count of skipped positions, in
  ``index_bits`` bits, with a *filler* entry ``2**index_bits - 1`` that skips that
  many positions and stores nothing when a gap overflows; the width is chosen
  per tensor) and ``bitmask`` (one bit per position, coded by bytes), scanned in
  the tensor's order or input-major (``"order": "columns"``, dims 0 and 1
  swapped), whichever is smaller;
* **values** of those entries: ``codebook`` (the distinct values, stored raw, plus
  one code per entry) when the tensor has at most ``max_codebook`` distinct
  values and that is smaller, else ``raw`` (the values' bytes).

A masked weight stores its mask as its positions, so the mask round-trips
exactly. Code and position streams are entropy coded with the codec of
:class:`PackConfig` (canonical Huffman by default, see
:mod:`torchslim.quant.huffman`; ``lzma`` or ``zstd``); raw bytes are stored as
they are.

File layout (all integers little-endian)::

    b"TSLIMPK1"                     8 bytes, :data:`torchslim.export.slim.PACKED_MAGIC`
    header length                   4 bytes
    header                          zlib-compressed JSON: format, version, spec, input_shape,
                                    normalization, transforms, metadata, codec, tensors
    streams                         every tensor's streams, in header order
    SHA-256 of all the above        32 bytes

Every byte is counted in :class:`PackReport`, header and checksum included.
"""

from __future__ import annotations

import copy
import hashlib
import json
import lzma
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from torchslim.atomic import atomic_write_bytes
from torchslim.config import Config
from torchslim.errors import ConfigError, ExportError
from torchslim.export.slim import PACKED_MAGIC, effective_state, header_fields
from torchslim.quant import huffman
from torchslim.quant.sharing import CODEBOOKS_ATTR, finalize_sharing_, shared_layers

FORMAT = "torchslim.slim.packed"
VERSION = 1
MAX_INDEX_BITS = 10


class PackConfig(Config):
    """How :func:`pack` codes the streams.

    Attributes:
        codec: entropy coder of the code and position streams: ``huffman`` (canonical
            Huffman, written here), ``lzma`` (raw LZMA2, preset 9 extreme) or ``zstd``
            (needs the optional ``zstandard`` package).
        max_codebook: a tensor with more distinct values than this stores them raw.
        index_bits: width of the relative index; None picks the smallest file per
            tensor among 1..10 bits.
        max_code_length: longest Huffman code (length-limited, at most 15).
    """

    codec: Literal["huffman", "lzma", "zstd"] = "huffman"
    max_codebook: int = Field(4096, ge=2, le=4096)
    index_bits: int | None = Field(None, ge=1, le=MAX_INDEX_BITS)
    max_code_length: int = Field(15, ge=12, le=huffman.MAX_LENGTH)


# ---------------------------------------------------------------------------
# codecs over symbol streams
# ---------------------------------------------------------------------------


_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _fixed_bytes(symbols: np.ndarray, alphabet: int) -> bytes:
    return symbols.astype(np.uint8 if alphabet <= 256 else "<u2").tobytes()


def _zstd() -> Any:
    try:
        import zstandard  # noqa: PLC0415 (optional)
    except ImportError:
        raise ConfigError("codec 'zstd' needs the zstandard package: pip install zstandard") from None
    return zstandard


def _encode(symbols: np.ndarray, alphabet: int, config: PackConfig) -> bytes:
    if config.codec == "huffman":
        return huffman.encode_stream(symbols.tolist(), alphabet, config.max_code_length)
    raw = _fixed_bytes(symbols, alphabet)
    if config.codec == "lzma":
        return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return _zstd().ZstdCompressor(level=19).compress(raw)


def _decode(data: bytes, alphabet: int, count: int, codec: str) -> np.ndarray:
    if codec == "huffman":
        out = np.asarray(huffman.decode_stream(data, alphabet, count), dtype=np.int64)
    else:
        width = 1 if alphabet <= 256 else 2
        if codec == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            raw = d.decompress(data, max_length=count * width)
        else:
            raw = _zstd().ZstdDecompressor().decompressobj().decompress(data)[: count * width]
        if len(raw) != count * width:
            raise ValueError(f"stream decodes to {len(raw)} bytes, expected {count * width}")
        out = np.frombuffer(raw, dtype=np.uint8 if width == 1 else "<u2").astype(np.int64)
    if out.size and out.max() >= alphabet:
        raise ValueError("a decoded symbol is outside its alphabet")
    return out


def _entropy_per_symbol(symbols: np.ndarray, alphabet: int) -> float:
    freqs = np.bincount(symbols, minlength=alphabet).tolist() if symbols.size else [0] * alphabet
    return huffman.entropy_bits(freqs) / max(symbols.size, 1)


# ---------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------


def gaps_encode(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Relative-index entries of sorted flat ``positions``, with fillers (``2**bits - 1``) for long gaps.

    An entry ``d < F`` stores the next position ``previous + 1 + d``; the filler ``F``
    moves ``F`` positions on and stores nothing.
    """
    filler = (1 << index_bits) - 1
    gaps = np.diff(np.concatenate([[-1], positions.astype(np.int64)])) - 1
    fillers = gaps // filler
    out = np.full(int(fillers.sum()) + gaps.size, filler, dtype=np.int64)
    out[np.cumsum(fillers + 1) - 1] = gaps % filler
    return out


def gaps_decode(entries: np.ndarray, index_bits: int) -> np.ndarray:
    """Inverse of :func:`gaps_encode`: the flat positions."""
    filler = (1 << index_bits) - 1
    steps = np.where(entries == filler, filler, entries + 1)
    return (np.cumsum(steps) - 1)[entries != filler]


def _positions_options(keep: np.ndarray, config: PackConfig) -> list[tuple[int, dict[str, Any], np.ndarray, int]]:
    """Candidate position codings: ``(estimated bytes, fields, symbols, alphabet)``."""
    positions = np.flatnonzero(keep)
    options = []
    widths = [config.index_bits] if config.index_bits else range(1, MAX_INDEX_BITS + 1)
    for b in widths:
        entries = gaps_encode(positions, b)
        options.append(({"positions": "gaps", "index_bits": b, "entries": int(entries.size)}, entries, 1 << b))
    bitmask = np.frombuffer(np.packbits(keep).tobytes(), dtype=np.uint8).astype(np.int64)
    options.append(({"positions": "bitmask"}, bitmask, 256))
    scored = [(_estimate(sym, alphabet, config), fields, sym, alphabet) for fields, sym, alphabet in options]
    if config.codec == "huffman":
        return scored
    # The index width is chosen by its Huffman size (cheap); only that and the bitmask are compressed.
    best_gaps = min(scored[:-1], key=lambda o: o[0])
    return [(len(_encode(sym, alphabet, config)), fields, sym, alphabet) for _, fields, sym, alphabet
            in (best_gaps, scored[-1])]


def _estimate(symbols: np.ndarray, alphabet: int, config: PackConfig) -> int:
    """Bytes of a stream Huffman coded (table included), from its counts alone."""
    freqs = np.bincount(symbols, minlength=alphabet).tolist() if symbols.size else [0] * alphabet
    return huffman.table_size(alphabet) + math.ceil(huffman.coded_bits(freqs, config.max_code_length) / 8)


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


@dataclass
class LayerPack:
    """What one stored tensor costs (a row of :meth:`PackReport.table`).

    Attributes:
        name: state-dict name.
        weights: elements of the tensor.
        kept: stored entries (nonzero or unmasked).
        positions: ``all``, ``gaps`` or ``bitmask``.
        values: ``raw`` or ``codebook``.
        weight_bits: bits per stored value before entropy coding (``ceil(log2 k)`` for a
            codebook, the dtype's bits for raw values).
        index_bits: bits per relative-index entry (``gaps``), None otherwise.
        index_entries: relative-index entries including fillers (``gaps``).
        codebook_size: centroids stored (``codebook``).
        fixed_bytes: size with fixed-length codes and positions (pruning + quantization).
        stored_bytes: size in the file, entropy coded, tables and codebook included.
        entropy: Shannon bound per stream, in bits per symbol (``codes``, ``positions``).
    """

    name: str
    weights: int
    kept: int
    positions: str
    values: str
    weight_bits: int
    index_bits: int | None
    index_entries: int
    codebook_size: int
    fixed_bytes: int
    stored_bytes: int
    entropy: dict[str, float] = field(default_factory=dict)

    @property
    def dense_bytes(self) -> int:
        """The tensor as dense fp32."""
        return 4 * self.weights


@dataclass
class PackReport:
    """Every byte of a packed file, per tensor and in total.

    Attributes:
        path: the file written.
        file_bytes: its size (header, streams and checksum).
        header_bytes: magic, length, compressed JSON header and checksum.
        layers: one :class:`LayerPack` per stored tensor, in state-dict order.
        codec: the entropy coder used.
    """

    path: Path
    file_bytes: int
    header_bytes: int
    layers: list[LayerPack]
    codec: str

    @property
    def dense_bytes(self) -> int:
        """Every stored tensor as dense fp32 (what Deep Compression's rates compare with)."""
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def compression(self) -> float:
        """Dense fp32 bytes over the whole file's bytes."""
        return self.dense_bytes / max(self.file_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for a stage report or a benchmark line)."""
        return {"path": str(self.path), "file_bytes": self.file_bytes, "header_bytes": self.header_bytes,
                "dense_fp32_bytes": self.dense_bytes, "compression": self.compression, "codec": self.codec,
                "layers": [{**{k: v for k, v in vars(layer).items()}, "dense_bytes": layer.dense_bytes}
                           for layer in self.layers]}

    def table(self) -> str:
        """Markdown table in the shape of Deep Compression's Table 2, plus totals."""
        lines = ["| tensor | weights | density | weight bits | index bits | rate P+Q | rate P+Q+H "
                 "| codes H (bits) | index H (bits) | bytes |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.layers:
            index = {"gaps": str(r.index_bits), "bitmask": "bitmask", "all": "—"}[r.positions]
            h_codes = f"{r.entropy['codes']:.2f}" if "codes" in r.entropy else "—"
            h_index = f"{r.entropy['positions']:.2f}" if "positions" in r.entropy else "—"
            lines.append(f"| `{r.name}` | {r.weights:,} | {100 * r.kept / max(r.weights, 1):.1f}% | {r.weight_bits} "
                         f"| {index} | {r.dense_bytes / max(r.fixed_bytes, 1):.1f}× "
                         f"| {r.dense_bytes / max(r.stored_bytes, 1):.1f}× | {h_codes} | {h_index} "
                         f"| {r.stored_bytes:,} |")
        fixed = sum(r.fixed_bytes for r in self.layers) + self.header_bytes
        lines.append(f"| **total** | {sum(r.weights for r in self.layers):,} "
                     f"| {100 * sum(r.kept for r in self.layers) / max(sum(r.weights for r in self.layers), 1):.1f}% "
                     f"| | | {self.dense_bytes / max(fixed, 1):.1f}× | **{self.compression:.1f}×** | | "
                     f"| {self.file_bytes:,} |")
        lines += ["", f"Dense fp32: {self.dense_bytes:,} bytes; packed file ({self.codec}): {self.file_bytes:,} "
                  f"bytes, of which {self.header_bytes:,} header and checksum; "
                  f"**{self.compression:.1f}× smaller**. Rates count codebooks, tables and index overhead; "
                  "entropy columns are Shannon's bound in bits per symbol of each stream."]
        return "\n".join(lines)


def _raw(values: torch.Tensor) -> bytes:
    t = values.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _pack_tensor(name: str, t: torch.Tensor, mask: torch.Tensor | None, bits_hint: int | None,
                 config: PackConfig) -> tuple[dict[str, Any], list[bytes], LayerPack]:
    t = t.detach().cpu().contiguous()
    entry: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    streams: list[bytes] = []
    entropy: dict[str, float] = {}
    if mask is not None:
        keep_t = mask.detach().cpu() != 0
    elif t.is_floating_point():
        keep_t = t != 0  # NaN != 0: NaNs are stored
    else:
        keep_t = torch.ones(t.shape, dtype=torch.bool)
    flat, keep = t.reshape(-1), keep_t.reshape(-1).numpy()
    fixed_index_bits = 0
    index_bits, entries = None, 0
    if keep.all():
        entry["positions"] = "all"
    else:
        cost, fields, symbols, alphabet = min(_positions_options(keep, config), key=lambda o: o[0])
        if t.dim() >= 2:
            # Input-major order: an input that pruning emptied (a dead pixel of the first
            # layer) is then one long gap instead of one short gap in every row.
            keep_c = keep_t.transpose(0, 1).contiguous().reshape(-1).numpy()
            option = min(_positions_options(keep_c, config), key=lambda o: o[0])
            if option[0] < cost:
                cost, fields, symbols, alphabet = option
                fields = {**fields, "order": "columns"}
                flat, keep = t.transpose(0, 1).contiguous().reshape(-1), keep_c
        entry.update(fields)
        streams.append(_encode(symbols, alphabet, config))
        entropy["positions"] = _entropy_per_symbol(symbols, alphabet)
        if fields["positions"] == "gaps":
            index_bits, entries = fields["index_bits"], fields["entries"]
            fixed_index_bits = entries * index_bits
        else:
            fixed_index_bits = flat.numel()
    kept_values = flat[torch.from_numpy(keep)]
    entry["kept"] = int(kept_values.numel())
    raw_bytes = kept_values.numel() * t.element_size()
    values, codebook_size, weight_bits = "raw", 0, 8 * t.element_size()
    candidate = None
    if t.dtype.is_floating_point and kept_values.numel() > 0:
        # Distinct bit patterns, not values: -0.0 and +0.0 (or NaNs) must come back as they were.
        as_int = kept_values.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
        distinct, codes = torch.unique(as_int, sorted=True, return_inverse=True)
        if distinct.numel() <= config.max_codebook:
            k = int(distinct.numel())
            symbols = codes.numpy().astype(np.int64)
            coded = _estimate(symbols, k, config) if config.codec == "huffman" else len(_encode(symbols, k, config))
            size = k * t.element_size() + coded
            if size < raw_bytes:
                candidate = (distinct.view(t.dtype), symbols, k)
    if candidate is not None:
        book, symbols, k = candidate
        values, codebook_size = "codebook", k
        weight_bits = max(bits_hint or 0, max(1, math.ceil(math.log2(k)))) if k > 1 else max(bits_hint or 0, 1)
        entry.update(values="codebook", k=k)
        streams += [_raw(book), _encode(symbols, k, config)]
        entropy["codes"] = _entropy_per_symbol(symbols, k)
        fixed_value_bytes = k * t.element_size() + math.ceil(symbols.size * weight_bits / 8)
    else:
        entry["values"] = "raw"
        streams.append(_raw(kept_values))
        fixed_value_bytes = raw_bytes
    entry["bytes"] = [len(s) for s in streams]
    report = LayerPack(name, flat.numel(), entry["kept"], entry["positions"], values, weight_bits, index_bits,
                       entries, codebook_size, fixed_value_bytes + math.ceil(fixed_index_bits / 8),
                       sum(entry["bytes"]), entropy)
    return entry, streams, report


def _packable(model: nn.Module) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model`` as it is packed (shared layers finalized on a copy), its bit hints, tensors and masks."""
    if shared_layers(model):
        model = copy.deepcopy(model)
        finalize_sharing_(model)
    hints = {k: v.get("bits") for k, v in (getattr(model, CODEBOOKS_ATTR, None) or {}).items()}
    return model, hints, *effective_state(model)


def packed_tensor_bytes(model: nn.Module, name: str, config: PackConfig | None = None) -> int:
    """The bytes tensor ``name`` of ``model`` takes in its packed file (:func:`pack`), without writing it.

    A search's per-layer tables ask this once per layer and choice, where packing the whole
    fmnist_teacher took up to 2 s a variant.
    """
    _, hints, state, masks = _packable(model)
    if name not in state:
        raise ConfigError(f"packed_tensor_bytes: the model has no tensor {name!r}")
    return _pack_tensor(name, state[name], masks.get(name), hints.get(name), config or PackConfig())[2].stored_bytes


def pack(model: nn.Module, path: str | os.PathLike, config: PackConfig | None = None, *,
         input_shape: list[int] | tuple[int, ...] | None = None, normalization: dict[str, Any] | None = None,
         metadata: dict[str, Any] | None = None, spec: dict[str, Any] | None = None) -> PackReport:
    """Write ``model`` in the packed ``.slim`` form, atomically, and say where every byte went.

    Shared layers (see :func:`torchslim.quant.sharing.share_weights_`) are finalized
    on a copy first; the model itself is not changed. Any other model packs too
    (it just gains less).

    Args:
        model: the model (masked, finalized, shared or dense).
        path: destination (``model.packed.slim`` by convention).
        config: codec and limits (default :class:`PackConfig`).
        input_shape: one sample's shape (default from the spec of a zoo preset).
        normalization: ``{"mean": [...], "std": [...]}`` the model expects.
        metadata: any JSON-serializable dict stored alongside.
        spec: the architecture spec, for a model that carries none.

    Returns:
        The :class:`PackReport`.

    Raises:
        ExportError: invalid spec, input_shape, normalization or metadata.
        ConfigError: ``codec: zstd`` without the zstandard package.

    Example:
        >>> import os, tempfile, torch, torchslim as ts
        >>> from torchslim.quant.pack import pack
        >>> model = ts.models.create("lenet300_100", hidden1=16, hidden2=8).eval()
        >>> path = os.path.join(tempfile.mkdtemp(), "m.packed.slim")
        >>> report = pack(model, path)
        >>> same = ts.load(path).eval()
        >>> x = torch.randn(2, 1, 28, 28)
        >>> torch.equal(same(x), model(x))
        True
    """
    config = config or PackConfig()
    model, hints, state, masks = _packable(model)
    spec, input_shape, normalization, log = header_fields(model, path, spec, input_shape, normalization, "pack")
    entries, payload, layers = {}, [], []
    for name, value in state.items():
        entries[name], streams, row = _pack_tensor(name, value, masks.get(name), hints.get(name), config)
        payload += streams
        layers.append(row)
    header = {"format": FORMAT, "version": VERSION, "spec": spec,
              "input_shape": list(input_shape) if input_shape is not None else None,
              "normalization": normalization, "transforms": log, "metadata": dict(metadata or {}),
              "codec": config.codec, "tensors": entries}
    try:
        header_json = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ExportError(f"cannot pack to {os.fspath(path)!r}: spec or metadata is not JSON-serializable: {exc}") from exc
    head = zlib.compress(header_json, 9)
    body = PACKED_MAGIC + struct.pack("<I", len(head)) + head + b"".join(payload)
    data = body + hashlib.sha256(body).digest()
    atomic_write_bytes(path, data)
    return PackReport(Path(path), len(data), len(PACKED_MAGIC) + 4 + len(head) + 32, layers, config.codec)
