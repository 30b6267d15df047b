"""Quantization-aware training with distillation (QAT + KD; NVIDIA ModelOpt calls it QAD).

:func:`qat` makes a copy of the model, folds every BatchNorm into the
convolution before it (in torch, so torch and ONNX Runtime see the same
weights), and makes each Conv/Linear compute as ONNX Runtime's int8 kernels
will:

* weights: per output channel, symmetric int8 (``torch.fake_quantize_per_channel_affine``;
  the scale follows the weight's largest magnitude);
* the layer's input and output: per tensor, uint8 asymmetric
  (``torch.fake_quantize_per_tensor_affine``), ranges first calibrated (min-max on
  ``calibration_samples`` inputs), then either tracked during training as an
  exponential moving average of each batch's min/max (``activation_ranges:
  observed``) or learned (``learned``: an LSQ-style trainable scale, its gradient
  through a straight-through estimator and scaled by ``1/sqrt(numel * 255)``);
* the bias: rounded to int32 with scale ``input scale × weight scale``, as the
  int8 kernels add it.

The fake quantization runs in the layer's own ``forward`` (an instance
attribute calling the layer's functional op), after its forward pre-hooks: a
pruning mask in :mod:`torchslim.core.masks` keeps working (pruned weights stay
exactly zero, and zero quantizes to zero). The copy is trained by
:func:`torchslim.train.fit` with :class:`torchslim.distill.DistillObjective`
and the float model as teacher. :func:`export_qat` then exports the float graph
(:func:`torchslim.export.export_onnx`) and writes QuantizeLinear/DequantizeLinear
nodes with the trained scales and zero points and the integers torch computed
(:func:`torchslim.quant.qdq.write_qdq`), so the int8 file is the fake-quant model.
:func:`qat_agreement` measures how close the two are.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
import types
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from torchslim.config import Config
from torchslim.core.masks import effective_weight, is_masked
from torchslim.distill import DistillConfig, DistillObjective
from torchslim.errors import ModelError
from torchslim.prune.selection import check_patterns_match, name_matches
from torchslim.quant.int8 import (Int8Config, QuantizedModel, _calibration_inputs, cpu_int8_profile, layer_node_map,
                                  pool_before_relu)
from torchslim.quant.qdq import quantizer_sites
from torchslim.train import TrainConfig, fit

#: the layer types QAT quantizes
QAT_LAYERS = (nn.Conv2d, nn.Linear)
_BN = (nn.BatchNorm2d,)


class QATConfig(Config):
    """Quantization-aware training (fake quantization in torch, int8 QDQ in ONNX Runtime).

    Attributes:
        activation_ranges: ``observed`` (EMA of each batch's min/max while training) or
            ``learned`` (LSQ: the scale is a trained parameter, the zero point stays as calibrated).
        ema_decay: weight of the old range in the moving average (``observed``).
        calibration_samples: training inputs the ranges are first calibrated on (min-max, float model).
        calibration_batch_size: inputs per calibration pass.
        quantize_outputs: also quantize each layer's output (uint8), as ONNX Runtime's int8
            Conv/Gemm kernels need to run fused; off leaves outputs float (slower in ONNX Runtime).
        reduce_range: 7-bit weights (``[-64, 64]``); ``auto`` from the CPU, as
            :func:`~torchslim.quant.cpu_int8_profile` says (off with VNNI).
        exclude: Conv/Linear layers kept float, by torch name or ``re:`` regex.
        distill: train with the float model (or the given teacher) as teacher; off trains on labels.
        objective: the distillation loss (:class:`~torchslim.distill.DistillConfig`; default Hinton KD).
        opset: ONNX opset of the export (None: the exporter's default; >= 13).

    Example:
        >>> import torchslim as ts
        >>> QATConfig(activation_ranges="learned", exclude=["classifier.2"]).activation_ranges
        'learned'
    """

    activation_ranges: Literal["observed", "learned"] = "observed"
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    calibration_samples: int = Field(512, ge=1, le=1_000_000)
    calibration_batch_size: int = Field(128, ge=1, le=65536)
    quantize_outputs: bool = True
    reduce_range: bool | Literal["auto"] = "auto"
    exclude: tuple[str, ...] = ()
    distill: bool = True
    objective: DistillConfig = Field(default_factory=DistillConfig)
    opset: int | None = Field(None, ge=13, le=30)

    _patterns = field_validator("exclude")(Int8Config._patterns.__func__)  # the same check as int8's


# ----------------------------------------------------------------- quantizers
def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class ActivationQuantizer(nn.Module):
    """Per-tensor uint8 asymmetric fake quantization with an observed or learned range.

    Its scale and zero point are what ONNX Runtime's ``QuantizeLinear`` gets. Ranges
    follow ONNX Runtime's rule: the range always holds 0, ``scale = (max - min) / 255``,
    ``zero_point = round(-min / scale)``.
    """

    def __init__(self, learned: bool, ema_decay: float):
        super().__init__()
        self.learned, self.ema_decay = learned, ema_decay
        self.calibrating = False  # pass-through, recording min/max
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        if learned:
            self.scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("scale", torch.tensor(1.0))

    @torch.no_grad()
    def set_range(self) -> None:
        """Scale and zero point from the recorded min/max."""
        lo = torch.clamp(self.min_val, max=0.0)
        hi = torch.clamp(self.max_val, min=0.0)
        if not torch.isfinite(lo) or not torch.isfinite(hi) or hi - lo <= 0:
            lo, hi = torch.tensor(0.0), torch.tensor(1.0)
        scale = (hi - lo) / 255.0
        self.scale.copy_(scale)
        self.zero_point.copy_(torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            with torch.no_grad():
                self.min_val.copy_(torch.minimum(self.min_val, x.detach().min()))
                self.max_val.copy_(torch.maximum(self.max_val, x.detach().max()))
            return x
        if self.training and not self.learned:
            with torch.no_grad():
                d = self.ema_decay
                self.min_val.mul_(d).add_((1 - d) * x.detach().min())
                self.max_val.mul_(d).add_((1 - d) * x.detach().max())
                self.set_range()
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantized and dequantized with the current scale and zero point (no observation)."""
        if self.learned and self.training:
            # LSQ: the scale's gradient scaled by 1/sqrt(numel * Qmax) so it moves as fast as the weights.
            g = 1.0 / math.sqrt(x[0].numel() * 255.0)
            s = self.scale.abs().clamp_min(1e-8)
            s = s * g + (s - s * g).detach()
            zp = self.zero_point.float()
            return (torch.clamp(_round_ste(x / s) + zp, 0, 255) - zp) * s
        scale = self.scale.detach().abs() if self.learned else self.scale
        return torch.fake_quantize_per_tensor_affine(x, scale, self.zero_point, 0, 255)


class TiedQuantizer(nn.Module):
    """A layer input that reuses an earlier quantizer's scale and zero point.

    Used when the input is that quantizer's output passed through ops that keep values on
    its grid (MaxPool, Flatten/Reshape, Identity, Dropout): ONNX Runtime then sees the same
    ``QuantizeLinear`` parameters on both sides and runs those ops in int8, with no
    requantization between the layers.
    """

    def __init__(self, source: ActivationQuantizer):
        super().__init__()
        object.__setattr__(self, "source", source)  # not a submodule: the source is observed once, where it is

    @property
    def calibrating(self) -> bool:
        return self.source.calibrating

    @property
    def scale(self) -> torch.Tensor:
        return self.source.scale

    @property
    def zero_point(self) -> torch.Tensor:
        return self.source.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.source.calibrating else self.source.fake_quant(x)


class _QuantizeOutput:
    """Forward hook of a ReLU that carries the output quantizer of the layer before it."""

    def __init__(self, quantizer: ActivationQuantizer):
        self.quantizer = quantizer

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return self.quantizer(output)


def _weight_scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    amax = w.detach().abs().flatten(1).amax(1)
    return (torch.clamp(amax, min=1e-8) / qmax).float()


def _quantized_parts(module: nn.Module,
                     x_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(fake-quant weight, fake-quant bias or None, per-channel weight scale) of a prepared layer."""
    qmax = module.qat_qmax
    w = effective_weight(module) if is_masked(module) else module.weight
    scale = _weight_scale(w, qmax)
    zeros = torch.zeros(len(scale), dtype=torch.int32, device=w.device)
    wq = torch.fake_quantize_per_channel_affine(w, scale, zeros, 0, -qmax, qmax)
    b = module.bias
    if b is None:
        return wq, None, scale
    # The int8 kernels add the bias as int32 on the scale of their sums: round it there too.
    b_scale = (x_scale.detach().abs() * scale).float()
    bq = b + (torch.round(b / b_scale) * b_scale - b).detach()
    return wq, bq, scale


def _qat_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a prepared Conv2d/Linear: quantized input, weight, bias (and output)."""
    xq = self.qat_input(x)
    if self.qat_input.calibrating:  # ranges first, on the float model
        w, b = (effective_weight(self) if is_masked(self) else self.weight), self.bias
    else:
        w, b, _ = _quantized_parts(self, self.qat_input.scale)
    y = self._conv_forward(xq, w, b) if isinstance(self, nn.Conv2d) else F.linear(xq, w, b)
    return self.qat_output(y) if self.qat_output is not None and not self.qat_after_relu else y


# ----------------------------------------------------------------- preparing
def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with each ``BatchNorm2d`` that directly follows a ``Conv2d`` folded into it.

    Pairs are found by tracing (``torch.fx``); when the model does not trace, adjacent
    pairs inside ``nn.Sequential`` containers. The conv's weight (``weight_orig`` when
    masked: the mask is kept) is scaled per output channel, its bias set, and the
    BatchNorm replaced by ``nn.Identity``. Returns the copy and the folded BatchNorms' names.
    """
    _detach_masked_weights(model)
    model = copy.deepcopy(model).cpu().eval()
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    try:
        graph = torch.fx.symbolic_trace(model).graph
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(node.target), _BN):
                src = node.args[0] if node.args else None
                if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                        and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1):
                    pairs.append((src.target, node.target))
    except Exception:  # noqa: BLE001 - an untraceable model still folds its Sequential pairs
        for name, seq in model.named_modules():
            if isinstance(seq, nn.Sequential):
                kids = list(seq.named_children())
                for (a, ma), (b, mb) in zip(kids, kids[1:]):
                    if isinstance(ma, nn.Conv2d) and isinstance(mb, _BN):
                        pairs.append((f"{name}.{a}" if name else a, f"{name}.{b}" if name else b))
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        if bn.running_var is None:
            raise ModelError(f"BatchNorm {bn_name!r} keeps no running statistics: it cannot be folded for QAT")
        with torch.no_grad():
            factor = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                factor = factor * bn.weight
            target = conv.weight_orig if is_masked(conv) else conv.weight
            target.mul_(factor.view(-1, *([1] * (target.dim() - 1))))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            bias = (bias - bn.running_mean) * factor + (bn.bias if bn.bias is not None else 0.0)
            if conv.bias is None:
                conv.bias = nn.Parameter(bias.clone())
            else:
                conv.bias.copy_(bias)
            if is_masked(conv):
                conv.weight = conv.weight_orig * conv.weight_mask
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        folded.append(bn_name)
    return model, folded


def _reduce_range(config: QATConfig) -> bool:
    return cpu_int8_profile()["reduce_range"] if config.reduce_range == "auto" else bool(config.reduce_range)


def qat_layers(model: nn.Module, config: QATConfig) -> list[str]:
    """Names of the Conv2d/Linear layers ``config`` quantizes (``exclude`` checked against the model)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QAT_LAYERS)]
    check_patterns_match(names, config.exclude, "exclude", what="Conv2d/Linear layer")
    return [n for n in names if not any(name_matches(n, p) for p in config.exclude)]


