"""``distill()``: train a student against a frozen teacher with the one training loop."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from torchslim.distill.checks import check_distill_layers
from torchslim.distill.cache import (
    TeacherCache,
    cache_teacher_outputs,
    not_cacheable_reason,
)
from torchslim.distill.configs import DistillConfig, DKDConfig, KDConfig, as_distill_config
from torchslim.distill.features import FeatureHooks
from torchslim.distill.losses import hinton_loss
from torchslim.distill.frozen import ModuleState, freeze_teacher, frozen_teacher
from torchslim.distill.objective import DistillObjective, check_same_classes
from torchslim.errors import ConfigError, DataError, ModelError
from torchslim.train import TrainConfig, fit
from torchslim.train.loop import TensorSplit

__all__ = ["KDConfig", "KDObjective", "distill", "estimate_cache_bytes", "freeze_teacher", "prepare_teacher_cache"]


class KDObjective:
    """Training objective: the student's Hinton loss against a frozen teacher's logits, run online.

    :class:`~torchslim.distill.objective.DistillObjective` does this and more (cached
    teacher outputs, DKD, feature terms); this one needs no student at construction.
    The teacher stays frozen until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(self, teacher: nn.Module, config: KDConfig, label_smoothing: float = 0.0):
        self._teacher_state: ModuleState | None = ModuleState(teacher)
        self.teacher = freeze_teacher(teacher)
        self.config = config
        self.label_smoothing = label_smoothing

    def close(self) -> None:
        """Give the teacher back its train/eval modes and ``requires_grad`` flags."""
        if self._teacher_state is not None:
            self._teacher_state.restore()
            self._teacher_state = None

    def __enter__(self) -> "KDObjective":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        student_logits = model(x)
        check_same_classes(teacher_logits, student_logits)
        return student_logits, hinton_loss(student_logits, teacher_logits, y, self.config.temperature,
                                           self.config.alpha, self.label_smoothing)


@torch.no_grad()
def estimate_cache_bytes(teacher: nn.Module, train: TensorSplit, config: DistillConfig) -> int:
    """Bytes the teacher-output cache of ``train`` would take (one teacher pass on one sample)."""
    state = ModuleState(teacher)
    teacher.eval()  # no BatchNorm statistics updated by this probe
    hooks = FeatureHooks(teacher, (), "teacher")
    try:
        hooks = FeatureHooks(teacher, config.teacher_layers(), "teacher")
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        logits = teacher(train.x[:1].to(device))
        per_sample = {"fp32": 4 * logits.shape[1], "fp16": 2 * logits.shape[1],
                      "topk": 4 * config.cache_top_k + 2}[config.cache_format]
        feature_bytes = 4 if config.cache_format == "fp32" else 2
        per_sample += sum(hooks.take(name)[0].numel() * feature_bytes for name in config.teacher_layers())
    finally:
        hooks.remove()
        state.restore()
    return per_sample * len(train.y)


@torch.no_grad()
def _check_outputs(student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None:
    for role, model in (("teacher", teacher), ("student", student)):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), example.dtype)
        if dtype != example.dtype:
            raise ModelError(f"the {role}'s weights are {dtype} but the inputs are {example.dtype}: convert it with "
                             f"{role}.float() (a .slim file saved with float16 weights loads as float16)")
    was_training = student.training
    student.eval()  # no BatchNorm statistics updated by this probe
    try:
        student_logits = student(example.to(next((p.device for p in student.parameters()), torch.device("cpu"))))
    finally:
        student.train(was_training)
    teacher_logits = teacher(example.to(next((p.device for p in teacher.parameters()), torch.device("cpu"))))
    check_same_classes(teacher_logits, student_logits)


