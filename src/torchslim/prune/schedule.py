"""Pruning schedules: when, during training, masks grow to their final sparsity.

``GradualPruning`` follows the automated gradual pruning (AGP) schedule of
Zhu & Gupta (2017)::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3      for t0 <= t <= t0 + n*dt

pruning fast while many redundant weights remain and slowly near the end.
Masks are updated in place every ``frequency`` steps, so the optimizer built
at the start of training keeps working and pruned weights never come back.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from pydantic import Field, model_validator

from torchslim.config import Config
from torchslim.prune.magnitude import MagnitudePruning, prune_


class AGPSchedule(Config):
    """Zhu & Gupta's cubic sparsity ramp, in optimizer steps.

    Attributes:
        initial_sparsity: s_i, sparsity at ``start_step``.
        final_sparsity: s_f, sparsity from ``end_step`` on.
        start_step: t0, the step of the first pruning.
        end_step: t0 + n·Δt, the step of the last pruning.
        frequency: Δt, steps between mask updates.

    Example:
        >>> s = AGPSchedule(initial_sparsity=0.0, final_sparsity=0.9, start_step=0, end_step=100, frequency=10)
        >>> s.sparsity_at(0), round(s.sparsity_at(50), 4), s.sparsity_at(100)
        (0.0, 0.7875, 0.9)
    """

    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    final_sparsity: float = Field(..., ge=0.0, lt=1.0)
    start_step: int = Field(0, ge=0)
    end_step: int = Field(..., ge=0)
    frequency: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "AGPSchedule":
        if self.end_step < self.start_step:
            raise ValueError("end_step must be >= start_step")
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError("final_sparsity must be >= initial_sparsity")
        return self

    def sparsity_at(self, step: int) -> float:
        """The target sparsity after ``step`` optimizer steps."""
        if step <= self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        """True on the steps where masks are recomputed (every ``frequency`` steps, and the last)."""
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step


def gradual_pruning_hook(model: nn.Module, pruning: MagnitudePruning, schedule: AGPSchedule) -> Callable[[int], None]:
    """A ``fit(on_step_end=...)`` callback that prunes ``model`` along ``schedule``.

    ``pruning`` chooses the layers and scope; its ``sparsity`` is replaced by the
    schedule's target at each update step.
    """
    def on_step_end(step: int) -> None:
        if schedule.is_update_step(step):
            target = schedule.sparsity_at(step)
            prune_(model, MagnitudePruning(**{**pruning.model_dump(), "sparsity": target, "threshold": None}))

    return on_step_end
