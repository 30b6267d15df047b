"""Feature hooks and adapters for feature distillation (FitNets hints, attention transfer).

Layers are picked by module name as in ``model.named_modules()`` (``"features.3"``).
A forward hook keeps each named module's latest output; the objective reads it
after the forward pass. A module whose output a following in-place op modifies
(``ReLU(inplace=True)``) is seen after that op.
"""

from __future__ import annotations

import difflib
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchslim.errors import ModelError


def find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    """``model``'s submodule called ``name``; a :class:`ModelError` with close names if absent."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ModelError(f"the {role} has no layer named {name!r}.{hint} "
                     f"Layers are module names as in model.named_modules().")


class FeatureHooks:
    """Forward hooks that keep the latest output of named modules of one model.

    Args:
        model: the model to watch.
        names: module names.
        role: ``"student"`` or ``"teacher"``, for error messages.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], role: str):
        self.role = role
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(names):
            module = find_module(model, name, role)
            self._handles.append(module.register_forward_hook(self._keeper(name)))

    def _keeper(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise ModelError(f"{self.role} layer {name!r} returns {type(output).__name__}, not a tensor; "
                                 "pick a layer whose output is a feature tensor")
            self.outputs[name] = output
        return hook

    def take(self, name: str) -> torch.Tensor:
        """The output ``name`` produced in the last forward pass (a clear error if it did not run)."""
        if name not in self.outputs:
            raise ModelError(f"{self.role} layer {name!r} did not run in the forward pass, so it has no features")
        return self.outputs[name]

    def clear(self) -> None:
        self.outputs.clear()

    def remove(self) -> None:
        """Remove the hooks; the model is as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two ``(B, C, H, W)`` maps to the other's spatial size (2-D inputs pass)."""
    if student.dim() == 4 and teacher.dim() == 4 and student.shape[-2:] != teacher.shape[-2:]:
        size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
        if student.shape[-2:] != size:
            student = F.adaptive_avg_pool2d(student, size)
        if teacher.shape[-2:] != size:
            teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def make_adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], pair: str) -> nn.Module:
    """A module mapping student features to the teacher's channels: 1×1 conv, linear, or identity.

    Args:
        student_shape: one sample's student feature shape, ``(C, H, W)`` or ``(F,)``.
        teacher_shape: the teacher's, same rank.
        pair: ``"student_layer -> teacher_layer"``, for error messages.
    """
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (1, 3):
        raise ModelError(f"hint {pair}: cannot match student features of shape {student_shape} to teacher "
                         f"features of shape {teacher_shape}; pick two convolutional (C, H, W) layers or two "
                         "fully connected (F,) layers")
    if student_shape[0] == teacher_shape[0]:
        return nn.Identity()
    if len(student_shape) == 3:
        return nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False)
    return nn.Linear(student_shape[0], teacher_shape[0])