def _log(message: str) -> None:
    print(f"[distill] {message}", file=sys.stderr, flush=True)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: TensorSplit,
    config: KDConfig | DKDConfig | DistillConfig,
    train_config: TrainConfig | None = None,
    *,
    epochs: int | None = None,
    teacher_cache: TeacherCache | None = None,
    cache_dir: str | os.PathLike | None = None,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Distill ``teacher`` into ``student`` in place; returns per-epoch records.

    Records carry ``train_loss`` (the total) and one ``train_<part>`` per loss part
    (``task_loss``, ``kd_loss`` or ``tckd_loss``/``nckd_loss``, ``hint_loss``,
    ``attention_loss``), plus ``teacher_outputs`` (``cached`` or ``online``) and
    ``cache_seconds`` (time spent building or loading the cache, 0 online).

    Teacher outputs follow ``config.teacher_outputs`` (a bare KD/DKD config means
    ``auto``): cached when the training inputs are the same every epoch, online
    otherwise. Hint adapters are trained with the student and removed at the end, so
    ``student`` comes back with exactly the modules it went in with.

    Args:
        student: any ``nn.Module`` (a zoo preset, :func:`derive_student`, a pruned model);
            trained in place.
        teacher: frozen (eval mode, no gradients) for the duration; a teacher in train
            mode is switched to eval mode with a warning. Its modes and ``requires_grad``
            flags are restored when ``distill`` returns or raises.
        train: training split with ``x`` and ``y``.
        config: :class:`KDConfig`, :class:`DKDConfig` or :class:`DistillConfig`.
        train_config: optimizer, schedule and batch size (default ``TrainConfig()``).
        epochs: shorthand overriding ``train_config.epochs``.
        teacher_cache: a cache built earlier (:func:`cache_teacher_outputs`) to reuse, e.g.
            across seeds; its fingerprint is checked against ``teacher`` and ``train.x``.
        cache_dir: keep cache files here (named by fingerprint, reused when they match);
            None keeps the cache in memory only.
        **fit_kwargs: passed to :func:`torchslim.train.fit` (``val=``, ``seed=``,
            ``checkpoint_path=``, ``device=``, ``progress=``, ...).

    Raises:
        DataError: ``teacher_outputs="cached"`` (or a ``teacher_cache``) with inputs that
            change every epoch, or a ``teacher_cache`` built for another teacher or data.
        ConfigError: a hint or attention layer names no module of its model (see
            :func:`check_distill_layers`).
        ModelError: teacher and student predict different numbers of classes, or hint
            features whose shapes no adapter can map.

    Example:
        See ``examples/distill_and_prune.py``.
    """
    cfg = as_distill_config(config)
    train_config = train_config or TrainConfig()
    if epochs is not None:
        # Only the fields set by hand carry over, so a default schedule follows the new epochs.
        train_config = TrainConfig(**{**train_config.model_dump(exclude_unset=True), "epochs": epochs})
    check_distill_layers(student, teacher, cfg)  # a misspelt layer fails before anything runs
    with frozen_teacher(teacher):
        _check_outputs(student, teacher, train.x[:2])  # before a teacher pass over the whole dataset
        say = _log if fit_kwargs.get("progress", None) is not False else (lambda message: None)
        started = time.perf_counter()
        cache = prepare_teacher_cache(teacher, train, cfg, train_config, teacher_cache=teacher_cache,
                                      cache_dir=cache_dir, log=say)
        cache_seconds = time.perf_counter() - started if cache is not None else 0.0
        if cache is not None:
            say(f"teacher outputs cached: {cache} in {cache_seconds:.1f}s")
        with DistillObjective(student, teacher, cfg, example=train.x[:2], teacher_cache=cache,
                              label_smoothing=train_config.label_smoothing) as objective:
            records = fit(student, train, train_config, objective=objective,
                          stage=fit_kwargs.pop("stage", "distill"), **fit_kwargs)
    for record in records:
        record["teacher_outputs"] = objective.teacher_outputs
        record["cache_seconds"] = cache_seconds
    return records


def prepare_teacher_cache(teacher: nn.Module, train: TensorSplit, config: KDConfig | DKDConfig | DistillConfig,
                          train_config: TrainConfig | None = None, *, teacher_cache: TeacherCache | None = None,
                          cache_dir: str | os.PathLike | None = None,
                          log: Callable[[str], None] | None = None) -> TeacherCache | None:
    """The teacher cache :func:`distill` would use, or None when the teacher should run online.

    Applies ``config.teacher_outputs``: ``online`` gives None; ``cached`` builds (or loads
    from ``cache_dir``) the cache, or raises when the inputs change every epoch; ``auto``
    does the same but falls back to None (with a logged reason) when the inputs change
    every epoch or the cache would exceed ``cache_max_mb``. A ``teacher_cache`` passed in
    is checked against ``teacher`` and ``train.x`` and returned.

    Args:
        teacher: the frozen teacher.
        train: the training split.
        config: the distillation config.
        train_config: checked for augmentation settings.
        teacher_cache: a cache built earlier.
        cache_dir: where cache files live (None: in memory only).
        log: called with one-line messages about the choice (default: silent).

    Raises:
        DataError: see :func:`distill`.
        ConfigError: a ``teacher_cache`` with ``teacher_outputs='online'``.
    """
    cfg = as_distill_config(config)
    train_config = train_config or TrainConfig()
    say = log or (lambda message: None)
    given = teacher_cache
    reason = not_cacheable_reason(train, train_config)
    if given is not None:
        if cfg.teacher_outputs == "online":
            raise ConfigError("a teacher_cache was given but teacher_outputs is 'online'")
        if reason is not None:
            raise DataError(f"cannot use a teacher cache: {reason}")
        if not given.matches(teacher, train.x):
            raise DataError("the teacher_cache was built for another teacher, another dataset or other settings "
                            "(its fingerprint does not match): build it again for this teacher and split")
        return given
    if cfg.teacher_outputs == "online":
        return None
    if reason is not None:
        if cfg.teacher_outputs == "cached":
            raise DataError(f"teacher_outputs is 'cached' but {reason}. Use teacher_outputs 'online' "
                            "(or 'auto', which runs the teacher online in this case).")
        say(f"running the teacher online: {reason}")
        return None
    if cfg.teacher_outputs == "auto":
        size = estimate_cache_bytes(teacher, train, cfg)
        if size > cfg.cache_max_mb * 1e6:
            say(f"running the teacher online: its outputs would take {size / 1e6:.0f} MB "
                f"(cache_max_mb is {cfg.cache_max_mb:g})")
            return None
    return cache_teacher_outputs(teacher, train, layers=cfg.teacher_layers(), cache_format=cfg.cache_format,
                                 top_k=cfg.cache_top_k, cache_dir=cache_dir, train_config=train_config)
