"""The ``.slim`` model file: one safetensors file, architecture and transform log as JSON, no pickle.

Layout (``version`` 3). The safetensors header metadata holds one key,
``"torchslim"``, whose value is a JSON string::

    {"format": "torchslim.slim", "version": 3,
     "spec": {"preset": "fmnist_student", "args": {...}},   # or {"factory": "mod:fn", ...}, or null
     "input_shape": [1, 28, 28],                             # per sample, or null
     "normalization": {"mean": [0.286], "std": [0.353]},     # per channel, or null
     "tensors": {"features.0.weight": {"encoding": "bitmask", "shape": [16, 1, 3, 3],
                                        "dtype": "float32"}, ...},
     "transforms": [{"type": "channels_removed", "ops": [...]},
                    {"type": "masks", "layers": ["features.0.weight", ...]}],
     "metadata": {...},                                      # the caller's own dict
     "sha256": "..."}

``spec`` describes the *original* architecture (null for a user's model saved
without one: load it with ``load(path, model=MyNet())``). ``transforms`` is the
ordered transform log (:mod:`torchslim.core.transforms`): loading builds the
original architecture, replays the log in order (which gives the saved shapes
and masks) and then loads the tensors.

Older files still load: version 1 (no pruning) and version 2 (a channel-pruned
model, with ``"history": [{"ops": [...]}, ...]``) list masked tensors in
``"masked"`` and have no ``transforms``; their history becomes
``channels_removed`` records and ``masked`` a ``masks`` record.
:func:`read_metadata` returns every file with ``transforms`` and ``masked`` filled in.

The model's *effective* state dict is stored: a masked weight is stored under its
plain name (``x.weight``), never as ``weight_orig``/``weight_mask``. Each entry
is encoded one of two lossless ways:

* ``"dense"``: the tensor itself, stored under its name;
* ``"bitmask"``: ``name::bitmask`` (uint8, ``numpy.packbits`` of which flattened
  positions are stored, big-endian bit order) and ``name::values`` (the stored
  entries in flattened order, same dtype). Every other position is zero.

Every masked weight uses ``"bitmask"`` with bitmask = its mask, so the mask
round-trips exactly even where a kept weight happens to be 0. Any other float
tensor uses it when that makes the file smaller; there the stored positions
are the nonzero entries. Values round-trip exactly (NaN and inf included); the
one bit not kept is the sign of a zero: a ``-0.0`` outside the stored positions
(``orig * mask`` makes many) comes back as ``+0.0``, which compares equal and
gives the same outputs.

``sha256`` covers every stored tensor (name, dtype, shape, bytes) and, from
version 3, the rest of the header (spec, input_shape, normalization, transforms,
metadata) as canonical JSON, so a damaged file is refused on load instead of
silently giving a different model. (It detects damage; it is not a signature.)

A *packed* file (:func:`torchslim.quant.pack.pack`: Deep Compression's codebooks,
codes and relative indices, entropy coded) starts with :data:`PACKED_MAGIC`
instead; :func:`load` and :func:`read_metadata` hand it to
:func:`torchslim.quant.pack.read_packed` (imported only then) and treat what it
decodes as they treat a plain file's tensors.

Loading a file never trusts its sizes: the architecture is first built on the
``meta`` device (no memory), the log replayed there, and every parameter and
buffer shape compared with the stored tensor shapes read from the safetensors
header (no data read); declared sizes are bounded by the file size, and
``input_shape`` by :data:`MAX_INPUT_ELEMENTS`. Only then is the model built
for real.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import operator
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from torchslim.atomic import atomic_write_bytes
from torchslim.core.masks import apply_mask_, masked_tensors
from torchslim.core.transforms import check_log, log_for_save, masked_names, replay_
from torchslim.errors import ExportError, TorchSlimError
from torchslim.models import build_from_spec, get_spec
from torchslim.models.registry import SPEC_ATTR

FORMAT = "torchslim.slim"
VERSION = 3  # the version written, and the newest read (1 and 2 are still read)
HEADER_KEY = "torchslim"
VALUES_SUFFIX = "::values"
BITMASK_SUFFIX = "::bitmask"
#: Largest ``input_shape`` (elements of one sample) a file may declare; ``profile``
#: allocates an input of that size, so a file must not be able to ask for more.
MAX_INPUT_ELEMENTS = 10**8
#: First bytes of the packed form (:func:`torchslim.quant.pack.pack`), which load and read_metadata also read.
PACKED_MAGIC = b"TSLIMPK1"
# Rough cost of one extra safetensors entry plus its JSON description, in bytes:
# the sparse form must beat the dense one by more than this to be chosen.
_ENTRY_OVERHEAD = 96

Factory = str | Callable[..., nn.Module]


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def _digest(tensors: dict[str, torch.Tensor], header: dict[str, Any] | None = None) -> str:
    """SHA-256 of the stored tensors and (version 3) of the header without its ``sha256``."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}\0{_dtype_name(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if header is not None:
        rest = {k: v for k, v in header.items() if k != "sha256"}
        h.update(b"\0header\0" + json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    return h.hexdigest()


def _infer_input_shape(spec: dict[str, Any] | None) -> list[int] | None:
    """Every zoo preset takes ``in_channels`` and ``input_size`` (square images)."""
    if not spec:
        return None
    args = spec.get("args", {})
    if "preset" in spec and isinstance(args.get("in_channels"), int) and isinstance(args.get("input_size"), int):
        return [args["in_channels"], args["input_size"], args["input_size"]]
    return None


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, dict) or ("preset" in spec) == ("factory" in spec):
        raise ExportError(f"model spec must be a dict naming exactly one of 'preset' or 'factory', got {spec!r:.300}")
    if not isinstance(spec.get("args", {}), dict):
        raise ExportError(f"model spec 'args' must be a dict, got {spec.get('args')!r:.300}")


