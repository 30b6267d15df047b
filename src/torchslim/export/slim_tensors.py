"""Tensors of a ``.slim`` file: effective values of masked weights, sparse encoding, decoding and checks.

See :mod:`torchslim.export.slim` for the file format as a whole.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from torchslim.core.masks import masked_tensors
from torchslim.errors import ExportError
from torchslim.export.slim_header import (BITMASK_SUFFIX, HEADER_KEY, VALUES_SUFFIX, _ENTRY_OVERHEAD, _digest,
                                          _dtype_name, _parse_header)


# ---------------------------------------------------------------------------
# state: effective tensors and masks
# ---------------------------------------------------------------------------


def effective_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors the model computes with, under plain names, and the masks.

    Returns:
        ``(state, masks)``: ``state`` is ``model.state_dict()`` with every
        ``x.weight_orig``/``x.weight_mask`` pair replaced by ``x.weight = orig * mask``
        (in the state dict's order); ``masks`` maps those plain names to their masks.
    """
    masked = {name: (module, attr) for name, module, attr in masked_tensors(model)}
    renamed = {f"{name}_orig": name for name in masked}
    dropped = {f"{name}_mask" for name in masked}
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key in dropped:
            continue
        if key in renamed:
            name = renamed[key]
            module, attr = masked[name]
            mask = getattr(module, f"{attr}_mask").detach()
            state[name] = value.detach() * mask
            masks[name] = mask
        else:
            state[key] = value.detach()
    return state, masks


# ---------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------



def _pack(keep: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(keep.reshape(-1).cpu().numpy().astype(np.bool_)))


def _unpack(bitmask: torch.Tensor, numel: int) -> torch.Tensor:
    bits = np.unpackbits(bitmask.numpy(), count=numel).astype(np.bool_)
    return torch.from_numpy(bits)


def _encode(name: str, t: torch.Tensor, mask: torch.Tensor | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header entry and stored tensors for one state-dict entry."""
    t = t.detach().cpu()
    entry = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    if mask is not None:
        mask = mask.detach().cpu()
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ExportError(f"cannot save {name!r}: its pruning mask is not binary (0/1), so a bitmask cannot hold it")
        keep = (mask != 0).reshape(-1)
    elif t.is_floating_point() and t.numel() > 0:
        keep = t.reshape(-1) != 0  # NaN != 0, so NaNs are stored too
        sparse_bytes = math.ceil(t.numel() / 8) + int(keep.sum()) * t.element_size() + _ENTRY_OVERHEAD
        if sparse_bytes >= t.numel() * t.element_size():
            keep = None
    else:
        keep = None
    if keep is None:
        # clone: tied weights share storage, which safetensors refuses to write.
        return {"encoding": "dense", **entry}, {name: t.contiguous().clone()}
    values = t.reshape(-1)[keep].clone()
    return {"encoding": "bitmask", **entry}, {name + VALUES_SUFFIX: values, name + BITMASK_SUFFIX: _pack(keep)}


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _check_stored(path: Path, header: dict[str, Any], f) -> None:
    """Check the header's tensor entries against the stored tensors' shapes, reading no data.

    Bounds every declared size by the file size, so nothing later can be made to
    allocate more than the file could hold.
    """
    entries = header["tensors"]
    budget = 8 * os.path.getsize(path)  # a bitmask holds 8 positions per byte: no tensor can have more
    expected: set[str] = set()
    for name, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("encoding") not in ("dense", "bitmask"):
            raise ExportError(f"{path}: tensor {name!r} has an unknown encoding in the header: {entry!r:.200}")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ExportError(f"{path}: tensor {name!r} has an invalid shape in the header: {shape!r:.200}")
        if math.prod(shape) > budget:
            raise ExportError(f"{path}: tensor {name!r} declares shape {shape} ({math.prod(shape):,} elements), "
                              f"more than a file of {budget // 8:,} bytes can hold")
        if entry["encoding"] == "dense":
            expected.add(name)
        else:
            expected |= {name + VALUES_SUFFIX, name + BITMASK_SUFFIX}
    stored = set(f.keys())
    if stored != expected:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise ExportError(f"{path}: stored tensors do not match the header: missing {missing}, unexpected {extra}")
    for name in header["masked"]:
        if not isinstance(entries.get(name), dict) or entries[name].get("encoding") != "bitmask":
            raise ExportError(f"{path}: masked tensor {name!r} is not stored with a bitmask")
    for name, entry in entries.items():
        shape, numel = entry["shape"], math.prod(entry["shape"])
        if entry["encoding"] == "dense":
            got, dtype = f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()
            if list(got) != shape:
                raise ExportError(f"{path}: tensor {name!r} is stored with shape {list(got)} but the header says {shape}")
        else:
            got = f.get_slice(name + BITMASK_SUFFIX).get_shape()
            if f.get_slice(name + BITMASK_SUFFIX).get_dtype() != "U8" or list(got) != [math.ceil(numel / 8)]:
                raise ExportError(
                    f"{path}: bitmask of {name!r} has shape {list(got)}, which does not fit the header shape {shape}"
                )
            values = f.get_slice(name + VALUES_SUFFIX).get_shape()
            if len(values) != 1 or values[0] > numel:
                raise ExportError(f"{path}: {name!r} stores values of shape {list(values)}, more than its shape {shape} holds")
            dtype = f.get_slice(name + VALUES_SUFFIX).get_dtype()
        if _ST_DTYPES.get(dtype, entry.get("dtype")) != entry.get("dtype"):
            raise ExportError(f"{path}: tensor {name!r} is stored as {_ST_DTYPES[dtype]} but the header says {entry.get('dtype')!r:.50}")


def _decode_all(path: Path, header: dict[str, Any], f) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read, verify and decode the stored tensors (after :func:`_check_stored`).

    The checksum is computed on the header as stored (``f.metadata()``), not on
    the one :func:`_parse_header` filled in for older versions.

    Returns:
        ``(tensors, stored_positions)``: dense tensors by name, and for every
        bitmask-encoded tensor the boolean map of its stored positions (its mask,
        for a masked weight), shaped like the tensor.
    """
    entries = header["tensors"]
    raw = {key: f.get_tensor(key) for key in sorted(f.keys())}
    digest = _digest(raw, json.loads(f.metadata()[HEADER_KEY]) if header["version"] >= 3 else None)
    if digest != header["sha256"]:
        raise ExportError(f"{path}: checksum mismatch, the file is corrupt (tensor data or header changed)")

    tensors: dict[str, torch.Tensor] = {}
    positions: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        shape, numel = entry["shape"], math.prod(entry["shape"])
        if entry["encoding"] == "dense":
            t = raw[name]
        else:
            values, bitmask = raw[name + VALUES_SUFFIX], raw[name + BITMASK_SUFFIX]
            keep = _unpack(bitmask, numel)
            if values.numel() != int(keep.sum()):
                raise ExportError(
                    f"{path}: {name!r} stores {values.numel()} values but its bitmask marks {int(keep.sum())} positions"
                )
            t = torch.zeros(numel, dtype=values.dtype)
            t[keep] = values
            t = t.reshape(shape)
            positions[name] = keep.reshape(shape)
        tensors[name] = t
    return tensors, positions
