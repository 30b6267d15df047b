"""The ``.slim`` model file: one safetensors file, architecture as JSON, no pickle.

Layout (``version`` 1, or 2 with a pruning history). The safetensors header metadata holds one key,
``"torchslim"``, whose value is a JSON string::

    {"format": "torchslim.slim", "version": 1,
     "spec": {"preset": "fmnist_student", "args": {...}},   # or {"factory": "mod:fn", ...}
     "input_shape": [1, 28, 28],                             # per sample, or null
     "tensors": {"features.0.weight": {"encoding": "bitmask", "shape": [16, 1, 3, 3],
                                        "dtype": "float32"}, ...},
     "masked": ["features.0.weight", ...],
     "metadata": {...},                                      # the caller's own dict
     "history": [{"ops": [...]}, ...],                       # version 2 only, see below
     "sha256": "..."}                                        # of the stored tensors

``history`` (written only for a channel-pruned model, which makes the file
version 2) is the model's ``torchslim_history``: the channels structured pruning
removed, step by step (:mod:`torchslim.prune.structured.history`). The spec still
describes the unpruned architecture; loading rebuilds it, replays the history
(which gives the pruned shapes) and then loads the tensors. A version-1 reader
refuses such a file ("written by a newer torchslim") rather than failing on shapes.

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

``sha256`` covers every stored tensor (name, dtype, shape, bytes), so a file
whose data was damaged is refused on load instead of silently giving a
different model.
"""

from __future__ import annotations

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

from torchslim.errors import ExportError, TorchSlimError
from torchslim.atomic import atomic_write_bytes
from torchslim.models import build_from_spec, get_spec
from torchslim.models.registry import SPEC_ATTR
from torchslim.prune.masks import apply_mask_, is_masked
from torchslim.prune.structured.history import check_history, get_history, replay_history_

FORMAT = "torchslim.slim"
VERSION = 2  # the newest version written and read; files without a pruning history are still written as 1
HEADER_KEY = "torchslim"
VALUES_SUFFIX = "::values"
BITMASK_SUFFIX = "::bitmask"
# Rough cost of one extra safetensors entry plus its JSON description, in bytes:
# the sparse form must beat the dense one by more than this to be chosen.
_ENTRY_OVERHEAD = 96

Factory = str | Callable[..., nn.Module]


# ---------------------------------------------------------------------------
# state: effective tensors and masks
# ---------------------------------------------------------------------------