def check_input_shape(shape: Any) -> list[int]:
    """Validate one sample's shape: 1 to 8 positive ints, at most :data:`MAX_INPUT_ELEMENTS` elements.

    Returns:
        The shape as a list of ints (numpy ints and ``torch.Size`` accepted).

    Raises:
        ExportError: naming what is wrong.
    """
    try:
        dims = [operator.index(d) for d in shape]
    except TypeError:
        raise ExportError(f"input_shape must be positive ints (one sample, no batch dimension), got {shape!r:.200}") from None
    if not 1 <= len(dims) <= 8 or min(dims) < 1 or any(isinstance(d, bool) for d in shape):
        raise ExportError(f"input_shape must be 1 to 8 positive ints (one sample, no batch dimension), got {shape!r:.200}")
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise ExportError(f"input_shape {dims} has {math.prod(dims):,} elements per sample, "
                          f"more than the {MAX_INPUT_ELEMENTS:,} torchslim accepts")
    return dims


def check_normalization(normalization: Any, input_shape: list[int] | None = None) -> dict[str, list[float]]:
    """Validate per-channel input normalization ``{"mean": [...], "std": [...]}``.

    A model expects ``(x - mean[c]) / std[c]`` on channel ``c`` of its input.

    Args:
        normalization: the dict; lists (or tuples) of finite numbers of one length,
            every std > 0.
        input_shape: when known, the length must be 1 or ``input_shape[0]`` (channels).

    Returns:
        ``{"mean": [float, ...], "std": [float, ...]}``.

    Raises:
        ExportError: naming what is wrong.
    """
    if not isinstance(normalization, dict) or set(normalization) != {"mean", "std"}:
        raise ExportError(f"normalization must be a dict with exactly 'mean' and 'std', got {normalization!r:.200}")
    out: dict[str, list[float]] = {}
    for key in ("mean", "std"):
        values = normalization[key]
        if not isinstance(values, (list, tuple)) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise ExportError(f"normalization {key!r} must be a non-empty list of finite numbers, got {values!r:.200}")
        out[key] = [float(v) for v in values]
    if len(out["mean"]) != len(out["std"]):
        raise ExportError(f"normalization mean has {len(out['mean'])} values but std has {len(out['std'])}")
    if min(out["std"]) <= 0:
        raise ExportError(f"normalization std must be > 0, got {out['std']}")
    if input_shape and len(out["mean"]) not in (1, input_shape[0]):
        raise ExportError(f"normalization has {len(out['mean'])} values per statistic, but input_shape "
                          f"{input_shape} has {input_shape[0]} channels (give one value per channel, or one)")
    return out


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: list[int] | tuple[int, ...] | None = None,
    normalization: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
) -> Path:
    """Save a model (dense, masked, channel-pruned or finalized) to one ``.slim`` file, atomically.

    The architecture is stored as the model's spec (models built by
    :func:`torchslim.models.create` / :func:`~torchslim.models.create_from_factory`,
    or ``spec=``) plus the transform log (channels removed, masks; see
    :mod:`torchslim.core.transforms`). A model without a spec is saved too (weights
    and log): load it back into a fresh instance of its class with
    ``load(path, model=MyNet())``. Sparse tensors are stored sparsely, so a pruned
    model's file is genuinely smaller. Nothing is pickled.

    Args:
        model: the model to save; it is not changed.
        path: destination (``.slim`` by convention). Written to a temporary file
            in the same directory, then renamed over ``path``.
        input_shape: shape of one input sample, without the batch dimension (e.g.
            ``[1, 28, 28]``); used by ``torchslim profile``. Defaults to
            ``[in_channels, input_size, input_size]`` for zoo presets. At most
            :data:`MAX_INPUT_ELEMENTS` elements.
        normalization: what the model expects its input normalized with, per
            channel: ``{"mean": [...], "std": [...]}`` (e.g. a dataset's
            ``splits.mean`` / ``splits.std``); read back by :func:`read_metadata`.
        metadata: any JSON-serializable dict stored alongside (accuracy, ...).
        spec: the architecture spec, for a model that carries none (see
            :mod:`torchslim.models.registry`).

    Returns:
        The path written.

    Raises:
        ExportError: the spec, input_shape, normalization or metadata is invalid
            or not JSON, or the model's transform log is malformed.

    Example:
        >>> import os, tempfile, torchslim as ts
        >>> path = os.path.join(tempfile.mkdtemp(), "lenet.slim")
        >>> model = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
        >>> ts.prune.prune_(model, ts.prune.MagnitudePruning(sparsity=0.9))
        >>> ts.export.save(model, path, normalization={"mean": [0.286], "std": [0.353]}).name
        'lenet.slim'
        >>> reloaded = ts.export.load(path)  # masks included
    """
    spec = spec if spec is not None else get_spec(model)
    if spec is not None:
        _check_spec(spec)
    input_shape = _infer_input_shape(spec) if input_shape is None else check_input_shape(input_shape)
    if normalization is not None:
        normalization = check_normalization(normalization, input_shape)
    try:
        log = log_for_save(model)
    except TorchSlimError as exc:
        raise ExportError(f"cannot save to {os.fspath(path)!r}: the model's transform log is invalid: {exc}") from exc

    state, masks = effective_state(model)
    entries: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        entries[name], stored = _encode(name, value, masks.get(name))
        tensors.update(stored)
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "normalization": normalization,
        "tensors": entries,
        "transforms": log,
        "metadata": dict(metadata or {}),
    }
    try:
        # Round-trip through JSON first, so the checksum is computed on what a reader will see.
        header = json.loads(json.dumps(header, allow_nan=False))
        header["sha256"] = _digest(tensors, header)
        header_json = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"cannot save to {os.fspath(path)!r}: spec or metadata is not JSON-serializable: {exc}") from exc

    from safetensors.torch import save as st_save

    data = st_save(tensors, metadata={HEADER_KEY: header_json})
    atomic_write_bytes(path, data)
    return Path(path)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def _open_error(path: Path, exc: Exception) -> ExportError:
    return ExportError(f"{path}: not a readable .slim file (truncated or corrupt?): {exc}")


