"""Reading the packed ``.slim`` form that :func:`torchslim.quant.pack.pack` writes.

:func:`read_packed` checks the file (magic, checksum, header, stream sizes) before anything is
decoded, and hands back a loader that rebuilds every tensor bit-exactly;
:func:`torchslim.export.load` calls it when a file starts with the packed magic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from torchslim.core.transforms import check_log, masked_names
from torchslim.errors import ExportError, TorchSlimError
from torchslim.export.slim import PACKED_MAGIC, _check_spec, check_input_shape, check_normalization
from torchslim.quant.pack import FORMAT, MAX_INDEX_BITS, VERSION, _decode, gaps_decode

_MAX_HEADER = 64 << 20  # a decompressed header larger than this is refused
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
           "uint8": torch.uint8, "bool": torch.bool}

def _fail(path: Path, why: str) -> ExportError:
    return ExportError(f"{path}: not a readable packed .slim file: {why}")


def read_packed(path: str | os.PathLike) -> tuple[dict[str, Any], Callable[[], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]]:
    """Read and check a packed file's header; decoding the tensors waits for the returned function.

    :func:`torchslim.export.load` calls this for a file that starts with
    :data:`~torchslim.export.slim.PACKED_MAGIC`, compares the header's shapes with
    the architecture (on the meta device), then decodes.

    Returns:
        ``(header, decode)``: the header as :func:`torchslim.export.read_metadata`
        gives it (``spec``, ``input_shape``, ``normalization``, ``transforms``,
        ``masked``, ``metadata``, ``tensors`` with each one's ``shape``), and
        ``decode()`` returning ``(tensors, positions)``: every tensor by name, and the
        boolean map of each one's stored positions.

    Raises:
        ExportError: the file is truncated, damaged (checksum) or malformed.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < len(PACKED_MAGIC) + 4 + 32 or not data.startswith(PACKED_MAGIC):
        raise _fail(path, "too short or wrong magic")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise _fail(path, "checksum mismatch, the file is corrupt")
    (n,) = struct.unpack_from("<I", body, len(PACKED_MAGIC))
    start = len(PACKED_MAGIC) + 4
    if start + n > len(body):
        raise _fail(path, f"header length {n} runs past the end of the file")
    try:
        d = zlib.decompressobj()
        text = d.decompress(body[start:start + n], _MAX_HEADER)
        if d.unconsumed_tail:
            raise ValueError("header too large")
        header = json.loads(text)
    except (zlib.error, ValueError) as exc:
        raise _fail(path, f"header is not compressed JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _fail(path, f"header format is {header.get('format') if isinstance(header, dict) else header!r:.80}")
    if header.get("version") != VERSION:
        raise _fail(path, f"version {header.get('version')!r:.20} (this torchslim reads {VERSION})")
    if not isinstance(header.get("tensors"), dict) or not isinstance(header.get("metadata"), dict) \
            or header.get("codec") not in ("huffman", "lzma", "zstd"):
        raise _fail(path, "header fields 'tensors', 'metadata' or 'codec' are missing or wrong")
    try:
        if header.get("spec") is not None:
            _check_spec(header["spec"])
        check_log(header.get("transforms"))
        if header.get("input_shape") is not None:
            check_input_shape(header["input_shape"])
        if header.get("normalization") is not None:
            check_normalization(header["normalization"], header.get("input_shape"))
    except TorchSlimError as exc:
        raise _fail(path, str(exc)) from None
    header.setdefault("normalization", None)
    header.setdefault("input_shape", None)
    header["masked"] = masked_names(header["transforms"])
    payload_start, budget = start + n, 8 * len(data) << MAX_INDEX_BITS
    offset = payload_start
    for name, e in header["tensors"].items():
        ok = (isinstance(e, dict) and isinstance(e.get("shape"), list)
              and all(type(s) is int and s >= 0 for s in e["shape"]) and e.get("dtype") in _DTYPES
              and e.get("positions") in ("all", "gaps", "bitmask") and e.get("values") in ("raw", "codebook")
              and isinstance(e.get("bytes"), list) and all(type(b) is int and b >= 0 for b in e["bytes"])
              and type(e.get("kept")) is int)
        if not ok or math.prod(e["shape"]) > budget or e["kept"] > math.prod(e["shape"]):
            raise _fail(path, f"tensor {name!r} has a malformed or oversized header entry")
        offset += sum(e["bytes"])
    if offset != len(body):
        raise _fail(path, f"streams take {offset - payload_start} bytes but the file holds {len(body) - payload_start}")
    for name in header["masked"]:
        if name not in header["tensors"]:
            raise _fail(path, f"masked tensor {name!r} is not stored")

    def decode() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        tensors, positions, at = {}, {}, payload_start
        for name, e in header["tensors"].items():
            chunks = []
            for size in e["bytes"]:
                chunks.append(body[at:at + size])
                at += size
            try:
                tensors[name], positions[name] = _decode_tensor(e, chunks, header["codec"])
            except (ValueError, IndexError, KeyError, RuntimeError) as exc:
                raise _fail(path, f"tensor {name!r} does not decode: {exc}") from None
        return tensors, positions

    return header, decode


def _decode_tensor(e: dict[str, Any], chunks: list[bytes], codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, shape = _DTYPES[e["dtype"]], e["shape"]
    numel, kept = math.prod(shape), e["kept"]
    columns = e.get("order", "rows") == "columns"
    if e.get("order", "rows") not in ("rows", "columns") or (columns and (len(shape) < 2 or e["positions"] == "all")):
        raise ValueError(f"bad order {e.get('order')!r:.20}")
    chunks = list(chunks)
    if e["positions"] == "all":
        if kept != numel:
            raise ValueError("a dense tensor must store every position")
        keep = torch.ones(numel, dtype=torch.bool)
    elif e["positions"] == "bitmask":
        nbytes = (numel + 7) // 8
        symbols = _decode(chunks.pop(0), 256, nbytes, codec)
        keep = torch.from_numpy(np.unpackbits(symbols.astype(np.uint8), count=numel).astype(bool))
    else:
        b, count = e.get("index_bits"), e.get("entries")
        if type(b) is not int or not 1 <= b <= MAX_INDEX_BITS or type(count) is not int or count < 0:
            raise ValueError("bad index_bits or entries")
        where = gaps_decode(_decode(chunks.pop(0), 1 << b, count, codec), b)
        if where.size != kept or (where.size and (where[-1] >= numel)):
            raise ValueError("relative index does not fit the tensor")
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[torch.from_numpy(where)] = True
    if int(keep.sum()) != kept:
        raise ValueError(f"positions mark {int(keep.sum())} entries, the header says {kept}")
    size = torch.empty(0, dtype=dtype).element_size()
    if e["values"] == "raw":
        raw = chunks.pop(0)
        if len(raw) != kept * size:
            raise ValueError(f"raw values take {len(raw)} bytes, expected {kept * size}")
        values = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    else:
        k = e.get("k")
        if type(k) is not int or not 1 <= k <= 4096:
            raise ValueError("bad codebook size")
        book_raw = chunks.pop(0)
        if len(book_raw) != k * size:
            raise ValueError("codebook has the wrong size")
        book = torch.frombuffer(bytearray(book_raw), dtype=dtype)
        codes = torch.from_numpy(_decode(chunks.pop(0), k, kept, codec))
        values = book[codes]
    if chunks:
        raise ValueError("unexpected extra streams")
    out = torch.zeros(numel, dtype=dtype)
    out[keep] = values
    if columns:  # stored input-major: back to the tensor's own layout
        stored = [shape[1], shape[0], *shape[2:]]
        return (out.reshape(stored).transpose(0, 1).contiguous(),
                keep.reshape(stored).transpose(0, 1).contiguous())
    return out.reshape(shape), keep.reshape(shape)
