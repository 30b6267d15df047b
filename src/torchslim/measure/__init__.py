"""Measuring models: parameters, nonzero, MACs, bytes, latency (torch and ONNX Runtime), accuracy.

:func:`profile` gathers everything into one :class:`Profile` (``print`` it for a
table); :func:`profile_file` does the same for a saved ``.slim`` file.

Example:
    >>> import torch, torchslim as ts
    >>> model = ts.models.create("fmnist_student", width=4, fc=8)
    >>> print(ts.measure.profile(model, torch.randn(1, 1, 28, 28), batch_sizes=(1,)))  # doctest: +SKIP
"""

from torchslim.measure.counting import count_macs, count_nonzero, count_parameters, dense_bytes
from torchslim.measure.latency import compare_latency, evaluate_accuracy, measure_latency
from torchslim.measure.ort import compare_ort_latency, ort_accuracy, ort_latency, ort_session
from torchslim.measure.profile import Profile, profile, profile_file

__all__ = [
    "Profile",
    "compare_latency",
    "compare_ort_latency",
    "count_macs",
    "count_nonzero",
    "count_parameters",
    "dense_bytes",
    "evaluate_accuracy",
    "measure_latency",
    "ort_accuracy",
    "ort_latency",
    "ort_session",
    "profile",
    "profile_file",
]
