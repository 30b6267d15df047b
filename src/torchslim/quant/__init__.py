"""Quantization: int8 in ONNX Runtime (post-training or QAT + KD), per-layer precision, weight sharing.

* :class:`Int8Config` + :func:`quantize`: static int8 in ONNX Runtime's QDQ format
  (BatchNorm folded; min-max / percentile / entropy calibration on a split;
  per-tensor or per-channel weights; U8S8 with ``reduce_range`` chosen from the
  CPU's instruction set; layers kept float by name or ``re:`` regex), or dynamic
  int8 for Linear-only models. The result, a :class:`QuantizedModel`, is an int8
  ONNX file whose accuracy is measured by running it in ONNX Runtime.

Example:
    >>> import torch, torchslim as ts
    >>> model = ts.models.create("fmnist_student", width=4, fc=8)
    >>> q = ts.quant.quantize(model, ts.quant.Int8Config(calibration_samples=16), calib=torch.randn(32, 1, 28, 28))
    >>> q.describe()["scheme"]
    'U8S8'
"""

from torchslim.quant.int8 import (
    Int8Config,
    QuantizedModel,
    check_int8,
    cpu_int8_profile,
    layer_node_map,
    quantizable_layers,
    quantize,
    resolved_types,
)

# quantization-aware training with distillation, and per-layer precision
from torchslim.quant.precision import int8_layer_sweep
from torchslim.quant.qat import QATConfig, QATModel, qat, qat_agreement

# weight sharing and packing (Deep Compression): sharing.py, huffman.py, pack.py
from torchslim.quant.pack import LayerPack, PackConfig, PackReport, pack
from torchslim.quant.unpack import read_packed
from torchslim.quant.sharing import (
    LayerCodebook,
    WeightSharing,
    check_sharing,
    codebooks,
    finalize_sharing_,
    is_shared,
    kmeans_1d,
    share_weights_,
    shared_layers,
    sharing_layers,
    sharing_summary,
)

__all__ = [
    "Int8Config",
    "QuantizedModel",
    "check_int8",
    "cpu_int8_profile",
    "layer_node_map",
    "quantizable_layers",
    "quantize",
    "resolved_types",
    "QATConfig", "QATModel", "int8_layer_sweep", "qat", "qat_agreement",
    # weight sharing and packing
    "LayerCodebook", "LayerPack", "PackConfig", "PackReport", "WeightSharing", "check_sharing", "codebooks",
    "finalize_sharing_", "is_shared", "kmeans_1d", "pack", "read_packed", "share_weights_", "shared_layers",
    "sharing_layers", "sharing_summary",
]
