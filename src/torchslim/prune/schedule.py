"""Pruning schedules: when, during training, masks grow to their final sparsity.

:class:`AGPSchedule` is the automated gradual pruning (AGP) schedule of
Zhu & Gupta (2017)::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3      for t0 <= t <= t0 + n*dt

pruning fast while many redundant weights remain and slowly near the end.
:func:`gradual_pruning_hook` applies it inside :func:`torchslim.train.fit` with any
pruning config (criterion, scope, overrides...). Masks are updated in place every
``frequency`` steps, so the optimizer built at the start of training keeps working
and pruned weights never come back. One-shot pruning is a plain ``prune_`` call;
prune -> retrain rounds are in :mod:`torchslim.prune.iterative`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from pydantic import Field, model_validator

from torchslim.config import Config
from torchslim.errors import ConfigError
from torchslim.prune.api import prune_
from torchslim.prune.checks import check_pruning
from torchslim.prune.magnitude import MagnitudePruning
from torchslim.prune.unstructured import UnstructuredPruning


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

    @classmethod
    def over(cls, final_sparsity: float, total_steps: int, *, start: float = 0.0, end: float = 0.3,
             updates: int = 50, frequency: int | None = None, initial_sparsity: float = 0.0) -> "AGPSchedule":
        """An AGP ramp placed by fractions of a run of ``total_steps`` optimizer steps.

        The defaults come from the LeNet-300-100 / Fashion-MNIST benchmark
        (``benchmarks/README.md``): reaching the target at 30% of the steps (leaving 70%
        to recover at full sparsity) beat 50% and 75%, with about 50 mask updates.

        Args:
            final_sparsity: s_f.
            total_steps: optimizer steps of the training run the ramp lives in.
            start: fraction of the run at which pruning starts (t0).
            end: fraction of the run at which the target is reached.
            updates: number of mask updates along the ramp (sets ``frequency``).
            frequency: steps between mask updates; replaces ``updates`` when given.
            initial_sparsity: s_i.

        Example:
            >>> s = AGPSchedule.over(0.9, 1000)
            >>> s.start_step, s.end_step, s.frequency
            (0, 300, 6)
        """
        if not 0.0 <= start < end <= 1.0:
            raise ConfigError(f"AGPSchedule.over needs 0 <= start < end <= 1, got start={start}, end={end}")
        t0, t1 = round(start * total_steps), max(1, round(end * total_steps))
        return cls(initial_sparsity=initial_sparsity, final_sparsity=final_sparsity, start_step=t0,
                   end_step=max(t0, t1),
                   frequency=frequency if frequency is not None else max(1, (t1 - t0) // max(1, updates)))

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


class GradualSchedule(Config):
    """Where an AGP ramp sits in a training run, by fractions of its steps (placed by :meth:`AGPSchedule.over`).

    Attributes:
        start: fraction of the steps at which pruning starts.
        end: fraction of the steps by which the final sparsity is reached; the rest
            trains at that sparsity (0.3 won on the LeNet-300-100 benchmark).
        frequency: optimizer steps between mask updates (None: ``updates`` spread along the ramp).
        updates: number of mask updates along the ramp when ``frequency`` is None.

    Example:
        >>> GradualSchedule(end=0.5, frequency=10).placed(0.9, 1000).end_step
        500
    """

    start: float = Field(0.0, ge=0.0, lt=1.0)
    end: float = Field(0.3, gt=0.0, le=1.0)
    frequency: int | None = Field(None, ge=1)
    updates: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "GradualSchedule":
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")
        return self

    def placed(self, final_sparsity: float, total_steps: int) -> AGPSchedule:
        """The AGP schedule for a run of ``total_steps`` optimizer steps."""
        return AGPSchedule.over(final_sparsity, total_steps, start=self.start, end=self.end, updates=self.updates,
                                frequency=self.frequency)


def at_sparsity(pruning: MagnitudePruning | UnstructuredPruning, sparsity: float,
                final: float | None = None) -> MagnitudePruning | UnstructuredPruning:
    """``pruning`` with its sparsity replaced by ``sparsity`` (a step of a schedule).

    Per-layer overrides of an :class:`UnstructuredPruning` ramp along with it: each is
    scaled by ``sparsity / final`` (``final`` defaults to the config's own sparsity), so
    every layer reaches its own target at the end of the schedule.

    Raises:
        ConfigError: ``pruning`` is set by threshold, Han's rule or N:M, which a
            sparsity schedule cannot ramp.
    """
    if isinstance(pruning, MagnitudePruning):
        return type(pruning)(**{**pruning.model_dump(), "sparsity": sparsity, "threshold": None})
    if pruning.target != "sparsity":
        raise ConfigError(f"a sparsity schedule needs a pruning config set by 'sparsity', not by {pruning.target!r}")
    final = pruning.sparsity if final is None else final
    scale = sparsity / final if final > 0 else 1.0
    overrides = {k: (None if v is None else min(v * scale, v)) for k, v in pruning.overrides.items()}
    return pruning.model_copy(update={"sparsity": sparsity, "overrides": overrides})


def gradual_pruning_hook(
    model: nn.Module,
    pruning: MagnitudePruning | UnstructuredPruning,
    schedule: AGPSchedule,
    data: Any = None,
    *,
    objective: Any = None,
) -> Callable[[int], None]:
    """A ``fit(on_step_end=...)`` callback that prunes ``model`` along ``schedule``.

    ``pruning`` chooses the criterion, the layers, the scope and every other
    selection option; its ``sparsity`` is replaced by the schedule's target at
    each update step (overrides ramp in proportion, see :func:`at_sparsity`).
    Masks are updated in place, so the optimizer ``fit`` built keeps working, and
    a removed weight never comes back.

    Args:
        model: the model being trained.
        pruning: :class:`UnstructuredPruning` (set by ``sparsity``) or :class:`MagnitudePruning`.
        schedule: when and how far to prune.
        data: split for gradient criteria (``taylor``, ``snip``): they are re-collected on
            the current weights at every update.
        objective: the loss for gradient criteria (default cross-entropy).

    Example:
        >>> import torchslim as ts
        >>> from torchslim.prune import AGPSchedule, UnstructuredPruning, gradual_pruning_hook
        >>> model = ts.models.create("lenet300_100")
        >>> hook = gradual_pruning_hook(model, UnstructuredPruning(sparsity=0.9),
        ...                             AGPSchedule(final_sparsity=0.9, end_step=100, frequency=10))
        >>> hook(100)  # fit calls it after every optimizer step
        >>> round(ts.prune.global_sparsity(model), 3)
        0.9
    """
    at_sparsity(pruning, schedule.final_sparsity, schedule.final_sparsity)  # fail now, not mid-training
    check_pruning(model, pruning)  # a layer name that matches nothing, N:M that does not fit: now too
    if isinstance(pruning, UnstructuredPruning) and pruning.needs_data and data is None:
        raise ConfigError(f"criterion {pruning.criterion!r} needs data: gradual_pruning_hook(..., data=train_split)")

    def on_step_end(step: int) -> None:
        if schedule.is_update_step(step):
            target = schedule.sparsity_at(step)
            prune_(model, at_sparsity(pruning, target, schedule.final_sparsity), data, objective=objective)

    return on_step_end
