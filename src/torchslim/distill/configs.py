"""Distillation configs: one per method, and :class:`DistillConfig` that combines them.

The loss a distillation step minimises is a weighted sum of named parts, each
logged per epoch as ``train_<part>``:

=================  ===================================  =====================================
part               from                                 weight
=================  ===================================  =====================================
``task_loss``      cross-entropy against the labels     ``KDConfig.alpha`` / ``DKDConfig.task_weight``
``kd_loss``        :class:`KDConfig` (Hinton)           ``1 − alpha``
``tckd_loss``      :class:`DKDConfig` (target class)    ``tckd_weight``
``nckd_loss``      :class:`DKDConfig` (other classes)   ``nckd_weight``
``hint_loss``      :class:`HintConfig` (FitNets)        ``weight``
``attention_loss`` :class:`AttentionConfig`             ``weight``
=================  ===================================  =====================================

:meth:`DistillConfig.describe` returns the method name, temperature and these weights
for reports.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from torchslim.config import Config, tagged_union

#: The range a config accepts; the pure loss functions accept more (see ``losses``).
TEMPERATURE_RANGE = (0.1, 100.0)
#: DKD's default warm-up, in epochs (see ``benchmarks/README.md``, robustness section).
WARMUP_EPOCHS = 1.0


class KDConfig(Config):
    """Hinton knowledge distillation.

    The defaults (T = 1, alpha = 0.5) come from the ``benchmarks/robustness.py`` setting (see
    ``benchmarks/README.md``, robustness section, third round). With the shipped teacher,
    which fits its own training samples (99.9 %), T = 2 left MLP students 0.2-0.6
    validation points below the same student trained alone after 10 epochs, and did so
    even when the soft-target term was used for the first epoch only or decayed to 0
    along training; T = 1 was within 0.12 of the student alone after 10 epochs on the MLPs
    and the conv models, and above T = 2 in the means after 1 and 3 epochs. Before that, T = 4,
    alpha = 0.1 left 1-epoch students 0.6-1.1 test points below the student alone. At
    T = 1 Hinton KD adds little over the labels when the teacher is this sure of its
    training samples; :class:`DKDConfig` (same temperature) is the one that gained.

    Attributes:
        method: ``"kd"`` (tells the logit terms apart inside :class:`DistillConfig`).
        temperature: T in [0.1, 100], softens both distributions (the literature uses 1–8;
            higher spreads a confident teacher's probability over the other classes).
        alpha: weight of the hard-label cross-entropy in [0, 1]; ``1 − alpha`` weighs the
            soft-target term. ``alpha=1`` is plain training, ``alpha=0`` pure distillation.

    Example:
        >>> import torchslim as ts
        >>> ts.KDConfig(temperature=4.0, alpha=0.1).alpha
        0.1
    """

    method: Literal["kd"] = "kd"
    temperature: float = Field(1.0, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
    alpha: float = Field(0.5, ge=0.0, le=1.0)


class DKDConfig(Config):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022).

    ``loss = task_weight · CE + tckd_weight · TCKD + nckd_weight · NCKD`` (see
    :func:`torchslim.distill.losses.dkd_loss`). The paper's α and β are ``tckd_weight``
    and ``nckd_weight``; its CIFAR-100 settings are (1, 8, T = 4). The default
    ``nckd_weight`` is 1: on Fashion-MNIST β = 8 was the worst setting of the 10-epoch
    validation sweep (``benchmarks/distillation.py``) and, with 1 and 3 epochs, left
    students 1-4 points (validation) below the same student trained alone, where β = 1
    was within 0.7 points of it after 1 epoch and above it after 3 and 10
    (``benchmarks/robustness.py``; see ``benchmarks/README.md``). The one-epoch warm-up
    took DKD from 0.5 points below the student alone after 1 epoch to 0.3 above it, and
    from +0.5 to +0.7 after 3 (validation means over the tuning models and seeds). The
    temperature is 1, not the paper's 4: at T = 4 MLP students ended 10 epochs 0.2-0.5
    validation points below the student alone; at T = 1 every tuning model (two MLPs, two
    conv nets) ended 0.2-0.5 points above it, and the means after 1 and 3 epochs were
    +0.5 and +0.7 (T = 4: +0.3 and +0.8). NCKD renormalizes over the non-target classes,
    so it keeps the teacher's ranking of them even at T = 1, where that teacher's
    probabilities are nearly one-hot.

    Attributes:
        method: ``"dkd"``.
        temperature: T in [0.1, 100].
        task_weight: weight of the hard-label cross-entropy.
        tckd_weight: weight of the target-class term (paper: α).
        nckd_weight: weight of the non-target-class term (paper: β).
        warmup_epochs: the TCKD and NCKD weights ramp linearly from 0 to their values over
            this many epochs of training (the paper warms up over 20 of 240 epochs); 0 turns
            the ramp off. Applied when ``fit`` trains (it tells the objective where it is);
            a hand-written loop gets the full weights from the first step.
    """

    method: Literal["dkd"] = "dkd"
    temperature: float = Field(1.0, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
    task_weight: float = Field(1.0, ge=0.0)
    tckd_weight: float = Field(1.0, ge=0.0)
    nckd_weight: float = Field(1.0, ge=0.0)
    warmup_epochs: float = Field(WARMUP_EPOCHS, ge=0.0, le=1000.0)


def _check_layer_pairs(layers: dict[str, str]) -> dict[str, str]:
    for student_layer, teacher_layer in layers.items():
        if not student_layer or not teacher_layer:
            raise ValueError("layer names must be non-empty module names (as in model.named_modules())")
    return layers


class HintConfig(Config):
    """FitNets hints: student layers regressed onto teacher layers (Romero et al., 2015).

    Where the shapes differ an adapter maps the student's features to the teacher's: a
    1×1 convolution for ``(B, C, H, W)`` maps (after average-pooling the larger spatial
    size down to the smaller), a linear layer for ``(B, F)``. Adapters are trained with
    the student and removed from it when distillation ends.

    Attributes:
        layers: ``{student_layer: teacher_layer}``, module names as in ``named_modules()``;
            the default pairs the zoo's feature extractors (``features``) end to end.
        weight: weight of ``hint_loss`` (the mean over the pairs of each pair's MSE).
    """

    layers: dict[str, str] = Field(default_factory=lambda: {"features": "features"}, min_length=1)
    weight: float = Field(1.0, ge=0.0)

    _names = field_validator("layers")(_check_layer_pairs)


class AttentionConfig(Config):
    """Attention transfer (Zagoruyko & Komodakis, 2017): match spatial attention maps.

    No adapter is needed: a map averages over channels. Spatial sizes must match
    (the larger map is average-pooled to the smaller).

    Attributes:
        layers: ``{student_layer: teacher_layer}`` of ``(B, C, H, W)`` outputs.
        weight: weight of ``attention_loss`` (summed over the pairs); the paper uses 1000.
        p: exponent of the attention map ``mean_c |F_c|^p``.
    """

    layers: dict[str, str] = Field(default_factory=lambda: {"features": "features"}, min_length=1)
    weight: float = Field(1000.0, ge=0.0)
    p: float = Field(2.0, gt=0.0, le=8.0)

    _names = field_validator("layers")(_check_layer_pairs)


def _logits_method(value: Any) -> str:
    # A mapping without ``method`` is Hinton KD, so ``logits: {temperature: 4}`` reads naturally.
    return value.get("method", "kd") if isinstance(value, dict) else getattr(value, "method", "kd")


LogitsConfig = tagged_union({"kd": KDConfig, "dkd": DKDConfig}, _logits_method, "logits.method must be 'kd' or 'dkd'")


class DistillConfig(Config):
    """A distillation objective: a logit term, optional feature terms, and where teacher outputs come from.

    Attributes:
        logits: :class:`KDConfig` (``method: kd``) or :class:`DKDConfig` (``method: dkd``);
            it also sets the weight of the hard-label loss.
        hints: FitNets hint term, or None.
        attention: attention-transfer term, or None.
        teacher_outputs: ``auto`` caches the teacher's outputs once and reuses them every
            epoch when the training inputs are the same every epoch (no random
            augmentation) and the cache fits in ``cache_max_mb``, otherwise runs the teacher
            online; ``cached`` requires the cache (an error when it is not possible);
            ``online`` runs the teacher on every batch.
        cache_format: ``fp16`` (logits shifted so the largest is 0, then half precision),
            ``fp32`` (exact), or ``topk`` (the ``cache_top_k`` largest logits in fp16 and one
            value per sample standing for all the others, which keeps their total probability
            at T = 1; smaller when there are many classes). Feature maps for hints and
            attention are stored as fp16 unless ``fp32`` is asked for.
        cache_top_k: logits kept per sample with ``topk``.
        cache_max_mb: with ``auto``, the largest in-memory cache (logits plus feature maps)
            built before falling back to online.

    Example:
        >>> from torchslim.distill import DistillConfig, DKDConfig, HintConfig
        >>> cfg = DistillConfig(logits=DKDConfig(), hints=HintConfig())
        >>> cfg.describe()["method"]
        'dkd+hints'
    """

    logits: LogitsConfig = Field(default_factory=KDConfig)
    hints: HintConfig | None = None
    attention: AttentionConfig | None = None
    teacher_outputs: Literal["auto", "cached", "online"] = "auto"
    cache_format: Literal["fp16", "fp32", "topk"] = "fp16"
    cache_top_k: int = Field(5, ge=1)
    cache_max_mb: float = Field(2048.0, gt=0.0)

    def teacher_layers(self) -> tuple[str, ...]:
        """Teacher modules whose outputs the feature terms need, in a fixed order."""
        names: list[str] = []
        for term in (self.hints, self.attention):
            if term is not None:
                names += [t for t in term.layers.values() if t not in names]
        return tuple(names)

    def weights(self) -> dict[str, float]:
        """The weight of every loss part, keyed like the logged parts (``task_loss``, ``kd_loss``, ...)."""
        if isinstance(self.logits, KDConfig):
            out = {"task_loss": self.logits.alpha, "kd_loss": 1.0 - self.logits.alpha}
        else:
            out = {"task_loss": self.logits.task_weight, "tckd_loss": self.logits.tckd_weight,
                   "nckd_loss": self.logits.nckd_weight}
        if self.hints is not None:
            out["hint_loss"] = self.hints.weight
        if self.attention is not None:
            out["attention_loss"] = self.attention.weight
        return out

    def describe(self) -> dict[str, Any]:
        """What a report needs: method name, temperature, alpha (Hinton KD) and per-part weights."""
        method = "+".join([self.logits.method] + [name for name, term in
                                                  (("hints", self.hints), ("attention", self.attention))
                                                  if term is not None])
        out: dict[str, Any] = {"method": method, "temperature": self.logits.temperature}
        if isinstance(self.logits, KDConfig):
            out["alpha"] = self.logits.alpha
        out["weights"] = self.weights()
        if self.hints is not None:
            out["hint_layers"] = dict(self.hints.layers)
        if self.attention is not None:
            out["attention_layers"] = dict(self.attention.layers)
        out["teacher_outputs"] = self.teacher_outputs
        return out


def as_distill_config(config: KDConfig | DKDConfig | DistillConfig) -> DistillConfig:
    """Wrap a bare logit config in a :class:`DistillConfig` (defaults for everything else)."""
    if isinstance(config, DistillConfig):
        return config
    if isinstance(config, (KDConfig, DKDConfig)):
        return DistillConfig(logits=config)
    raise TypeError(f"expected KDConfig, DKDConfig or DistillConfig, got {type(config).__name__}")
