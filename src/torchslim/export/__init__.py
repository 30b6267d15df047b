"""Saving, loading and exporting models.

* :func:`save` / :func:`load` / :func:`read_metadata`: the ``.slim`` file, one
  safetensors file with the architecture spec and transform log as JSON; masks
  kept, sparse tensors stored sparsely, never pickled (see :mod:`torchslim.export.slim`).
* :func:`export_onnx`: ONNX with a dynamic batch and an onnxruntime parity check
  (needs ``pip install torchslim[onnx]``).

Example:
    >>> import torch, torchslim as ts
    >>> model = ts.models.create("fmnist_student", width=4, fc=8)
    >>> ts.export.save(model, "/tmp/student.slim")
    PosixPath('/tmp/student.slim')
    >>> same = ts.export.load("/tmp/student.slim")
"""

from torchslim.export.onnx_export import export_onnx, read_onnx_metadata
from torchslim.export.slim import (
    FORMAT,
    MAX_INPUT_ELEMENTS,
    VERSION,
    check_input_shape,
    check_normalization,
    effective_state,
    load,
    read_metadata,
    save,
)

__all__ = [
    "FORMAT",
    "MAX_INPUT_ELEMENTS",
    "VERSION",
    "check_input_shape",
    "check_normalization",
    "effective_state",
    "export_onnx",
    "load",
    "read_metadata",
    "read_onnx_metadata",
    "save",
]