def prepare_qat(model: nn.Module, config: QATConfig | None = None, *, calib: Any) -> nn.Module:
    """A fake-quant copy of ``model`` (BatchNorm folded, ranges calibrated), ready for :func:`~torchslim.train.fit`.

    Args:
        model: the float model (unchanged).
        config: the QAT settings.
        calib: the split (``.x``) or input tensor the ranges are calibrated on.

    Returns:
        The copy, in eval mode on the CPU; each quantized layer has ``qat_input`` and
        (with ``quantize_outputs``) ``qat_output`` submodules.
    """
    config = config or QATConfig()
    names = qat_layers(model, config)
    qmodel, folded = fold_batchnorm(model)
    qmodel.qat_folded = folded
    qmax = 64 if _reduce_range(config) else 127
    modules = dict(qmodel.named_modules())
    learned = config.activation_ranges == "learned"
    after_relu, tied = quantizer_sites(qmodel, names) if config.quantize_outputs else ({}, {})
    for name in names:
        m = modules[name]
        m.qat_qmax = qmax
        m.qat_output = ActivationQuantizer(learned, config.ema_decay) if config.quantize_outputs else None
        m.qat_after_relu = name in after_relu
        if name in after_relu:
            modules[after_relu[name]].register_forward_hook(_QuantizeOutput(m.qat_output))
        m.forward = types.MethodType(_qat_forward, m)  # after the layer's pre-hooks (masks), like forward
    for name in names:  # inputs last: a tied input needs its source's quantizer
        m = modules[name]
        m.qat_input = (TiedQuantizer(modules[tied[name]].qat_output) if name in tied
                       else ActivationQuantizer(learned, config.ema_decay))
    quantizers = [q for q in qmodel.modules() if isinstance(q, ActivationQuantizer)]
    x = _calibration_inputs(calib, config.calibration_samples)
    for q in quantizers:
        q.calibrating = True
    try:
        with torch.no_grad():
            for i in range(0, len(x), config.calibration_batch_size):
                qmodel(x[i:i + config.calibration_batch_size])
    finally:
        for q in quantizers:
            q.calibrating = False
    for q in quantizers:
        q.set_range()
    return qmodel


