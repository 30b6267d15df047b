"""The ``.slim`` header: format constants, checks of what a header declares, parsing, ``read_metadata``.

See :mod:`torchslim.export.slim` for the file format as a whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
from pathlib import Path
from typing import Any, Callable

import torch

from torchslim.core.transforms import check_log, masked_names
from torchslim.errors import ExportError, TorchSlimError


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
    from torchslim.quant.unpack import read_packed  # noqa: PLC0415

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

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def header_fields(model: Any, path: Any, spec: dict[str, Any] | None, input_shape: Any, normalization: Any,
                  action: str) -> tuple[dict[str, Any] | None, list[int] | None, Any, list[dict[str, Any]]]:
    """The checked spec, input shape, normalization and transform log a file about ``model`` will hold.

    Shared by :func:`torchslim.export.save` and the packed writer, so both refuse the same bad input.
    ``action`` ("save", "pack") names the operation in the error.
    """
    from torchslim.core.transforms import log_for_save  # noqa: PLC0415
    from torchslim.models import get_spec  # noqa: PLC0415

    spec = spec if spec is not None else get_spec(model)
    if spec is not None:
        _check_spec(spec)
    input_shape = _infer_input_shape(spec) if input_shape is None else check_input_shape(input_shape)
    if normalization is not None:
        normalization = check_normalization(normalization, input_shape)
    try:
        log = log_for_save(model)
    except TorchSlimError as exc:
        raise ExportError(f"cannot {action} to {os.fspath(path)!r}: the model's transform log is invalid: "
                          f"{exc}") from exc
    return spec, input_shape, normalization, log