def _masked_names(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(full_name, module, attr)`` of every masked tensor, one per state-dict path."""
    out = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for pname in list(module._parameters):
            if pname.endswith("_orig") and is_masked(module, pname[: -len("_orig")]):
                attr = pname[: -len("_orig")]
                out.append((f"{prefix}.{attr}" if prefix else attr, module, attr))
    return out


def effective_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors the model computes with, under plain names, and the masks.

    Returns:
        ``(state, masks)``: ``state`` is ``model.state_dict()`` with every
        ``x.weight_orig``/``x.weight_mask`` pair replaced by ``x.weight = orig * mask``
        (in the state dict's order); ``masks`` maps those plain names to their masks.
    """
    masked = {name: (module, attr) for name, module, attr in _masked_names(model)}
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


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}\0{_dtype_name(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _infer_input_shape(spec: dict[str, Any]) -> list[int] | None:
    """Every zoo preset takes ``in_channels`` and ``input_size`` (square images)."""
    args = spec.get("args", {})
    if "preset" in spec and isinstance(args.get("in_channels"), int) and isinstance(args.get("input_size"), int):
        return [args["in_channels"], args["input_size"], args["input_size"]]
    return None


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, dict) or ("preset" in spec) == ("factory" in spec):
        raise ExportError(f"model spec must be a dict naming exactly one of 'preset' or 'factory', got {spec!r}")
    if not isinstance(spec.get("args", {}), dict):
        raise ExportError(f"model spec 'args' must be a dict, got {spec.get('args')!r}")


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: list[int] | tuple[int, ...] | None = None,
    metadata: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
) -> Path:
    """Save a model (dense, masked or finalized) to one ``.slim`` file, atomically.

    The architecture is stored as the model's spec, so only models built by
    :func:`torchslim.models.create` / :func:`torchslim.models.create_from_factory`
    (or given ``spec=``) can be saved. Masks are kept; sparse tensors are stored
    sparsely, so a pruned model's file is genuinely smaller. Nothing is pickled.

    Args:
        model: the model to save; it is not changed.
        path: destination (``.slim`` by convention). Written to a temporary file
            in the same directory, then renamed over ``path``.
        input_shape: shape of one input sample, without the batch dimension (e.g.
            ``[1, 28, 28]``); used by ``torchslim profile``. Defaults to
            ``[in_channels, input_size, input_size]`` for zoo presets.
        metadata: any JSON-serializable dict stored alongside (accuracy, history, ...).
        spec: the architecture spec, for a model that carries none (see
            :mod:`torchslim.models.registry`).

    Returns:
        The path written.

    Raises:
        ExportError: the model has no spec, or the spec/metadata is not JSON.

    Example:
        >>> import os, tempfile, torchslim as ts
        >>> path = os.path.join(tempfile.mkdtemp(), "lenet.slim")
        >>> model = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
        >>> ts.prune.prune_(model, ts.prune.MagnitudePruning(sparsity=0.9))
        >>> ts.export.save(model, path, metadata={"accuracy": 0.97}).name
        'lenet.slim'
        >>> reloaded = ts.export.load(path)  # masks included
    """
    spec = spec if spec is not None else get_spec(model)
    if spec is None:
        raise ExportError(
            f"cannot save {type(model).__name__} to {os.fspath(path)!r}: it carries no architecture spec. "
            "Only models built by torchslim.models.create(...) or create_from_factory('pkg.mod:fn', ...) "
            "can be saved with their architecture; otherwise pass spec={'factory': 'pkg.mod:fn', 'args': {...}}"
        )
    _check_spec(spec)
    if input_shape is None:
        input_shape = _infer_input_shape(spec)
    else:
        try:
            input_shape = [operator.index(d) for d in input_shape]  # ints, numpy ints, torch.Size
        except TypeError:
            input_shape = None
        if not input_shape or min(input_shape) < 1:
            raise ExportError(f"input_shape must be positive ints (one sample, no batch dimension), got {input_shape!r}")

    history = get_history(model)
    state, masks = effective_state(model)
    entries: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        entries[name], stored = _encode(name, value, masks.get(name))
        tensors.update(stored)
    header = {
        "format": FORMAT,
        "version": 2 if history else 1,
        "spec": spec,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "tensors": entries,
        "masked": sorted(masks),
        "metadata": dict(metadata or {}),
        "sha256": _digest(tensors),
    }
    if history:
        header["history"] = history
    try:
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


