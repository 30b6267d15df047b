"""Int8 post-training quantization through ONNX Runtime (static QDQ, or dynamic for Linear-only models).

The model is exported to fp32 ONNX by :func:`torchslim.export.export_onnx`
(eval mode, so BatchNorm is folded into the preceding convolution; the
parity check against PyTorch runs there), pre-processed by ONNX Runtime's
``quant_pre_process`` (shape inference and graph optimization, the step ORT
asks for before quantizing), then quantized by
``onnxruntime.quantization.quantize_static`` in the QDQ format with a
calibration reader over a calibration split. The result is an int8 ONNX file
and its accuracy is measured by running that file in ONNX Runtime: nothing here
simulates int8 in torch.

Data types follow ONNX Runtime's guidance for x86 CPUs: activations uint8 and
weights int8 (U8S8). Without VNNI, the u8*s8 multiply-add (``vpmaddubsw``) can
saturate its 16-bit intermediate sums, so weights use 7 bits
(``reduce_range=True``); with VNNI (``avx512_vnni`` / ``avx_vnni``) the full
range is safe. :func:`cpu_int8_profile` reads the instruction set from
``/proc/cpuinfo`` and says which rule applied.

Layers are picked by their torch names (``"classifier.0"``) or ``re:`` regexes,
as everywhere in torchslim; :func:`layer_node_map` maps them to the ONNX nodes
that ``nodes_to_exclude`` needs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field, field_validator

from torchslim.atomic import atomic_write_bytes
from torchslim.config import Config
from torchslim.errors import ConfigError, ExportError, ModelError
from torchslim.measure.counting import eval_mode
from torchslim.prune.selection import check_pattern, check_patterns_match, name_matches

_INSTALL_HINT = "int8 quantization needs onnx and onnxruntime: pip install torchslim[onnx]"
#: torch layer types ONNX Runtime quantizes (a Conv2d becomes Conv, a Linear Gemm or MatMul).
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_ONNX_LAYER_OPS = ("Conv", "Gemm", "MatMul")


class Int8Config(Config):
    """Int8 post-training quantization in ONNX Runtime.

    Attributes:
        mode: ``static`` (activations and weights int8, activation ranges calibrated
            on data; QDQ format) or ``dynamic`` (weights int8, activation ranges
            computed at run time; only for Linear-only models: dynamic convs run as
            ConvInteger, slow and often inaccurate).
        calibration: how activation ranges are chosen from the calibration data:
            ``minmax`` (the observed range), ``percentile`` (clip at ``percentile``
            of the absolute values) or ``entropy`` (the range minimizing the KL
            divergence of the quantized histogram).
        percentile: the percentile for ``calibration: percentile``.
        calibration_samples: calibration inputs (a seeded random subset of the split).
        calibration_batch_size: inputs per calibration run.
        per_channel: one weight scale per output channel (else per tensor).
        activation_type: ``auto`` (from the CPU, see :func:`cpu_int8_profile`), ``uint8`` or ``int8``.
        weight_type: ``auto``, ``int8`` or ``uint8``.
        reduce_range: 7-bit weights; ``auto`` turns it on for x86 CPUs without VNNI.
        exclude: layers kept float, by torch name or ``re:`` regex (``"classifier.3"``,
            ``"re:features\\\\.0"``); a pattern that matches no Conv/Linear layer is an error.
        opset: ONNX opset of the fp32 export (None: the exporter's default; QDQ per-channel needs >= 13).

    Example:
        >>> import torchslim as ts
        >>> ts.quant.Int8Config(calibration="percentile", exclude=["classifier.3"]).calibration
        'percentile'
    """

    mode: Literal["static", "dynamic"] = "static"
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(99.999, gt=50.0, le=100.0)
    calibration_samples: int = Field(512, ge=1, le=1_000_000)
    calibration_batch_size: int = Field(64, ge=1, le=65536)
    per_channel: bool = False
    activation_type: Literal["auto", "uint8", "int8"] = "auto"
    weight_type: Literal["auto", "int8", "uint8"] = "auto"
    reduce_range: bool | Literal["auto"] = "auto"
    exclude: tuple[str, ...] = ()
    opset: int | None = Field(None, ge=13, le=30)

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                check_pattern(pattern)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


# ----------------------------------------------------------------- the CPU
def cpu_int8_profile(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any]:
    """The int8 data types ONNX Runtime's guidance picks for this CPU, and why.

    Args:
        cpuinfo: the file listing the CPU's ``flags`` (Linux); elsewhere the machine
            type alone decides.

    Returns:
        ``{"isa", "activation_type", "weight_type", "reduce_range", "why"}``; ``isa``
        is ``avx512_vnni``, ``avx_vnni``, ``avx512``, ``avx2``, ``x86`` or the machine name.

    Example:
        >>> cpu_int8_profile()["activation_type"]  # doctest: +SKIP
        'uint8'
    """
    flags: set[str] = set()
    try:
        for line in Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    machine = platform.machine().lower()
    x86 = machine in ("x86_64", "amd64", "i386", "i686") or "avx2" in flags or "sse2" in flags
    if not x86:
        return {"isa": machine or "unknown", "activation_type": "uint8", "weight_type": "int8", "reduce_range": False,
                "why": f"{machine or 'this'} CPU is not x86: ONNX Runtime's U8S8 kernels have no 16-bit saturation "
                       "here, so weights keep their full 8 bits"}
    for isa in ("avx512_vnni", "avx_vnni"):
        if isa in flags:
            return {"isa": isa, "activation_type": "uint8", "weight_type": "int8", "reduce_range": False,
                    "why": f"x86 with {isa}: VNNI multiplies u8 by s8 into 32-bit sums without saturating, "
                           "so U8S8 with full-range (8-bit) weights"}
    isa = "avx512" if "avx512bw" in flags else "avx2" if "avx2" in flags else "x86"
    return {"isa": isa, "activation_type": "uint8", "weight_type": "int8", "reduce_range": True,
            "why": f"x86 with {isa} but no VNNI: the u8*s8 multiply-add (vpmaddubsw) can saturate its 16-bit "
                   "sums, so U8S8 with 7-bit weights (reduce_range), ONNX Runtime's guidance for this CPU"}


def resolved_types(config: Int8Config, cpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """The activation/weight types and ``reduce_range`` a config gets on this CPU, with the reason."""
    cpu = cpu or cpu_int8_profile()
    chosen = {
        "activation_type": cpu["activation_type"] if config.activation_type == "auto" else config.activation_type,
        "weight_type": cpu["weight_type"] if config.weight_type == "auto" else config.weight_type,
        "reduce_range": cpu["reduce_range"] if config.reduce_range == "auto" else config.reduce_range,
    }
    auto = [k for k in ("activation_type", "weight_type", "reduce_range") if getattr(config, k) == "auto"]
    why = cpu["why"] if auto else "set in the config"
    if auto and len(auto) < 3:
        why = f"{', '.join(auto)} from the CPU ({cpu['why']}); the rest set in the config"
    short = {"uint8": "U", "int8": "S"}
    return {**chosen, "scheme": short[chosen["activation_type"]] + "8" + short[chosen["weight_type"]] + "8",
            "isa": cpu["isa"], "why": why}


# ----------------------------------------------------------------- layers
def quantizable_layers(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The Conv/Linear layers of ``model`` in the order its forward pass runs them (one pass on ``example``)."""
    order: list[str] = []
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}
    hooks = [m.register_forward_pre_hook(lambda mod, _inp: order.append(names[id(mod)]))
             for m in model.modules() if id(m) in names]
    param = next(model.parameters(), None)
    try:
        with eval_mode(model), torch.no_grad():  # eval: BatchNorm statistics stay as they are
            model(example[:1].to(param.device if param is not None else "cpu"))
    finally:
        for h in hooks:
            h.remove()
    if len(order) != len(set(order)):
        twice = sorted({n for n in order if order.count(n) > 1})
        raise ModelError(f"layers {', '.join(twice)} run more than once per forward pass; int8 layer selection "
                         "needs each Conv/Linear to appear once in the ONNX graph")
    modules = dict(model.named_modules())
    return [(n, modules[n]) for n in order]


