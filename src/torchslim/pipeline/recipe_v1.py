"""The version-1 recipe schema (fixed sections), kept to read older recipes.

A v1 recipe names the data, the teacher, the student and fixed sections
(distill → prune → finetune → evaluate → export). It is validated here, with
its own key paths in the errors, then turned into a v2 recipe by
:mod:`torchslim.pipeline.migrate`. New recipes are v2 (``version: 2``,
``stages:``; see :mod:`torchslim.pipeline.recipe`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from torchslim.config import Config, tagged_union
from torchslim.distill import DistillConfig, KDConfig
from torchslim.distill.configs import as_distill_config
from torchslim.prune import IterativeSchedule, SensitivityConfig, UnstructuredPruning
from torchslim.prune.structured import ChannelPruning
from torchslim.pipeline.model_ref import ModelRef
from torchslim.train import TrainConfig


class DataSectionV1(Config):
    """The dataset and its splits.

    Attributes:
        dataset: ``fashion-mnist``, ``mnist``, ``digits`` (offline, from scikit-learn) or ``synthetic``.
        root: a folder holding the IDX files (tried first).
        val_size: validation samples carved from the training set: a fraction when < 1 (default 0.1), else a count.
        train_limit: keep only this many training samples, for quick runs.
        test_limit: keep only this many test samples, for quick runs.
        download: allow downloading from the official mirror when no local copy exists.
    """

    dataset: Literal["fashion-mnist", "mnist", "digits", "synthetic"] = "fashion-mnist"
    root: str | None = None
    val_size: float = Field(0.1, ge=0)
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    download: bool = True


class TeacherSectionV1(Config):
    """The teacher: loaded from ``model.weights``, or trained with ``train``."""

    model: ModelRef
    train: TrainConfig | None = None

    @model_validator(mode="after")
    def _weights_or_train(self) -> "TeacherSectionV1":
        if self.model.weights is None and self.train is None:
            raise ValueError("the teacher needs 'model.weights' to load or a 'train' section to train it")
        return self


class StudentSectionV1(Config):
    """The student architecture, and optionally a baseline trained alone for comparison."""

    model: ModelRef
    baseline: TrainConfig | None = None


def _distillation(section: Config) -> DistillConfig:
    """A section's distillation objective: ``objective`` when given, else its ``kd`` wrapped."""
    if section.objective is not None:
        return section.objective
    return as_distill_config(section.kd if section.kd is not None else KDConfig())


def _kd_or_objective(section: Config) -> Config:
    if section.kd is not None and section.objective is not None:
        raise ValueError("set 'kd' (Hinton KD) or 'objective' (any distillation objective), not both")
    return section


class DistillSectionV1(Config):
    """Distill the teacher into the student.

    Attributes:
        kd: Hinton KD's temperature and alpha (the short form; ``KDConfig``'s defaults when
            neither ``kd`` nor ``objective`` is given).
        objective: any distillation objective (:class:`~torchslim.distill.DistillConfig`:
            ``logits`` KD or DKD, ``hints``, ``attention``, ``teacher_outputs`` cached or
            online); replaces ``kd``.
        train: optimizer, schedule and epochs.
    """

    kd: KDConfig | None = None
    objective: DistillConfig | None = None
    train: TrainConfig

    _one_objective = model_validator(mode="after")(_kd_or_objective)

    def distillation(self) -> DistillConfig:
        """The objective this stage trains with."""
        return _distillation(self)


class SensitivitySectionV1(Config):
    """Per-layer sparsities from a sensitivity analysis of the unpruned model.

    Each layer is pruned alone at every sparsity of ``sparsities`` and the
    validation accuracy measured; the robust layers are then pruned more than the
    sensitive ones so that the total is still the stage's ``sparsity``.

    Attributes:
        sparsities: the sweep, strictly increasing in (0, 1).
        max_samples: validation samples per measurement (None: all).
    """

    sparsities: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98], min_length=1)
    max_samples: int | None = Field(2000, ge=1)

    _increasing = field_validator("sparsities")(SensitivityConfig._increasing.__func__)


