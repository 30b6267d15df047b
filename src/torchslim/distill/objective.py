"""The distillation objective: a weighted sum of loss parts over a student and a frozen teacher.

``DistillObjective`` plugs into :func:`torchslim.train.fit` like any objective: it
maps ``(model, x, y)`` to ``(logits, parts)``, with ``parts["loss"]`` the total and
every other part (``task_loss``, ``kd_loss``, ``tckd_loss``, ``nckd_loss``,
``hint_loss``, ``attention_loss``) logged per epoch.

Teacher outputs come either from the teacher, run on the batch (*online*), or
from a :class:`~torchslim.distill.cache.TeacherCache` looked up by the batch's
sample indices (*cached*). :func:`~torchslim.train.fit` passes them as ``index=``
(the objective declares ``uses_index = True``); for a hand-written loop that
does not, :meth:`DistillObjective.indexed` wraps the training split so that
indexing its ``x`` records which rows were taken.

Hint adapters are attached to the student as the submodule
``torchslim_distill_adapters`` while distillation runs, so the loop's optimizer
trains them and its checkpoints hold them; :meth:`DistillObjective.close` removes
them (and the hooks), leaving the student as it was built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchslim.distill.cache import FEATURE_PREFIX, TeacherCache
from torchslim.distill.configs import DistillConfig, KDConfig, DKDConfig, as_distill_config
from torchslim.distill.features import FeatureHooks, make_adapter, match_spatial
from torchslim.distill.frozen import ModuleState, freeze_teacher
from torchslim.distill.losses import attention_loss, dkd_loss, hint_loss, hinton_loss
from torchslim.errors import ModelError, TrainingError

ADAPTERS_ATTR = "torchslim_distill_adapters"


def check_same_classes(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
    """Raise a :class:`ModelError` unless teacher and student predict the same number of classes."""
    if teacher_logits.shape != student_logits.shape:
        raise ModelError(
            f"teacher outputs {tuple(teacher_logits.shape)} but student outputs {tuple(student_logits.shape)}: "
            "distillation needs both to predict the same classes (check num_classes)"
        )


class IndexedInputs:
    """A split's ``x`` that remembers the rows last taken from it (see :meth:`DistillObjective.indexed`)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.last_index: torch.Tensor | None = None

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        self.last_index = index
        return self.x[index]

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> torch.Size:
        return self.x.shape