def _parse_header(path: Path, raw: dict[str, str] | None) -> dict[str, Any]:
    if not raw or HEADER_KEY not in raw:
        raise ExportError(f"{path}: a safetensors file without a {HEADER_KEY!r} header, so not a torchslim .slim file")
    try:
        header = json.loads(raw[HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: the {HEADER_KEY!r} header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else header
        raise ExportError(f"{path}: header format is {got!r}, expected {FORMAT!r}")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"{path}: header version {version!r} is not a valid version")
    if version > VERSION:
        raise ExportError(f"{path}: file version {version} was written by a newer torchslim (this one reads up to {VERSION}); upgrade torchslim")
    expected_types = {"spec": dict, "tensors": dict, "masked": list, "metadata": dict, "sha256": str}
    for key, typ in expected_types.items():
        if not isinstance(header.get(key), typ):
            raise ExportError(f"{path}: header field {key!r} is missing or not a {typ.__name__}")
    if "history" in header:
        try:
            check_history(header["history"])
        except TorchSlimError as exc:
            raise ExportError(f"{path}: header field 'history' is invalid: {exc}") from None
    shape = header.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ExportError(f"{path}: header field 'input_shape' must be null or a list of positive ints, got {shape!r}")
    return header


def _open(path: str | os.PathLike):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        return path, safe_open(os.fspath(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
        raise _open_error(path, exc) from exc


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read the JSON header of a ``.slim`` file without building the model.

    Args:
        path: a file written by :func:`save`.

    Returns:
        The header dict: ``format``, ``version``, ``spec``, ``input_shape``,
        ``tensors``, ``masked``, ``metadata``, ``sha256``, and ``history`` for a
        channel-pruned model.

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
    path, handle = _open(path)
    with handle as f:
        return _parse_header(path, f.metadata())


def _decode_all(path: Path, header: dict[str, Any], f) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Validate the stored tensors against the header and decode them.

    Returns:
        ``(tensors, stored_positions)``: dense tensors by name, and for every
        bitmask-encoded tensor the boolean map of its stored positions (its mask,
        for a masked weight), shaped like the tensor.
    """
    entries = header["tensors"]
    expected: set[str] = set()
    for name, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("encoding") not in ("dense", "bitmask"):
            raise ExportError(f"{path}: tensor {name!r} has an unknown encoding in the header: {entry!r}")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ExportError(f"{path}: tensor {name!r} has an invalid shape in the header: {shape!r}")
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

    raw = {key: f.get_tensor(key) for key in sorted(stored)}
    if _digest(raw) != header["sha256"]:
        raise ExportError(f"{path}: checksum mismatch, the tensor data is corrupt")

    tensors: dict[str, torch.Tensor] = {}
    positions: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        shape, numel = entry["shape"], math.prod(entry["shape"])
        if entry["encoding"] == "dense":
            t = raw[name]
            if list(t.shape) != shape:
                raise ExportError(f"{path}: tensor {name!r} is stored with shape {list(t.shape)} but the header says {shape}")
        else:
            values, bitmask = raw[name + VALUES_SUFFIX], raw[name + BITMASK_SUFFIX]
            if bitmask.dtype != torch.uint8 or list(bitmask.shape) != [math.ceil(numel / 8)]:
                raise ExportError(
                    f"{path}: bitmask of {name!r} has shape {list(bitmask.shape)} ({_dtype_name(bitmask.dtype)}), "
                    f"which does not fit the header shape {shape}"
                )
            keep = _unpack(bitmask, numel)
            if values.dim() != 1 or values.numel() != int(keep.sum()):
                raise ExportError(
                    f"{path}: {name!r} stores {values.numel()} values but its bitmask marks {int(keep.sum())} positions"
                )
            t = torch.zeros(numel, dtype=values.dtype)
            t[keep] = values
            t = t.reshape(shape)
            positions[name] = keep.reshape(shape)
        if _dtype_name(t.dtype) != entry.get("dtype"):
            raise ExportError(f"{path}: tensor {name!r} is stored as {_dtype_name(t.dtype)} but the header says {entry.get('dtype')!r}")
        tensors[name] = t
    return tensors, positions


def _build(path: Path, spec: dict[str, Any], factory: Factory | None) -> nn.Module:
    """Rebuild the architecture; a user factory is imported only when the caller trusts it."""
    try:
        _check_spec(spec)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from None
    args = spec.get("args", {})
    try:
        if callable(factory) and not isinstance(factory, str):
            model = factory(**args)
            if not isinstance(model, nn.Module):
                raise ExportError(f"{path}: factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
            setattr(model, SPEC_ATTR, dict(spec))
            return model
        if "factory" in spec:
            target = spec["factory"]
            if factory is None:
                raise ExportError(
                    f"{path} names user code {target!r} as its model factory, which is not imported "
                    f"unless you trust it: pass factory={target!r} to load() to import it, "
                    "or factory=<callable> to build the model yourself"
                )
            if factory != target:
                raise ExportError(f"{path} names model factory {target!r}, but factory={factory!r} was passed")
        elif factory is not None:
            raise ExportError(
                f"{path} holds zoo preset {spec['preset']!r}, not a user factory; factory={factory!r} does not apply"
            )
        return build_from_spec(spec)
    except ExportError:
        raise
    except TorchSlimError as exc:
        raise ExportError(f"{path}: cannot rebuild the model from its spec {spec!r}: {exc}") from exc


def _split_name(path: Path, model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    try:
        return model.get_submodule(prefix), attr
    except AttributeError:
        raise ExportError(f"{path}: the rebuilt model has no module {prefix!r} (for tensor {name!r})") from None


def _match_dtypes_(path: Path, model: nn.Module, target: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Give float tensors the file's dtype (a model saved in half precision reloads in half)."""
    for key, value in target.items():
        ref = expected[key]
        if ref.dtype == value.dtype or not (ref.is_floating_point() and value.is_floating_point()):
            continue
        module, attr = _split_name(path, model, key)
        if attr in module._parameters:
            module._parameters[attr].data = module._parameters[attr].data.to(value.dtype)
        elif attr in module._buffers:
            module._buffers[attr] = module._buffers[attr].to(value.dtype)


def load(path: str | os.PathLike, *, factory: Factory | None = None) -> nn.Module:
    """Load a ``.slim`` file: rebuild the architecture, replay its pruning history, re-apply masks, load the tensors.

    Reading never unpickles anything. The returned model computes exactly what the
    saved one did; masked weights come back as masks (``weight_orig`` +
    ``weight_mask``), so the model can keep training with pruned weights held at
    zero; a channel-pruned model comes back with its smaller layers (and its
    ``torchslim_history``). The model is returned on the CPU, in training mode like
    any new module.

    Args:
        path: a file written by :func:`save`.
        factory: needed only for a file whose spec names user code
            (``{"factory": "pkg.mod:fn"}``): that code is imported only if
            ``factory`` equals the same ``"pkg.mod:fn"`` string. A callable is
            used instead of the spec's builder (called with the spec's args).

    Returns:
        The model, with ``torchslim_spec`` set.

    Raises:
        ExportError: the file is missing, truncated or corrupt, its header is
            invalid or does not match the rebuilt model, or it names a user
            factory that was not trusted with ``factory=``.

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
    """
    path, handle = _open(path)
    try:
        with handle as f:
            header = _parse_header(path, f.metadata())
            tensors, positions = _decode_all(path, header, f)
    except ExportError:
        raise
    except Exception as exc:  # safetensors' own errors while reading tensor data
        raise _open_error(path, exc) from exc

    model = _build(path, header["spec"], factory)
    where = f"the model rebuilt from spec {header['spec']!r}"
    if header.get("history"):
        try:
            replay_history_(model, header["history"])
        except TorchSlimError as exc:
            raise ExportError(f"{path}: the pruning history does not fit {where}: {exc}") from exc
        where += " and its pruning history"
    masks = {name: positions[name] for name in header["masked"]}
    target: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if name in masks:
            module, attr = _split_name(path, model, name)
            param = module._parameters.get(attr)
            if param is None:
                raise ExportError(f"{path}: masked tensor {name!r} is not a parameter of {where}")
            if list(param.shape) != list(value.shape):
                raise ExportError(f"{path}: tensor {name!r} has shape {list(value.shape)} in the file but {list(param.shape)} in {where}")
            mask = masks[name].to(value.dtype)
            apply_mask_(module, mask.to(param.dtype), attr)
            target[f"{name}_orig"], target[f"{name}_mask"] = value, mask
        else:
            target[name] = value

    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(target)), sorted(set(target) - set(expected))
    if missing or extra:
        raise ExportError(f"{path}: tensors do not match {where}: missing from the file {missing}, not in the model {extra}")
    for key, value in target.items():
        if list(expected[key].shape) != list(value.shape):
            raise ExportError(f"{path}: tensor {key!r} has shape {list(value.shape)} in the file but {list(expected[key].shape)} in {where}")
    _match_dtypes_(path, model, target, expected)
    model.load_state_dict(target, strict=True)
    for name, mask in masks.items():
        module, attr = _split_name(path, model, name)
        apply_mask_(module, mask.to(getattr(module, f"{attr}_orig").dtype), attr)  # refreshes module.<attr>
    return model
