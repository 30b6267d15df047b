"""Students from teachers: ``derive_student`` builds a narrower twin of a teacher's architecture."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn

from torchslim.errors import ModelError
from torchslim.models.registry import SPEC_ATTR, build_from_spec, get_preset, get_spec


def derive_student(teacher: nn.Module, width: float = 0.5, *, width_args: Sequence[str] | None = None,
                   init: Literal["random", "teacher"] = "random") -> nn.Module:
    """A narrower twin of ``teacher``: the same preset (or factory) with its width arguments scaled.

    Every width argument (channels, hidden units) becomes ``max(1, round(value · width))``;
    every other argument (classes, input size, dropout) is kept. ``width=0.5`` roughly
    quarters the parameters of conv and fully connected stacks. The student's spec
    records its own arguments, so it saves and reloads like any zoo model.

    Args:
        teacher: a model built by :func:`torchslim.models.create` or
            :func:`~torchslim.models.create_from_factory` (it carries ``torchslim_spec``).
        width: scale factor, 0 < width <= 1.
        width_args: the arguments to scale; default the preset's declared ``width_args``.
            Required for a user factory (``{"factory": ...}`` spec).
        init: ``random`` (a fresh initialisation from the global RNG) or ``teacher``: every
            tensor starts as the leading slice of the teacher's (the first channels and
            units), which keeps connected layers consistent in these presets' layouts.

    Returns:
        The student, in training mode, with ``torchslim_spec`` set.

    Raises:
        ModelError: the teacher has no spec, the preset declares no width arguments, a
            width argument is not an integer, or ``init="teacher"`` finds a tensor the
            student does not have or that is wider than the teacher's.

    Example:
        >>> import torchslim as ts
        >>> teacher = ts.models.create("fmnist_teacher")
        >>> from torchslim.distill import derive_student
        >>> student = derive_student(teacher, width=0.5)
        >>> student.torchslim_spec["args"]["width"], student.torchslim_spec["args"]["fc"]
        (16, 256)
    """
    if not 0.0 < width <= 1.0:
        raise ModelError(f"derive_student: width must be in (0, 1], got {width!r}")
    if init not in ("random", "teacher"):
        raise ModelError(f"derive_student: init must be 'random' or 'teacher', got {init!r}")
    spec = get_spec(teacher)
    if spec is None:
        raise ModelError("derive_student needs a teacher built by torchslim.models.create or create_from_factory "
                         f"(it reads the architecture from {SPEC_ATTR}); build this student yourself")
    label = f"preset {spec['preset']!r}" if "preset" in spec else f"factory {spec.get('factory')!r}"
    if width_args is None:
        if "preset" not in spec:
            raise ModelError(f"derive_student: {label} is not a preset; name its width arguments with width_args=")
        width_args = get_preset(spec["preset"]).width_args
        if not width_args:
            raise ModelError(f"derive_student: {label} declares no width arguments; register it with "
                             "@register_preset(width_args=(...)) or pass width_args=")
    args = dict(spec.get("args", {}))
    for name in width_args:
        value = args.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelError(f"derive_student: {label} argument {name!r} is {value!r}, not an integer width")
        args[name] = max(1, round(value * width))
    student = build_from_spec({**{k: v for k, v in spec.items() if k != "args"}, "args": args})
    if init == "teacher":
        _inherit_leading_slices(student, teacher)
    return student


@torch.no_grad()
def _inherit_leading_slices(student: nn.Module, teacher: nn.Module) -> None:
    source = _effective_state(teacher)
    for name, tensor in student.state_dict().items():
        if name not in source:
            raise ModelError(f"derive_student(init='teacher'): the teacher has no tensor {name!r}")
        value = source[name]
        if value.dim() != tensor.dim() or any(s > t for s, t in zip(tensor.shape, value.shape)):
            raise ModelError(f"derive_student(init='teacher'): {name!r} is {tuple(tensor.shape)} in the student "
                             f"but {tuple(value.shape)} in the teacher")
        tensor.copy_(value[tuple(slice(0, s) for s in tensor.shape)])


def _effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with pruning masks applied (``w_orig * w_mask`` under the plain name ``w``)."""
    state = dict(model.state_dict())
    for key in [k for k in state if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        if base + "_mask" in state:
            state[base] = state.pop(key) * state.pop(base + "_mask")
    return state