@dataclasses.dataclass(frozen=True, eq=False)
class IndexedSplit:
    """A training split whose ``x`` records the indices the loop takes; ``y`` unchanged."""

    x: IndexedInputs
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class DistillObjective:
    """Distillation loss for :func:`torchslim.train.fit` (see the module docstring).

    Args:
        student: the model being trained (any ``nn.Module``: a zoo preset, a pruned or masked
            model). Hooks and hint adapters are attached to it until :meth:`close`.
        teacher: frozen here (eval mode, no gradients; warns if it was in train mode) until
            :meth:`close`, which restores its modes and ``requires_grad`` flags.
        config: a :class:`DistillConfig`, or a bare :class:`KDConfig`/:class:`DKDConfig`.
        example: a few training inputs, needed when the config has hints (to size the adapters
            by running both models once in eval mode).
        teacher_cache: the teacher's outputs for every training sample; None runs the teacher
            on every batch. It must hold the feature layers the config names.
        label_smoothing: for the task cross-entropy.

    Example:
        >>> import torch, torchslim as ts
        >>> from torchslim.distill import DistillConfig, DistillObjective, HintConfig
        >>> teacher = ts.models.create("fmnist_student", input_size=8, num_classes=4, width=8, fc=16).eval()
        >>> student = ts.models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)
        >>> x = torch.randn(6, 1, 8, 8)
        >>> with DistillObjective(student, teacher, DistillConfig(hints=HintConfig()), example=x[:2]) as objective:
        ...     logits, parts = objective(student, x, torch.zeros(6, dtype=torch.long))
        >>> sorted(parts)
        ['hint_loss', 'kd_loss', 'loss', 'task_loss']
    """

    #: ``fit`` calls objectives that set this with ``index=`` (the batch's sample indices).
    uses_index: ClassVar[bool] = True

    def __init__(self, student: nn.Module, teacher: nn.Module, config: KDConfig | DKDConfig | DistillConfig, *,
                 example: torch.Tensor | None = None, teacher_cache: TeacherCache | None = None,
                 label_smoothing: float = 0.0):
        self.config = as_distill_config(config)
        self.student = student
        self.cache = teacher_cache
        self.label_smoothing = label_smoothing
        self._recorder: IndexedInputs | None = None
        self._cache_device: torch.device | None = None
        self._epochs_done = math.inf  # full loss weights unless fit says where training is (begin_step)
        cfg = self.config
        self._teacher_layers = cfg.teacher_layers()
        self._student_layers = tuple(dict.fromkeys(
            [s for term in (cfg.hints, cfg.attention) if term is not None for s in term.layers]))
        if teacher_cache is not None:
            missing = [name for name in self._teacher_layers if name not in teacher_cache.layers]
            if missing:
                raise ModelError(f"the teacher cache holds no features for teacher layers {missing}; "
                                 "build it with those layers")
        # Everything below is undone by close(), so a failure part way leaves no hook,
        # no adapter and no frozen teacher behind.
        self._student_hooks = FeatureHooks(student, (), "student")
        self._teacher_hooks = FeatureHooks(teacher, (), "teacher")
        self._adapters: nn.ModuleList | None = None
        self._teacher_state: ModuleState | None = ModuleState(teacher)
        self.teacher = freeze_teacher(teacher)
        try:
            self._student_hooks = FeatureHooks(student, self._student_layers, "student")
            self._teacher_hooks = FeatureHooks(teacher, self._teacher_layers if teacher_cache is None else (),
                                               "teacher")
            if cfg.hints is not None:
                self._attach_adapters(example)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def _attach_adapters(self, example: torch.Tensor | None) -> None:
        if example is None:
            raise ModelError("hints need example inputs to size their adapters: pass example=train.x[:2]")
        if hasattr(self.student, ADAPTERS_ATTR):
            raise ModelError(f"the student already has a '{ADAPTERS_ATTR}' submodule: is another distillation "
                             "objective still attached? close() it first")
        device = _device_of(self.student)
        was_training = self.student.training
        self.student.eval()
        try:
            self.student(example.to(device))
        finally:
            self.student.train(was_training)
        if self.cache is None:
            self.teacher(example.to(_device_of(self.teacher)))
            teacher_features = self._teacher_hooks.outputs
        else:  # no teacher hooks: the cache has the shapes
            teacher_features = {name: self.cache.tensors[FEATURE_PREFIX + name][:1] for name in self._teacher_layers}
        adapters = []
        for student_layer, teacher_layer in self.config.hints.layers.items():
            s, t = match_spatial(self._student_hooks.take(student_layer), teacher_features[teacher_layer].float())
            adapters.append(make_adapter(tuple(s.shape[1:]), tuple(t.shape[1:]), f"{student_layer} -> {teacher_layer}"))
        self._student_hooks.clear()
        self._teacher_hooks.clear()
        self._adapters = nn.ModuleList(adapters).to(device)
        self.student.add_module(ADAPTERS_ATTR, self._adapters)

    @property
    def adapters(self) -> nn.ModuleList | None:
        """The hint adapters (one per hint pair; ``Identity`` where shapes already match), or None."""
        return self._adapters

    @property
    def teacher_outputs(self) -> str:
        """``"cached"`` or ``"online"``."""
        return "online" if self.cache is None else "cached"

    def indexed(self, split: Any) -> IndexedSplit:
        """``split`` with an ``x`` that records the rows the loop takes, for cached teacher outputs.

        Only for a training loop that does not pass ``index=`` (``fit`` does); the recorded
        index is read in the objective call that follows the loop's ``train.x[idx]``.
        """
        self._recorder = IndexedInputs(split.x)
        return IndexedSplit(self._recorder, split.y)

    def close(self) -> None:
        """Remove the hooks and the adapters and unfreeze the teacher: both are as before."""
        self._student_hooks.remove()
        self._teacher_hooks.remove()
        if self._teacher_state is not None:
            self._teacher_state.restore()
            self._teacher_state = None
        if self._adapters is not None and getattr(self.student, ADAPTERS_ATTR, None) is self._adapters:
            delattr(self.student, ADAPTERS_ATTR)
        self._adapters = None

    def begin_step(self, epochs_done: float) -> None:
        """Called by ``fit`` before each optimizer step with the epochs trained so far
        (fractional: 2.5 is halfway through the third); DKD's warm-up reads it. A
        function of the position alone, so a resumed run ramps exactly as an unbroken one."""
        self._epochs_done = epochs_done

    def __enter__(self) -> "DistillObjective":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the step
    def _teacher(self, x: torch.Tensor, index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.cache is None:
            self._teacher_hooks.clear()
            with torch.no_grad():
                logits = self.teacher(x)
            return {"logits": logits, **{name: self._teacher_hooks.take(name) for name in self._teacher_layers}}
        if index is None and self._recorder is not None:
            index = self._recorder.last_index
        if index is None:
            raise TrainingError("cached teacher outputs need each batch's sample indices: train with "
                                "torchslim.train.fit (it passes index=), or on objective.indexed(train) in "
                                "your own loop")
        if len(index) != len(x):
            raise TrainingError(f"the batch has {len(x)} samples but {len(index)} indices: the cache lookup "
                                "does not match the batch")
        if self._cache_device != x.device:
            self.cache.to(x.device)  # once: lookups then stay on the training device
            self._cache_device = x.device
        return self.cache.lookup(index, x.device)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        teacher = self._teacher(x, index)
        self._student_hooks.clear()
        student_logits = model(x)
        check_same_classes(teacher["logits"], student_logits)

        if isinstance(cfg.logits, KDConfig):
            parts = hinton_loss(student_logits, teacher["logits"], y, cfg.logits.temperature, cfg.logits.alpha,
                                self.label_smoothing)
        else:
            d = cfg.logits
            task = F.cross_entropy(student_logits.float(), y, label_smoothing=self.label_smoothing)
            parts = {"task_loss": task, **dkd_loss(student_logits, teacher["logits"], y, d.temperature)}
            ramp = min(1.0, self._epochs_done / d.warmup_epochs) if d.warmup_epochs > 0 else 1.0
            parts["loss"] = (d.task_weight * task + ramp * (d.tckd_weight * parts["tckd_loss"]
                                                            + d.nckd_weight * parts["nckd_loss"]))

        if cfg.hints is not None:
            terms = []
            for adapter, (s_name, t_name) in zip(self._adapters, cfg.hints.layers.items()):
                s, t = match_spatial(self._student_hooks.take(s_name), teacher[t_name])
                terms.append(hint_loss(adapter(s), t))
            parts["hint_loss"] = torch.stack(terms).mean()
            parts["loss"] = parts["loss"] + cfg.hints.weight * parts["hint_loss"]
        if cfg.attention is not None:
            terms = []
            for s_name, t_name in cfg.attention.layers.items():
                s, t = match_spatial(self._student_hooks.take(s_name), teacher[t_name])
                terms.append(attention_loss(s, t, cfg.attention.p))
            parts["attention_loss"] = torch.stack(terms).sum()
            parts["loss"] = parts["loss"] + cfg.attention.weight * parts["attention_loss"]
        self._student_hooks.clear()
        return student_logits, parts