class UnstructuredPruneSectionV1(UnstructuredPruning):
    """Unstructured pruning (masks) of the model produced so far.

    Every option of :class:`~torchslim.prune.UnstructuredPruning` (``criterion``,
    ``sparsity``/``threshold``/``han_quality``/``n_m``, ``scope``, ``overrides``,
    ``min_kept``, ``exclude_first_last``, ...) plus the schedule.

    Attributes:
        structured: ``false`` (the default): masks, not removed channels.
        schedule: ``oneshot`` prunes once before fine-tuning; ``gradual`` ramps the
            sparsity during fine-tuning along Zhu & Gupta's AGP schedule; ``iterative``
            runs prune → retrain rounds (Han et al.) that share the fine-tuning epochs.
        gradual_start: with ``gradual``, the fraction of the fine-tuning steps at which
            pruning starts.
        gradual_end: with ``gradual``, the fraction of the fine-tuning steps by which
            the final sparsity is reached (the rest fine-tunes at that sparsity).
        gradual_frequency: with ``gradual``, optimizer steps between mask updates.
        iterative: with ``iterative``: ``rounds``, ``ramp`` and ``rewind_epoch``
            (lottery-ticket style rewinding); ``finetune.train.epochs`` is split evenly
            between the rounds.
        sensitivity: set it to choose per-layer sparsities from a sensitivity analysis.
    """

    structured: Literal[False] = False
    schedule: Literal["oneshot", "gradual", "iterative"] = "oneshot"
    gradual_start: float = Field(0.0, ge=0.0, lt=1.0)
    gradual_end: float = Field(0.3, gt=0.0, le=1.0)
    gradual_frequency: int = Field(50, ge=1)
    iterative: IterativeSchedule = Field(default_factory=IterativeSchedule)
    sensitivity: SensitivitySectionV1 | None = None

    @model_validator(mode="after")
    def _schedule_fits_target(self) -> "UnstructuredPruneSectionV1":
        if self.schedule != "oneshot" and self.target != "sparsity":
            raise ValueError(f"schedule {self.schedule!r} ramps a target 'sparsity' (this stage is set by "
                             f"{self.target!r})")
        if self.sensitivity is not None and self.target != "sparsity":
            raise ValueError("'sensitivity' allocates a target 'sparsity' between layers: set 'sparsity'")
        if self.gradual_start >= self.gradual_end:
            raise ValueError(f"gradual_start ({self.gradual_start}) must be before gradual_end ({self.gradual_end})")
        return self

    def pruning_config(self) -> UnstructuredPruning:
        """The library config this stage applies."""
        return UnstructuredPruning(**self.model_dump(exclude=set(_STAGE_ONLY)))


_STAGE_ONLY = ("structured", "schedule", "gradual_start", "gradual_end", "gradual_frequency", "iterative",
               "sensitivity")


class StructuredPruneSectionV1(ChannelPruning):
    """Structured pruning: channels, neurons and heads physically removed.

    Every option of :class:`~torchslim.prune.structured.ChannelPruning` (``ratio``,
    ``target_macs``, ``target_params``, ``importance``, ``steps``, ``round_to``,
    ``scope``, ``overrides``, ``exclude``, ...).

    Attributes:
        structured: ``true``.
        finetune_epochs_between_steps: with ``steps`` > 1, epochs of fine-tuning after
            every step but the last (with the ``finetune`` section's optimizer and teacher);
            the ``finetune`` stage then fine-tunes the final model.
    """

    structured: Literal[True]
    finetune_epochs_between_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _between_needs_steps(self) -> "StructuredPruneSectionV1":
        if self.finetune_epochs_between_steps and self.steps < 2:
            raise ValueError("finetune_epochs_between_steps fine-tunes between pruning steps: set steps >= 2")
        return self

    def pruning_config(self) -> ChannelPruning:
        """The library config this stage applies."""
        return ChannelPruning(**self.model_dump(exclude={"structured", "finetune_epochs_between_steps"}))


def _prune_kind(value: Any) -> str:
    structured = value.get("structured", False) if isinstance(value, dict) else getattr(value, "structured", False)
    if not isinstance(structured, bool):
        return "not-a-bool"  # no such choice: the union's own message names the key
    return "structured" if structured else "unstructured"


#: The ``prune`` section: ``structured: true`` selects channel pruning, otherwise masks.
PruneSectionV1 = tagged_union({"unstructured": UnstructuredPruneSectionV1, "structured": StructuredPruneSectionV1}, _prune_kind,
                          "prune: 'structured' must be true or false")


