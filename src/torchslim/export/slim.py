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
:func:`torchslim.quant.unpack.read_packed` (imported only then) and treat what it
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
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from torchslim.atomic import atomic_write_bytes
from torchslim.core.masks import apply_mask_
from torchslim.core.transforms import replay_
from torchslim.errors import ExportError, TorchSlimError
from torchslim.models import build_from_spec
from torchslim.models.registry import SPEC_ATTR

from torchslim.export.slim_header import (  # noqa: F401  (re-exported: the format's names live there)
    BITMASK_SUFFIX, FORMAT, HEADER_KEY, MAX_INPUT_ELEMENTS, PACKED_MAGIC, VALUES_SUFFIX, VERSION, _check_spec,
    _digest, _infer_input_shape, _open, _open_error, _packed_reader, _parse_header, _sniff, check_input_shape,
    check_normalization, header_fields,
    read_metadata,
)
from torchslim.export.slim_tensors import _check_stored, _decode_all, _encode, effective_state  # noqa: F401


Factory = str | Callable[..., nn.Module]


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
    spec, input_shape, normalization, log = header_fields(model, path, spec, input_shape, normalization, "save")

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