def _legacy_log(header: dict[str, Any]) -> list[dict[str, Any]]:
    """The transform log of a version 1 or 2 file: its history steps, then its masks."""
    log = [{"type": "channels_removed", "ops": step.get("ops") if isinstance(step, dict) else step}
           for step in (header.get("history") or [])]
    if header["masked"]:
        log.append({"type": "masks", "layers": list(header["masked"])})
    return log


def _parse_header(path: Path, raw: dict[str, str] | None) -> dict[str, Any]:
    """Validate the header and return it with ``transforms`` and ``masked`` filled in for every version."""
    if not raw or HEADER_KEY not in raw:
        raise ExportError(f"{path}: a safetensors file without a {HEADER_KEY!r} header, so not a torchslim .slim file")
    try:
        header = json.loads(raw[HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: the {HEADER_KEY!r} header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else header
        raise ExportError(f"{path}: header format is {got!r:.100}, expected {FORMAT!r}")
    version = header.get("version")
    if type(version) is not int or version < 1:
        raise ExportError(f"{path}: header version {version!r:.100} is not a valid version")
    if version > VERSION:
        raise ExportError(f"{path}: file version {version} was written by a newer torchslim (this one reads up to {VERSION}); upgrade torchslim")
    expected_types: dict[str, Any] = {"tensors": dict, "metadata": dict, "sha256": str}
    expected_types.update({"spec": dict, "masked": list} if version < 3 else
                          {"spec": (dict, type(None)), "transforms": list})
    for key, typ in expected_types.items():
        if not isinstance(header.get(key), typ):
            raise ExportError(f"{path}: header field {key!r} is missing or has the wrong type")
    if version < 3:
        if not all(isinstance(n, str) for n in header["masked"]):
            raise ExportError(f"{path}: header field 'masked' must be a list of tensor names")
        if "history" in header and not isinstance(header["history"], list):
            raise ExportError(f"{path}: header field 'history' must be a list of steps")
        header["transforms"] = _legacy_log(header)
    try:
        check_log(header["transforms"])
    except TorchSlimError as exc:
        field = "transforms" if version >= 3 else "history"
        raise ExportError(f"{path}: header field {field!r} is invalid: {exc}") from None
    header["masked"] = masked_names(header["transforms"])
    shape = header.get("input_shape")
    if shape is not None:
        if not isinstance(shape, list):
            raise ExportError(f"{path}: header field 'input_shape' must be null or a list of positive ints, got {shape!r:.200}")
        try:
            check_input_shape(shape)
        except ExportError as exc:
            raise ExportError(f"{path}: header field 'input_shape' is refused: {exc}") from None
    norm = header.setdefault("normalization", None)
    if norm is not None:
        try:
            check_normalization(norm, shape)
        except ExportError as exc:
            raise ExportError(f"{path}: header field 'normalization' is invalid: {exc}") from None
    return header


def _sniff(path: Path) -> None:
    """Refuse, by its first bytes, a file that is not a safetensors file at all.

    A safetensors file starts with an 8-byte little-endian header length, then
    the JSON header (``{``). Without this, a PyTorch ``.pt`` file (a zip or a
    pickle) reads as an absurd header length and safetensors says "header too large".
    """
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        raise ExportError(f"{path}: not a readable .slim file (truncated or corrupt?): only {len(head)} bytes")
    if head[8:9] == b"{":
        return  # looks like safetensors; safetensors itself reports truncation and damage
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        kind = "a zip or pickle archive, like a PyTorch .pt/.pth file from torch.save"
        advice = ("; torchslim never unpickles: load it with torch.load(path, weights_only=True) into your model "
                  "and save that with torchslim.save()")
    else:
        kind, advice = "its first bytes are not a safetensors header", ""
    raise ExportError(f"{path}: not a safetensors/.slim file ({kind}){advice}")


def _packed_reader(path: str | os.PathLike) -> Callable[[Path], Any] | None:
    """The packed form's reader when ``path`` starts with :data:`PACKED_MAGIC`, else None.

    Imported only then: the packed form (:mod:`torchslim.quant.pack`) is written by
    ``quant``, and plain files must load without it.
    """
    try:
        with open(path, "rb") as fh:
            if fh.read(len(PACKED_MAGIC)) != PACKED_MAGIC:
                return None
    except OSError:
        return None  # _open says what is wrong with a missing file or a directory
    from torchslim.quant.pack import read_packed  # noqa: PLC0415

    return read_packed


def _open(path: str | os.PathLike):
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: is a directory, not a .slim file")
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    _sniff(path)
    try:
        return path, safe_open(os.fspath(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
        raise _open_error(path, exc) from exc


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read the JSON header of a ``.slim`` file (or the torchslim metadata of an ONNX file).

    Args:
        path: a file written by :func:`save`, or an ``.onnx`` file written by
            :func:`torchslim.export.export_onnx`.

    Returns:
        For a ``.slim`` file, the header dict: ``format``, ``version``, ``spec``,
        ``input_shape``, ``normalization`` (None when not recorded), ``tensors``,
        ``transforms`` (the transform log, also for older files), ``masked`` (the
        masked tensor names), ``metadata``, ``sha256``. For an ``.onnx`` file:
        ``{"format": "onnx", "input_shape", "normalization", "metadata_props"}``
        (see :func:`torchslim.export.read_onnx_metadata`).

    Raises:
        ExportError: the file is missing, not a safetensors file, or not a .slim file.

    Example:
        >>> import os, tempfile, torchslim as ts
        >>> path = os.path.join(tempfile.mkdtemp(), "lenet.slim")
        >>> _ = ts.export.save(ts.models.create("lenet300_100"), path)
        >>> header = ts.export.read_metadata(path)
        >>> header["spec"]["preset"], header["input_shape"]
        ('lenet300_100', [1, 28, 28])
    """
    if Path(path).suffix.lower() == ".onnx":
        from torchslim.export.onnx_export import read_onnx_metadata

        return read_onnx_metadata(path)
    packed = _packed_reader(path)
    if packed is not None:
        return packed(Path(path))[0]
    path, handle = _open(path)
    try:
        with handle as f:
            return _parse_header(path, f.metadata())
    except ExportError:
        raise
    except Exception as exc:  # safetensors' own errors
        raise _open_error(path, exc) from exc


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


def _build(path: Path, spec: dict[str, Any] | None, factory: Factory | None, hint: str | None,
           device: str | None = None) -> nn.Module:
    """Rebuild the architecture (on ``device``); a user factory is imported only when the caller trusts it."""
    if spec is None:
        raise ExportError(f"{path} stores no architecture spec (it was saved from a model built outside "
                          "torchslim.models): pass a fresh instance of its class, load(path, model=MyNet())")
    try:
        _check_spec(spec)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from None
    args = spec.get("args", {})
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            if callable(factory) and not isinstance(factory, str):
                model = factory(**args)
                if not isinstance(model, nn.Module):
                    raise ExportError(f"{path}: factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
                setattr(model, SPEC_ATTR, dict(spec))
                return model
            if "factory" in spec:
                target = spec["factory"]
                if factory is None:
                    how = (hint or "pass factory={target!r} to load() to import it, "
                           "or factory=<callable> to build the model yourself").format(target=target)
                    raise ExportError(f"{path} names user code {target!r} as its model factory, which is not "
                                      f"imported unless you trust it: {how}")
                if factory != target:
                    raise ExportError(f"{path} names model factory {target!r}, but factory={factory!r} was passed")
            elif factory is not None:
                raise ExportError(
                    f"{path} holds zoo preset {spec['preset']!r}, not a user factory; factory={factory!r} does not apply"
                )
            return build_from_spec(spec)
    except ExportError:
        raise
    except Exception as exc:  # our ModelError, or anything a builder raises on absurd arguments
        where = " on the meta device (shapes are checked there before any memory is allocated)" if device == "meta" else ""
        raise ExportError(f"{path}: cannot build the model from its spec {spec!r:.300}{where}: "
                          f"{type(exc).__name__}: {exc}") from exc


def _expected_shapes(header: dict[str, Any]) -> dict[str, list[int]]:
    """State-dict name -> shape the file will load (a masked ``x`` gives ``x_orig`` and ``x_mask``)."""
    masked = set(header["masked"])
    out: dict[str, list[int]] = {}
    for name, entry in header["tensors"].items():
        if name in masked:
            out[f"{name}_orig"] = out[f"{name}_mask"] = entry["shape"]
        else:
            out[name] = entry["shape"]
    return out


def _check_fits(path: Path, model: nn.Module, header: dict[str, Any], where: str) -> None:
    """Refuse, naming the first mismatching tensor, a model whose state dict the file does not fit."""
    expected = _expected_shapes(header)
    state = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            missing = sorted(set(state) - set(expected))
            raise ExportError(f"{path}: tensor {key!r} of {where} is not in the file "
                              f"(missing from the file: {missing[:10]}{' ...' if len(missing) > 10 else ''})")
        if list(value.shape) != expected[key]:
            raise ExportError(f"{path}: tensor {key!r} has shape {expected[key]} in the file "
                              f"but {list(value.shape)} in {where}")
    extra = sorted(set(expected) - set(state))
    if extra:
        raise ExportError(f"{path}: tensors do not match {where}: not in the model {extra[:10]}"
                          f"{' ...' if len(extra) > 10 else ''}")


def _replay(path: Path, model: nn.Module, log: list[dict[str, Any]], where: str) -> None:
    try:
        replay_(model, log)
    except TorchSlimError as exc:
        raise ExportError(f"{path}: the transform log does not fit {where}: {exc}") from exc
    except Exception as exc:  # a surgery function failing on a layer of the user's class
        raise ExportError(f"{path}: the transform log does not fit {where}: {type(exc).__name__}: {exc}") from exc


def _split_name(path: Path, model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    try:
        return model.get_submodule(prefix), attr
    except AttributeError:
        raise ExportError(f"{path}: the rebuilt model has no module {prefix!r} (for tensor {name!r})") from None


def _match_dtypes_(path: Path, model: nn.Module, target: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Give the model's float tensors the dtype of the tensors about to be loaded into them."""
    for key, value in target.items():
        ref = expected[key]
        if ref.dtype == value.dtype or not (ref.is_floating_point() and value.is_floating_point()):
            continue
        module, attr = _split_name(path, model, key)
        if attr in module._parameters:
            module._parameters[attr].data = module._parameters[attr].data.to(value.dtype)
        elif attr in module._buffers:
            module._buffers[attr] = module._buffers[attr].to(value.dtype)


def load(
    path: str | os.PathLike,
    *,
    factory: Factory | None = None,
    model: nn.Module | None = None,
    dtype: torch.dtype | None = torch.float32,
    factory_hint: str | None = None,
) -> nn.Module:
    """Load a ``.slim`` file: build the architecture, replay its transform log, load the tensors.

    Reading never unpickles anything. The returned model computes exactly what the
    saved one did; masked weights come back as masks (``weight_orig`` +
    ``weight_mask``), so the model can keep training with pruned weights held at
    zero; a channel-pruned model comes back with its smaller layers (and its
    ``torchslim_transforms`` / ``torchslim_history``). The model is returned on
    the CPU (or where ``model`` lives), in training mode like any new module.

    Before anything is allocated, the architecture is built on the ``meta`` device
    and its shapes compared with the file's, so a file cannot make ``load``
    allocate more than its own size.

    Args:
        path: a file written by :func:`save` (any version).
        factory: needed only for a file whose spec names user code
            (``{"factory": "pkg.mod:fn"}``): that code is imported only if
            ``factory`` equals the same ``"pkg.mod:fn"`` string. A callable is
            used instead of the spec's builder (called with the spec's args).
        model: a fresh (untransformed) instance of the saved model's class, used
            instead of building one from the spec: the log is replayed on it and
            the weights loaded into it, in place. The way to load a user's model
            saved without a spec.
        dtype: floating-point tensors come back in this dtype (default float32,
            whatever the file stores: a float16 file is a storage format, and
            float16 to float32 is exact). ``None`` keeps each tensor's stored dtype.
        factory_hint: what the error for an untrusted factory tells the user to
            do, with ``{target}`` for the factory's name (a CLI says ``--factory``);
            default: pass ``factory=`` to ``load()``.

    Returns:
        The model (``model`` itself when given), with ``torchslim_spec`` set when
        it was built from the spec.

    Raises:
        ExportError: the file is missing, a directory, not a safetensors file,
            truncated or corrupt, its header is invalid or does not fit the model
            (naming the first mismatching tensor), it stores no spec and no
            ``model`` was given, or it names a user factory that was not trusted.

    Example:
        >>> import os, tempfile, torch, torchslim as ts
        >>> path = os.path.join(tempfile.mkdtemp(), "lenet.slim")
        >>> model = ts.models.create("lenet300_100", hidden1=16, hidden2=8).eval()
        >>> _ = ts.export.save(model, path)
        >>> same = ts.export.load(path).eval()
        >>> x = torch.randn(2, 1, 28, 28)
        >>> torch.equal(same(x), model(x))
        True
        >>> mine = ts.export.load("mine.slim", factory="mypkg.nets:build")  # doctest: +SKIP
        >>> mine = ts.export.load("mine.slim", model=MyNet())  # doctest: +SKIP
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ExportError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    if model is not None and factory is not None:
        raise ExportError("pass factory= or model= to load(), not both")
    if model is not None and not isinstance(model, nn.Module):
        raise ExportError(f"model= must be a torch.nn.Module instance, got {type(model).__name__}")
    packed = _packed_reader(path)
    if packed is not None:
        path, handle = Path(path), contextlib.nullcontext()
        header, decode = packed(path)
    else:
        path, handle = _open(path)
    try:
        with handle as f:
            if packed is None:
                header = _parse_header(path, f.metadata())
                _check_stored(path, header, f)
            log = header["transforms"]
            # Shapes first, on a model that holds no memory: a header may declare anything.
            if model is None:
                where = f"the model rebuilt from spec {header['spec']!r:.300}"
                probe = _build(path, header["spec"], factory, factory_hint, device="meta")
            else:
                where = f"the given {type(model).__name__}"
                probe = copy.deepcopy(model) if log else model
            if log:
                _replay(path, probe, log, where)
                where += " and its transform log"
            _check_fits(path, probe, header, where)
            del probe
            tensors, positions = decode() if packed is not None else _decode_all(path, header, f)
    except ExportError:
        raise
    except Exception as exc:  # safetensors' own errors while reading tensor data
        raise _open_error(path, exc) from exc

    if model is None:
        model = _build(path, header["spec"], factory, factory_hint)
    if log:
        _replay(path, model, log, where)
    masks = {name: positions[name] for name in header["masked"]}
    target: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        if name in masks:
            target[f"{name}_orig"], target[f"{name}_mask"] = value, masks[name].to(value.dtype)
        else:
            target[name] = value
    _match_dtypes_(path, model, target, model.state_dict())
    model.load_state_dict(target, strict=True)
    for name in masks:
        module, attr = _split_name(path, model, name)
        apply_mask_(module, getattr(module, f"{attr}_mask").clone(), attr)  # refreshes module.<attr>
    return model