def is_qat(model: nn.Module) -> bool:
    """Whether ``model`` was made by :func:`prepare_qat`."""
    return any(isinstance(m, ActivationQuantizer) for m in model.modules())


# ----------------------------------------------------------------- export
@torch.no_grad()
def _detach_masked_weights(model: nn.Module) -> None:
    # A masked layer's ``weight`` is recomputed by its pre-hook at every forward; after a
    # training step it still holds that step's graph, which deepcopy refuses to copy.
    for m in model.modules():
        if is_masked(m):
            m.weight = m.weight_orig * m.weight_mask


def _float_copy(qmodel: nn.Module) -> nn.Module:
    """The trained weights in a plain float model (quantizers removed, masks made permanent)."""
    from torchslim.core.masks import finalize_  # noqa: PLC0415

    _detach_masked_weights(qmodel)
    plain = copy.deepcopy(qmodel).cpu().eval()
    for m in plain.modules():
        for key, hook in list(m._forward_hooks.items()):
            if isinstance(hook, _QuantizeOutput):
                del m._forward_hooks[key]
        if hasattr(m, "qat_input"):
            del m.forward
            del m.qat_input
            if "qat_output" in m._modules:
                del m._modules["qat_output"]
            else:
                m.__dict__.pop("qat_output", None)
    finalize_(plain)
    return plain