class FinetuneSectionV1(Config):
    """Fine-tune the pruned model (masks stay fixed).

    Attributes:
        train: optimizer, schedule and epochs.
        distill_from: ``unpruned`` (the model before pruning, as teacher), ``teacher``
            (the recipe's teacher) or ``none`` (labels only).
        kd: temperature and alpha when distilling (the short form).
        objective: any distillation objective, replacing ``kd`` (see ``distill.objective``).
    """

    train: TrainConfig
    distill_from: Literal["none", "teacher", "unpruned"] = "unpruned"
    kd: KDConfig | None = None
    objective: DistillConfig | None = None

    _one_objective = model_validator(mode="after")(_kd_or_objective)

    def distillation(self) -> DistillConfig:
        """The objective used when ``distill_from`` is not ``none``."""
        return _distillation(self)


class EvaluateSectionV1(Config):
    """What to measure for every model in the report.

    Attributes:
        latency: measure CPU latency (median of repeated forward passes after warm-up).
        latency_batch_sizes: batch sizes to time.
        latency_budget_s: seconds of timed passes per measurement (more is steadier).
    """

    latency: bool = True
    latency_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 256], min_length=1)
    latency_budget_s: float = Field(1.0, gt=0.0, le=60.0)


class ExportSectionV1(Config):
    """Export of the final model.

    Attributes:
        onnx: write ``model.onnx`` and check it against onnxruntime.
        onnx_atol: largest accepted difference between onnxruntime and PyTorch outputs.
        weights_dtype: storage type of the floating-point tensors in ``model.slim``;
            ``float16`` halves the file (loading casts back with ``model.float()``).
    """

    onnx: bool = True
    onnx_atol: float = Field(1e-4, gt=0.0)
    weights_dtype: Literal["float32", "float16"] = "float32"


class RecipeV1(Config):
    """A whole compression run.

    Attributes:
        name: used in the run folder's name.
        seed: fixes model initialisation, batch order and dropout.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for training.
        threads: torch CPU threads (default: torch's own choice).
        data: the dataset.
        teacher, student, distill, prune, finetune: the stages; leave one out to skip it.
        evaluate, export: measurement and export of the results.
    """

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    threads: int | None = Field(None, ge=1)
    data: DataSectionV1 = Field(default_factory=DataSectionV1)
    teacher: TeacherSectionV1 | None = None
    student: StudentSectionV1 | None = None
    distill: DistillSectionV1 | None = None
    prune: PruneSectionV1 | None = None  # type: ignore[valid-type]
    finetune: FinetuneSectionV1 | None = None
    evaluate: EvaluateSectionV1 = Field(default_factory=EvaluateSectionV1)
    export: ExportSectionV1 = Field(default_factory=ExportSectionV1)

    @model_validator(mode="after")
    def _stages_fit_together(self) -> "RecipeV1":
        if self.teacher is None and self.student is None:
            raise ValueError("a recipe needs a 'teacher' or a 'student' section")
        if self.distill is not None and (self.teacher is None or self.student is None):
            raise ValueError("'distill' needs both a 'teacher' and a 'student' section")
        p = self.prune
        if isinstance(p, UnstructuredPruneSectionV1) and p.schedule != "oneshot" and self.finetune is None:
            raise ValueError(f"prune.schedule {p.schedule!r} prunes while fine-tuning: add a 'finetune' section")
        if isinstance(p, UnstructuredPruneSectionV1) and p.schedule == "iterative" and self.finetune is not None:
            rounds, epochs = p.iterative.rounds, self.finetune.train.epochs
            if epochs % rounds:
                raise ValueError(f"prune.iterative.rounds ({rounds}) must divide finetune.train.epochs ({epochs}): "
                                 "the rounds share the fine-tuning epochs evenly")
            rewind = p.iterative.rewind_epoch
            if rewind is not None and rewind > epochs // rounds:
                raise ValueError(f"prune.iterative.rewind_epoch ({rewind}) is past a round's {epochs // rounds} "
                                 "epochs (finetune.train.epochs / rounds)")
        if isinstance(p, StructuredPruneSectionV1) and p.finetune_epochs_between_steps and self.finetune is None:
            raise ValueError("prune.finetune_epochs_between_steps uses the 'finetune' section's optimizer: add one")
        if self.finetune is not None and self.prune is None:
            raise ValueError("'finetune' fine-tunes a pruned model: add a 'prune' section")
        if self.finetune is not None and self.finetune.distill_from == "teacher" and self.teacher is None:
            raise ValueError("finetune.distill_from is 'teacher' but the recipe has no 'teacher' section")
        return self