def _onnx_layer_nodes(proto: Any) -> list[tuple[str, tuple[int, ...], str, bool]]:
    """(name, weight shape, op, transposed) of Conv/Gemm/MatMul nodes with a constant weight, in graph order."""
    from onnx import numpy_helper  # noqa: PLC0415

    inits = {i.name: tuple(numpy_helper.to_array(i).shape) for i in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        if node.op_type not in _ONNX_LAYER_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        trans = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        out.append((node.name, inits[node.input[1]], node.op_type, trans))
    return out


def layer_node_map(model: nn.Module, example: torch.Tensor, proto: Any) -> dict[str, str]:
    """``{torch layer name: ONNX node name}`` for every Conv/Linear of ``model`` in its exported graph.

    Matched in execution order and checked by weight shape (a Linear's ``(out, in)``
    weight is ``(in, out)`` in a MatMul or a Gemm without ``transB``).

    Raises:
        ModelError: the graph's layers do not line up with the model's.
    """
    layers = quantizable_layers(model, example)
    nodes = _onnx_layer_nodes(proto)
    if len(layers) != len(nodes):
        raise ModelError(f"the model runs {len(layers)} Conv/Linear layers but its ONNX graph has {len(nodes)} "
                         "Conv/Gemm/MatMul nodes with constant weights; cannot map layer names to ONNX nodes")
    mapping = {}
    for (name, module), (node, shape, op, trans) in zip(layers, nodes):
        w = tuple(module.weight.shape)
        expected = w if op == "Conv" or trans else (w[1], w[0])
        if shape != expected:
            raise ModelError(f"layer {name!r} (weight {w}) does not line up with ONNX node {node!r} ({op}, weight "
                             f"{shape}); cannot map layer names to ONNX nodes")
        mapping[name] = node
    return mapping


def _has_conv(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _CONV)]