@torch.no_grad()
def qdq_params(qmodel: nn.Module) -> dict[str, dict[str, Any]]:
    """``{torch layer name: scales, zero points and integers}`` of every quantized layer (numpy values)."""
    out = {}
    for name, m in qmodel.named_modules():
        if not hasattr(m, "qat_input"):
            continue
        x_scale = m.qat_input.scale.detach().abs().float()
        wq, bq, w_scale = _quantized_parts(m, x_scale)
        w_int = torch.round(wq / w_scale.view(-1, *([1] * (wq.dim() - 1)))).to(torch.int8)
        p = {"x_scale": x_scale.numpy(), "x_zero_point": m.qat_input.zero_point.numpy().astype("uint8"),
             "w_int8": w_int.numpy(), "w_scale": w_scale.numpy(), "b_int32": None, "y_scale": None,
             "y_zero_point": None}
        if bq is not None:
            p["b_int32"] = torch.round(bq / (x_scale * w_scale)).to(torch.int32).numpy()
        if m.qat_output is not None:
            p["y_after_relu"] = m.qat_after_relu
            p["y_scale"] = m.qat_output.scale.detach().abs().float().numpy()
            p["y_zero_point"] = m.qat_output.zero_point.numpy().astype("uint8")
        out[name] = p
    return out


