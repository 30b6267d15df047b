"""Freezing a teacher for the duration of a call, and giving it back as it came.

Distillation runs the teacher in eval mode (BatchNorm statistics and dropout
fixed) with no gradients. Every verb that freezes a teacher restores each
module's train/eval flag and each parameter's ``requires_grad`` when it ends,
on an error too, so a teacher that goes in trainable comes out trainable.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch.nn as nn


class ModuleState:
    """A model's per-module train/eval flags and per-parameter ``requires_grad``, to put back later.

    Per module and per parameter, not one flag for the whole model: a user may keep
    some BatchNorm layers in eval mode, or some layers frozen, on purpose.
    """

    def __init__(self, model: nn.Module):
        self._modes = [(module, module.training) for module in model.modules()]
        self._grads = [(param, param.requires_grad) for param in model.parameters()]

    def restore(self) -> None:
        """Put every flag back as it was when this state was taken."""
        for module, training in self._modes:
            module.training = training
        for param, requires_grad in self._grads:
            param.requires_grad_(requires_grad)


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put ``teacher`` in eval mode with no gradients (BatchNorm/dropout frozen); returns it.

    One way: nothing restores it. Verbs use :func:`frozen_teacher`, which does.
    """
    if teacher.training:
        warnings.warn("the teacher was in train mode; torchslim switched it to eval mode for distillation "
                      "(its mode is restored afterwards)", stacklevel=3)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@contextlib.contextmanager
def frozen_teacher(teacher: nn.Module) -> Iterator[nn.Module]:
    """Freeze ``teacher`` (see :func:`freeze_teacher`) inside the block; restore its flags after, on error too.

    Example:
        >>> import torch.nn as nn
        >>> from torchslim.distill import frozen_teacher
        >>> teacher = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval()
        >>> teacher[1].train()  # a mix of modes, kept as it is
        Dropout(p=0.5, inplace=False)
        >>> with frozen_teacher(teacher):
        ...     teacher[1].training, teacher[0].weight.requires_grad
        (False, False)
        >>> teacher[1].training, teacher[0].weight.requires_grad
        (True, True)
    """
    state = ModuleState(teacher)
    try:
        freeze_teacher(teacher)
        yield teacher
    finally:
        state.restore()