def check_int8(model: nn.Module, config: Int8Config, example: torch.Tensor | None = None) -> list[str]:
    """Check ``config`` against ``model`` before any work; returns the torch names of the excluded layers.

    Raises:
        ConfigError: dynamic mode on a model with convolutions, or an ``exclude``
            pattern that names no Conv/Linear layer.
        ExportError: onnx or onnxruntime is missing.
    """
    try:
        import onnx  # noqa: F401, PLC0415
        import onnxruntime  # noqa: F401, PLC0415
        import onnxruntime.quantization  # noqa: F401, PLC0415
    except ImportError as exc:
        raise ExportError(_INSTALL_HINT) from exc
    if config.mode == "dynamic":
        convs = _has_conv(model)
        if convs:
            raise ConfigError(f"mode: dynamic int8 is for Linear-only models; this one has convolutions "
                              f"({', '.join(convs[:4])}{', ...' if len(convs) > 4 else ''}), which dynamic "
                              "quantization runs as ConvInteger (slow, often inaccurate): use mode: static")
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    check_patterns_match(names, config.exclude, "exclude", what="Conv/Linear layer")
    return [n for n in names if any(name_matches(n, p) for p in config.exclude)]


# ----------------------------------------------------------------- calibration
def _calibration_inputs(calib: Any, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` inputs (a seeded random subset, so a class-sorted split still calibrates on every class)."""
    x = calib.x if hasattr(calib, "x") else calib
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) == 0:
        raise ModelError("calib must be a split with inputs .x, or a tensor of inputs with the batch first")
    if len(x) > n:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]
    return x.detach().cpu().float()


def _reader(x: torch.Tensor, input_name: str, batch_size: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415

    class _Reader(CalibrationDataReader):
        """Feeds the calibration inputs batch by batch (ONNX Runtime's calibrators pull from it)."""

        def __init__(self) -> None:
            self.batches = iter([x[i:i + batch_size].numpy() for i in range(0, len(x), batch_size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    return _Reader()


# ----------------------------------------------------------------- the result
@dataclasses.dataclass
class QuantizedModel:
    """An int8 ONNX model, the fp32 ONNX it came from, and what was done.

    Evaluate and time it in ONNX Runtime: :meth:`evaluate`, and
    :func:`torchslim.measure.compare_ort_latency` on ``{"fp32": q.fp32_onnx, "int8": q.int8_onnx}``.

    Attributes:
        int8_onnx: the int8 model's ONNX bytes.
        fp32_onnx: the fp32 export's ONNX bytes (BatchNorm folded).
        config: the config used.
        types: activation/weight types, ``reduce_range``, the scheme (``U8S8``) and why.
        layers: ``{torch layer name: ONNX node name}``.
        excluded: torch names of the layers kept float.
        calibration_samples: inputs calibrated on (0 for dynamic).
        export: the fp32 export's info (parity with PyTorch, opset, exporter).
        bn_folded: whether the quantized graph has no BatchNormalization left.
        int8_path: where the int8 file was written (``workdir``), else None.
        fp32_path: where the fp32 file was written, else None.
        moved: ONNX ``Relu``/``MaxPool`` nodes after float layers computed as pool-then-ReLU
            in the int8 file, so the int8 boundary follows the pool (:func:`pool_before_relu`).
    """

    int8_onnx: bytes
    fp32_onnx: bytes
    config: Int8Config
    types: dict[str, Any]
    layers: dict[str, str]
    excluded: list[str]
    calibration_samples: int
    export: dict[str, Any]
    bn_folded: bool
    int8_path: Path | None = None
    fp32_path: Path | None = None
    moved: list[str] = dataclasses.field(default_factory=list)

    @property
    def int8_bytes(self) -> int:
        """Size of the int8 ONNX file in bytes."""
        return len(self.int8_onnx)

    @property
    def fp32_bytes(self) -> int:
        """Size of the fp32 ONNX file in bytes."""
        return len(self.fp32_onnx)

    def evaluate(self, split: Any, *, precision: Literal["int8", "fp32"] = "int8", batch_size: int = 256,
                 threads: int | None = None) -> dict[str, Any]:
        """Top-1 accuracy of the int8 (or fp32) ONNX file run in ONNX Runtime on ``split``.

        Args:
            split: a split with ``.x`` and ``.y`` (e.g. ``splits.test``).
            precision: which file to run.
            batch_size: samples per run.
            threads: ONNX Runtime intra-op threads (None: ``torch.get_num_threads()``).

        Returns:
            ``{"accuracy", "samples", "precision", "runtime": "onnxruntime"}``.
        """
        from torchslim.measure.ort import ort_accuracy  # noqa: PLC0415

        model = self.int8_onnx if precision == "int8" else self.fp32_onnx
        acc = ort_accuracy(model, split.x, split.y, batch_size=batch_size, threads=threads)
        return {"accuracy": acc, "samples": len(split.y), "precision": precision, "runtime": "onnxruntime"}

    def export_onnx(self, path: str | os.PathLike, *, precision: Literal["int8", "fp32"] = "int8") -> Path:
        """Write the int8 (or fp32) ONNX file atomically; returns its path."""
        path = Path(path)
        atomic_write_bytes(path, self.int8_onnx if precision == "int8" else self.fp32_onnx)
        return path

    def describe(self) -> dict[str, Any]:
        """What a report says about this quantization (JSON-ready)."""
        c = self.config
        return {
            "mode": c.mode, "format": "QDQ" if c.mode == "static" else "dynamic (MatMulInteger)",
            "calibration": c.calibration if c.mode == "static" else None,
            "percentile": c.percentile if c.mode == "static" and c.calibration == "percentile" else None,
            "calibration_samples": self.calibration_samples,
            "per_channel": c.per_channel, "scheme": self.types["scheme"],
            "activation_type": self.types["activation_type"], "weight_type": self.types["weight_type"],
            "reduce_range": self.types["reduce_range"], "isa": self.types["isa"], "why": self.types["why"],
            "excluded": list(self.excluded), "int8_layers": [n for n in self.layers if n not in self.excluded],
            "bn_folded": self.bn_folded, "pool_before_relu": list(self.moved),
            "fp32_bytes": self.fp32_bytes, "int8_bytes": self.int8_bytes,
            "size_ratio": self.fp32_bytes / self.int8_bytes, "export_max_abs_diff": self.export.get("max_abs_diff"),
        }


def pool_before_relu(proto: Any, float_nodes: list[str]) -> list[str]:
    """Move a float layer's ``Relu -> MaxPool`` to ``MaxPool -> Relu``, so its int8 boundary follows the pool.

    When a layer kept float ends in ``Relu -> MaxPool`` and an int8 layer follows,
    ONNX Runtime's QDQ propagation pulls the boundary's QuantizeLinear above the
    MaxPool, which then runs on uint8 in NCHW layout: measured here on
    fmnist_student with its first conv float, that MaxPool alone took 15 ms of a
    24 ms batch of 256 (the float model: 10 ms). ``max(relu(x)) == relu(max(x))``
    exactly (ReLU is monotone), and with the pool before the ReLU the boundary
    starts at a node ORT does not propagate across; the ReLU then folds into the
    QuantizeLinear and the pool stays float, on a quarter of the values.

    Args:
        proto: the fp32 ``onnx.ModelProto``, changed in place.
        float_nodes: names of the Conv/Gemm/MatMul nodes kept float.

    Returns:
        The names of the ``Relu`` and ``MaxPool`` nodes moved (keep them float too).
    """
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer_index = {o: i for i, n in enumerate(graph.node) for o in n.output}
    moved: list[str] = []
    for layer in graph.node:
        if layer.name not in float_nodes or len(layer.output) != 1:
            continue
        after = consumers.get(layer.output[0], [])
        if len(after) != 1 or after[0].op_type != "Relu" or layer.output[0] in outputs:
            continue
        relu = after[0]
        nxt = consumers.get(relu.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "MaxPool" or len(nxt[0].output) != 1 or relu.output[0] in outputs:
            continue
        pool = nxt[0]
        names = [relu.name, pool.name]
        a, b, c = relu.input[0], relu.output[0], pool.output[0]
        pool.input[0], pool.output[0], relu.input[0], relu.output[0] = a, b, b, c
        i, j = producer_index[b], producer_index[c]  # keep the node list in topological order
        relu_copy, pool_copy = type(relu)(), type(pool)()
        relu_copy.CopyFrom(relu)
        pool_copy.CopyFrom(pool)
        graph.node[i].CopyFrom(pool_copy)
        graph.node[j].CopyFrom(relu_copy)
        stale = [v for v in graph.value_info if v.name == b]  # b now holds the pooled shape
        for v in stale:
            graph.value_info.remove(v)
        moved += names
    return moved


def _given_fp32(source: bytes | str | os.PathLike, dest: Path) -> dict[str, Any]:
    """Copy an fp32 export passed to :func:`quantize` to ``dest``, checking that ONNX can read it."""
    import onnx  # noqa: PLC0415

    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ModelError(f"fp32_onnx: cannot read {os.fspath(source)!r} ({exc}); pass the fp32 ONNX file "
                             "exported from this model, or leave fp32_onnx unset to export it here") from None
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not ONNX
        raise ModelError(f"fp32_onnx is not an ONNX model ({type(exc).__name__}: {exc}); pass the fp32 "
                         "ONNX file exported from this model, or leave fp32_onnx unset") from None
    if not proto.graph.node:
        raise ModelError("fp32_onnx has an empty graph; pass the fp32 ONNX file exported from this model")
    dest.write_bytes(data)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    # The parity check ran when that file was exported; it is not repeated here.
    return {"opset": opset, "bytes": len(data), "max_abs_diff": None, "exporter": "given (fp32_onnx)"}


# ----------------------------------------------------------------- the verb
def quantize(model: nn.Module, config: Int8Config | None = None, *, calib: Any = None,
             example: torch.Tensor | None = None, workdir: str | os.PathLike | None = None,
             normalization: dict[str, Any] | None = None,
             fp32_onnx: bytes | str | os.PathLike | None = None) -> QuantizedModel:
    """Quantize a model to int8 in ONNX Runtime; returns a new :class:`QuantizedModel` (``model`` is unchanged).

    Args:
        model: any ``nn.Module`` (masks are made permanent in the exported copy).
        config: how to quantize (default :class:`Int8Config()`: static, min-max, per tensor, types from the CPU).
        calib: the calibration split (``splits.train``: anything with ``.x``) or an input tensor;
            required for static mode.
        example: an input with the batch first, for the export (default: the first calibration inputs).
        workdir: also write ``model.fp32.onnx`` and ``model.int8.onnx`` here.
        normalization: ``{"mean", "std"}`` the model expects, recorded in the ONNX metadata.
        fp32_onnx: an fp32 ONNX export of ``model`` already made (bytes or a path, e.g. an
            earlier result's ``fp32_onnx``): used as it is instead of exporting again, so
            several quantizations of one model (the per-layer sweep) pay for one export.
            Its Conv/Gemm/MatMul nodes must line up with the model's layers; ``config.opset``
            and ``normalization`` are then those of the given file.

    Raises:
        ConfigError: a bad ``exclude`` pattern or dynamic mode on a model with convolutions.
        ModelError: no calibration data for static mode, layer names cannot be mapped,
            or ``fp32_onnx`` is not a readable ONNX model of ``model``.
        ExportError: onnx/onnxruntime missing or the export failed its parity check.

    Example:
        >>> import torch, torchslim as ts
        >>> model = ts.models.create("fmnist_student", width=4, fc=8)
        >>> q = ts.quant.quantize(model, ts.quant.Int8Config(calibration_samples=16), calib=torch.randn(32, 1, 28, 28))
        >>> q.int8_bytes < q.fp32_bytes
        True
    """
    config = config or Int8Config()
    if config.mode == "static" and calib is None:
        raise ModelError("static int8 needs calibration data: pass calib=splits.train (or mode='dynamic' for "
                         "Linear-only models)")
    if example is None:
        if calib is None:
            raise ModelError("pass example= (an input with the batch first) or calib=")
        example = _calibration_inputs(calib, 8)
    example = example.detach().cpu()
    excluded = check_int8(model, config, example)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static  # noqa: PLC0415
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415
    import onnx  # noqa: PLC0415

    from torchslim.export import export_onnx  # noqa: PLC0415

    types = resolved_types(config)
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    float_model = copy.deepcopy(model).cpu().eval()
    with tempfile.TemporaryDirectory(prefix="torchslim-int8-") as tmp:
        fp32, pre, int8 = Path(tmp) / "model.fp32.onnx", Path(tmp) / "model.pre.onnx", Path(tmp) / "model.int8.onnx"
        if fp32_onnx is None:
            info = export_onnx(float_model, example[:8], fp32, opset=config.opset, normalization=normalization)
        else:
            info = _given_fp32(fp32_onnx, fp32)
        proto = onnx.load(os.fspath(fp32))
        layers = layer_node_map(float_model, example, proto)
        nodes_to_exclude = [layers[n] for n in excluded]
        moved: list[str] = []
        source = fp32
        if config.mode == "static" and nodes_to_exclude:
            moved = pool_before_relu(proto, nodes_to_exclude)
            if moved:
                source = Path(tmp) / "model.moved.onnx"
                onnx.save(proto, os.fspath(source))
                nodes_to_exclude += moved
        quant_pre_process(os.fspath(source), os.fspath(pre))
        if config.mode == "static":
            x = _calibration_inputs(calib, config.calibration_samples)
            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[config.calibration]
            extra: dict[str, Any] = {}
            if config.calibration == "percentile":
                extra["CalibPercentile"] = config.percentile
            quantize_static(os.fspath(pre), os.fspath(int8), _reader(x, proto.graph.input[0].name,
                                                                       config.calibration_batch_size),
                            quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
                            reduce_range=types["reduce_range"], activation_type=qtype[types["activation_type"]],
                            weight_type=qtype[types["weight_type"]], nodes_to_exclude=nodes_to_exclude,
                            calibrate_method=method, extra_options=extra)
            samples = len(x)
        else:
            quantize_dynamic(os.fspath(pre), os.fspath(int8), weight_type=qtype[types["weight_type"]],
                             per_channel=config.per_channel, reduce_range=types["reduce_range"],
                             nodes_to_exclude=nodes_to_exclude, op_types_to_quantize=["MatMul", "Gemm"])
            samples = 0
            # DynamicQuantizeLinear always makes uint8 activations
            types = {**types, "activation_type": "uint8", "scheme": "U8" + types["scheme"][2:]}
        q_proto = onnx.load(os.fspath(int8))
        bn_folded = not any(n.op_type == "BatchNormalization" for n in q_proto.graph.node)
        result = QuantizedModel(int8.read_bytes(), fp32.read_bytes(), config, types, layers, excluded, samples,
                                {k: v for k, v in info.items() if k != "path"}, bn_folded, moved=moved)
    if workdir is not None:
        folder = Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
        result.fp32_path = result.export_onnx(folder / "model.fp32.onnx", precision="fp32")
        result.int8_path = result.export_onnx(folder / "model.int8.onnx")
    return result