@dataclasses.dataclass
class QATModel(QuantizedModel):
    """A :class:`~torchslim.quant.QuantizedModel` made by QAT, with its fake-quant torch model.

    Attributes:
        fake_quant: the trained fake-quant torch model (what the int8 file computes).
        history: the training records (one per epoch).
        folded: names of the BatchNorms folded before training.
    """

    fake_quant: nn.Module | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    folded: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """What a report says about this quantization (JSON-ready; the keys of ``QuantizedModel.describe``)."""
        c = self.config
        return {
            "mode": "qat", "format": "QDQ (scales from training)", "calibration": c.activation_ranges,
            "percentile": None, "calibration_samples": self.calibration_samples, "per_channel": True,
            "scheme": self.types["scheme"], "activation_type": "uint8", "weight_type": "int8",
            "reduce_range": self.types["reduce_range"], "isa": self.types["isa"], "why": self.types["why"],
            "excluded": list(self.excluded), "int8_layers": [n for n in self.layers if n not in self.excluded],
            "bn_folded": self.bn_folded, "pool_before_relu": list(self.moved),
            "fp32_bytes": self.fp32_bytes, "int8_bytes": self.int8_bytes,
            "size_ratio": self.fp32_bytes / self.int8_bytes, "export_max_abs_diff": self.export.get("max_abs_diff"),
            "epochs": len(self.history), "distilled": c.distill, "quantize_outputs": c.quantize_outputs,
        }


def export_qat(qmodel: nn.Module, config: QATConfig, example: torch.Tensor, *,
               normalization: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None) -> QATModel:
    """The int8 QDQ ONNX file of a trained fake-quant model (and its float graph).

    Args:
        qmodel: a model from :func:`prepare_qat` (trained or not).
        config: the config it was prepared with.
        example: an input with the batch first.
        normalization: ``{"mean", "std"}``, recorded in the ONNX metadata.
        history: training records to keep in the result.
    """
    import onnx  # noqa: PLC0415

    from torchslim.export import export_onnx  # noqa: PLC0415
    from torchslim.quant.qdq import write_qdq  # noqa: PLC0415

    qmodel = qmodel.cpu().eval()
    example = example.detach().cpu()
    plain = _float_copy(qmodel)
    params = qdq_params(qmodel)
    with tempfile.TemporaryDirectory(prefix="torchslim-qat-") as tmp:
        fp32 = Path(tmp) / "model.fp32.onnx"
        info = export_onnx(plain, example[:8], fp32, opset=config.opset, normalization=normalization)
        proto = onnx.load(os.fspath(fp32))
        layers = layer_node_map(plain, example, proto)
        # As in quantize(): a float layer's Relu -> MaxPool becomes MaxPool -> Relu, so ONNX Runtime
        # does not pull the next layer's QuantizeLinear above the pool into a slow uint8 MaxPool.
        moved = pool_before_relu(proto, [layers[n] for n in layers if n not in params])
        int8 = write_qdq(proto, {layers[n]: p for n, p in params.items()})
        fp32_bytes = fp32.read_bytes()
    reduce = _reduce_range(config)
    cpu = cpu_int8_profile()
    why = (cpu["why"] if config.reduce_range == "auto" else "reduce_range set in the config") + \
        "; weight scales per channel and activation scales from quantization-aware training"
    types_ = {"activation_type": "uint8", "weight_type": "int8", "reduce_range": reduce, "scheme": "U8S8",
              "isa": cpu["isa"], "why": why}
    excluded = [n for n in layers if n not in params]
    return QATModel(int8.SerializeToString(), fp32_bytes, config, types_, layers, excluded,  # type: ignore[arg-type]
                    min(config.calibration_samples, 10**9), {k: v for k, v in info.items() if k != "path"},
                    not any(n.op_type == "BatchNormalization" for n in int8.graph.node),
                    moved=moved, fake_quant=qmodel, history=list(history or []),
                    folded=list(getattr(qmodel, "qat_folded", [])))


