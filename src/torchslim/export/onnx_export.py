"""ONNX export with an output-parity check in onnxruntime.

Exporter choice (torch 2.13): the default ``torch.onnx.export(..., dynamo=True)``
(torch.export + onnxscript) is tried first. On this project's conv/BN/linear/
maxpool models it gives the same graph and parity (~1e-7) as the legacy
TorchScript exporter, and it is the path PyTorch maintains (the TorchScript one
warns that it will be removed). It costs about a second per export, and it cannot
capture some Python control flow, so when it fails the TorchScript exporter
(``dynamo=False``) is tried; ``exporter=`` forces one of them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from torchslim.atomic import atomic_path
from torchslim.core.masks import finalize_
from torchslim.errors import ExportError

_INSTALL_HINT = "ONNX export needs onnx and onnxruntime: pip install torchslim[onnx]"
#: ``metadata_props`` keys written by :func:`export_onnx` (values are JSON).
META_INPUT_SHAPE = "torchslim.input_shape"
META_MEAN = "torchslim.normalization.mean"
META_STD = "torchslim.normalization.std"


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in inputs):
        raise ExportError("example_inputs must be a tensor or a tuple of tensors, each with a batch dimension first")
    return inputs


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints, deprecation warnings and optional-op log lines."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int | None, dynamo: bool) -> None:
    input_names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    kwargs: dict[str, Any] = dict(input_names=input_names, output_names=["output"], opset_version=opset)
    if dynamo:
        batch = torch.export.Dim("batch")
        kwargs.update(dynamo=True, verbose=False, external_data=False,
                      dynamic_shapes=tuple({0: batch} for _ in inputs))
    else:
        axes = {name: {0: "batch"} for name in input_names}
        axes["output"] = {0: "batch"}
        kwargs.update(dynamo=False, dynamic_axes=axes)
    with _quiet():
        torch.onnx.export(model, inputs, os.fspath(path), **kwargs)


def _other_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example at another batch size (rows repeated, floats perturbed), to check the dynamic batch."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in inputs:
        n = t.shape[0] + 2
        t2 = t[torch.arange(n) % t.shape[0]]
        if t2.is_floating_point():
            t2 = t2 + 0.1 * torch.randn(t2.shape, generator=gen).to(t2.dtype)
        out.append(t2)
    return tuple(out)


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    check: bool = True,
    atol: float = 1e-4,
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto",
    normalization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export a model to ONNX (batch dimension dynamic) and check it against PyTorch.

    The export runs on a finalized, eval-mode, CPU deep copy: the model passed in
    is not changed, and masks become plain zeros in the ONNX weights. With
    ``check``, onnxruntime runs the file on ``example_inputs`` and on a batch of
    another size, and the largest absolute difference to PyTorch is reported.
    The file is written atomically (a failed export or check leaves no file).

    What the model expects is written as ONNX ``metadata_props`` (JSON values):
    ``torchslim.input_shape`` (one sample's shape, without the batch dimension;
    a list of shapes for several inputs) and, with ``normalization``,
    ``torchslim.normalization.mean`` / ``torchslim.normalization.std``; read them
    back with :func:`read_onnx_metadata` (or :func:`torchslim.export.read_metadata`).

    Args:
        model: the model to export (dense, masked or finalized).
        example_inputs: a tensor, or tuple of tensors, with the batch dimension first.
        path: the ``.onnx`` file to write.
        opset: ONNX opset version; None lets the exporter choose its default.
        check: run onnxruntime and compare outputs.
        atol: largest absolute output difference accepted by the check.
        exporter: ``"auto"`` tries torch's default (dynamo) exporter and falls back
            to the TorchScript one; ``"dynamo"`` / ``"torchscript"`` use only that one.
        normalization: per-channel input normalization the model expects,
            ``{"mean": [...], "std": [...]}`` (e.g. a dataset's ``splits.mean`` / ``splits.std``).

    Returns:
        ``{"path": str, "max_abs_diff": float | None (None without check),
        "opset": int, "bytes": int, "exporter": "dynamo" | "torchscript"}``.

    Raises:
        ExportError: onnx/onnxruntime are missing, both exporters failed, or the
            outputs differ by more than ``atol``.

    Example:
        >>> import torch, torchslim as ts
        >>> model = ts.models.create("fmnist_student", width=4, fc=8)
        >>> info = ts.export.export_onnx(model, torch.randn(1, 1, 28, 28), "/tmp/student.onnx")
        >>> info["max_abs_diff"] < 1e-4
        True
    """
    try:
        import onnx
    except ImportError as exc:
        raise ExportError(_INSTALL_HINT) from exc
    if check:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ExportError(_INSTALL_HINT) from exc
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")

    inputs = tuple(t.detach().cpu() for t in _as_tuple(example_inputs))
    shapes = [list(t.shape[1:]) for t in inputs]
    props = {META_INPUT_SHAPE: json.dumps(shapes[0] if len(shapes) == 1 else shapes)}
    if normalization is not None:
        from torchslim.export.slim import check_normalization

        norm = check_normalization(normalization, shapes[0] if len(shapes) == 1 and shapes[0] else None)
        props.update({META_MEAN: json.dumps(norm["mean"]), META_STD: json.dumps(norm["std"])})
    export_model = copy.deepcopy(model).cpu()
    finalize_(export_model)
    export_model.eval()

    path = Path(path)
    tries = {"auto": [True, False], "dynamo": [True], "torchscript": [False]}[exporter]
    with atomic_path(path) as tmp:
        errors = []
        for dynamo in tries:
            try:
                _export(export_model, inputs, tmp, opset, dynamo)
                used = "dynamo" if dynamo else "torchscript"
                break
            except Exception as exc:  # the exporters raise many types; report them all if none works
                errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {exc}")
                with contextlib.suppress(OSError):
                    tmp.unlink()
        else:
            raise ExportError(f"could not export {type(model).__name__} to ONNX:\n" + "\n".join(errors))

        proto = onnx.load(os.fspath(tmp), load_external_data=False)
        _set_props(proto, props)
        onnx.save(proto, os.fspath(tmp))
        used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
        max_diff = None
        if check:
            session = onnxruntime.InferenceSession(os.fspath(tmp), providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            max_diff = 0.0
            for batch in (inputs, _other_batch(inputs)):
                with torch.no_grad():
                    expected = export_model(*batch)
                expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
                got = session.run(None, {n: t.numpy() for n, t in zip(names, batch)})
                if len(got) != len(expected):
                    raise ExportError(f"ONNX model has {len(got)} outputs, PyTorch's has {len(expected)}")
                for g, e in zip(got, expected):
                    if g.shape != tuple(e.shape):
                        raise ExportError(f"ONNX output shape {g.shape} differs from PyTorch's {tuple(e.shape)}")
                    max_diff = max(max_diff, float(np.max(np.abs(g - e.numpy()), initial=0.0)))
            if not max_diff <= atol:  # also catches NaN
                raise ExportError(f"ONNX outputs differ from PyTorch by {max_diff:.3g} > atol={atol:g} ({used} exporter)")
        size = tmp.stat().st_size
    return {"path": os.fspath(path), "max_abs_diff": max_diff, "opset": used_opset, "bytes": size, "exporter": used}


def _set_props(proto: Any, props: dict[str, str]) -> None:
    """Replace torchslim's entries of the model's ``metadata_props``, keeping everyone else's."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in kept + sorted(props.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What an ONNX file written by :func:`export_onnx` says about its input.

    Args:
        path: an ``.onnx`` file.

    Returns:
        ``{"format": "onnx", "input_shape": list | None, "normalization":
        {"mean": [...], "std": [...]} | None, "metadata_props": {key: value}}``
        (``metadata_props`` holds every entry, as strings).

    Raises:
        ExportError: onnx is missing, the file is missing or not an ONNX model,
            or a torchslim entry is not valid JSON.

    Example:
        >>> from torchslim.export import read_onnx_metadata
        >>> read_onnx_metadata("/tmp/student.onnx")["input_shape"]  # doctest: +SKIP
        [1, 28, 28]
    """
    try:
        import onnx
    except ImportError as exc:
        raise ExportError(_INSTALL_HINT) from exc
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: {'is a directory, not an ONNX file' if path.is_dir() else 'no such file'}")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{path}: not a readable ONNX file: {exc}") from exc
    props = {p.key: p.value for p in proto.metadata_props}

    def field(key: str) -> Any:
        if key not in props:
            return None
        try:
            return json.loads(props[key])
        except json.JSONDecodeError as exc:
            raise ExportError(f"{path}: ONNX metadata {key!r} is not JSON: {exc}") from None

    mean, std = field(META_MEAN), field(META_STD)
    return {
        "format": "onnx",
        "input_shape": field(META_INPUT_SHAPE),
        "normalization": {"mean": mean, "std": std} if mean is not None and std is not None else None,
        "metadata_props": props,
    }