# ----------------------------------------------------------------- the verb
def qat(model: nn.Module, train: Any, config: QATConfig | None = None, train_config: TrainConfig | None = None, *,
        teacher: nn.Module | None = None, val: Any = None, example: torch.Tensor | None = None, seed: int = 0,
        device: str | torch.device = "cpu", checkpoint_path: str | os.PathLike | None = None,
        normalization: dict[str, Any] | None = None, progress: bool | None = False) -> QATModel:
    """Quantization-aware training with distillation; returns the int8 model (``model`` is unchanged).

    Args:
        model: the trained float model.
        train: the training split (``.x``, ``.y``); ranges are calibrated on it.
        config: QAT settings (default :class:`QATConfig()`: observed ranges, Hinton KD).
        train_config: how to train (default one epoch, Adam at 1e-4: QAT fine-tunes).
        teacher: the teacher (default: a copy of the float ``model``), unless ``config.distill`` is off.
        val: split evaluated after every epoch (the fake-quant model).
        example: an input for the export (default: the first training inputs).
        seed: batch order.
        device: where to train.
        checkpoint_path: checkpoint (and resume) file of the training.
        normalization: ``{"mean", "std"}``, recorded in the ONNX metadata.
        progress: show a progress bar.

    Returns:
        A :class:`QATModel`: its ``int8_onnx`` runs in ONNX Runtime as ``fake_quant`` runs in torch
        (see :func:`qat_agreement`).

    Example:
        >>> import torch, types, torchslim as ts
        >>> from torchslim.quant.qat import QATConfig, qat, qat_agreement
        >>> model = ts.models.create("fmnist_student", width=4, fc=8, input_size=8)
        >>> data = types.SimpleNamespace(x=torch.randn(64, 1, 8, 8), y=torch.randint(0, 10, (64,)))
        >>> q = qat(model, data, QATConfig(calibration_samples=32), ts.TrainConfig(epochs=1, batch_size=32))
        >>> qat_agreement(q, data)["agreement"] >= 0.995  # ONNX Runtime int8 vs the fake-quant torch model
        True
    """
    config = config or QATConfig()
    train_config = train_config or TrainConfig(epochs=1, lr=1e-4)
    qmodel = prepare_qat(model, config, calib=train).to(device)
    kwargs = dict(val=val, seed=seed, device=device, checkpoint_path=checkpoint_path, stage="qat", progress=progress)
    if config.distill:
        if teacher is None:
            _detach_masked_weights(model)
            teacher = copy.deepcopy(model)
        teacher = teacher.to(device).eval()
        with DistillObjective(qmodel, teacher, config.objective, example=train.x[:2].to(device),
                              label_smoothing=train_config.label_smoothing) as loss:
            history = fit(qmodel, train, train_config, objective=loss, **kwargs)
    else:
        history = fit(qmodel, train, train_config, **kwargs)
    example = train.x[:8] if example is None else example
    return export_qat(qmodel, config, example, normalization=normalization, history=history)


@torch.no_grad()
def qat_agreement(result: QATModel, split: Any, *, batch_size: int = 256, threads: int | None = None) -> dict[str, Any]:
    """How closely the int8 file in ONNX Runtime follows the fake-quant torch model on ``split``.

    Returns:
        ``{"agreement" (fraction of equal top-1), "max_logit_diff", "mean_logit_diff",
        "ort_accuracy", "torch_accuracy", "samples"}``.
    """
    from torchslim.measure.ort import ort_session  # noqa: PLC0415

    session = ort_session(result.int8_onnx, threads=threads)
    name = session.get_inputs()[0].name
    model = result.fake_quant.cpu().eval()
    x, y = split.x, split.y
    same, max_diff, sum_diff, correct_ort, correct_torch = 0, 0.0, 0.0, 0, 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].float()
        ort = torch.from_numpy(session.run(None, {name: xb.numpy()})[0])
        ref = model(xb)
        diff = (ort - ref).abs()
        max_diff = max(max_diff, diff.max().item())
        sum_diff += diff.mean(1).sum().item()
        same += (ort.argmax(1) == ref.argmax(1)).sum().item()
        correct_ort += (ort.argmax(1) == y[i:i + batch_size]).sum().item()
        correct_torch += (ref.argmax(1) == y[i:i + batch_size]).sum().item()
    n = len(x)
    return {"agreement": same / n, "max_logit_diff": max_diff, "mean_logit_diff": sum_diff / n,
            "ort_accuracy": correct_ort / n, "torch_accuracy": correct_torch / n, "samples": n}
