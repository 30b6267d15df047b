"""What a search must achieve (:class:`Budget`) and what it may change (:class:`SearchSpace`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from torchslim.config import Config


class Budget(Config):
    """The goal of :func:`torchslim.search.search`: exactly one objective.

    Either an accuracy budget (``max_drop``: latency is minimised among the plans
    that lose at most that many points), or a cost bound (``latency``,
    ``size_bytes`` or ``macs``: accuracy is maximised among the plans that meet it).
    Every number compared with the budget is measured, never predicted: latency is
    the end-to-end latency of the exported file in ``runtime``.

    Attributes:
        max_drop: largest accuracy loss, in absolute percentage points (0.5 = 94.6% → 94.1%),
            against the dense model on the validation split.
        latency: largest latency as a fraction of the dense model's, measured in ``runtime``
            at ``batch`` (0.25 = 4× faster).
        size_bytes: largest serialized size of the compressed model: the bytes of the file that
            ships, written and measured (the fp32 ONNX file, the int8 one for an int8 point, the
            packed ``.slim`` file for a point of the sparsity / weight-sharing axes).
        macs: largest MACs as a fraction of the dense model's.
        batch: samples per timed run.
        runtime: ``"ort"`` (ONNX Runtime, CPU, the deployment runtime) or ``"torch"`` (eager).
        threads: intra-op threads of every timed run (pinned, so points compare).
        latency_budget_s: seconds of timed work per latency measurement (more: less noise).

    Example:
        >>> from torchslim.search import Budget
        >>> Budget(max_drop=0.5).objective
        'max_drop'
        >>> Budget(latency=0.25, batch=64).objective
        'latency'
    """

    max_drop: float | None = Field(None, ge=0.0, le=100.0)
    latency: float | None = Field(None, gt=0.0, le=1.0)
    size_bytes: int | None = Field(None, ge=1)
    macs: float | None = Field(None, gt=0.0, le=1.0)
    batch: int = Field(256, ge=1, le=65536)
    runtime: Literal["ort", "torch"] = "ort"
    threads: int = Field(1, ge=1, le=256)
    latency_budget_s: float = Field(0.5, gt=0.0, le=60.0)

    @model_validator(mode="after")
    def _one_objective(self) -> "Budget":
        set_ = [k for k in ("max_drop", "latency", "size_bytes", "macs") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("set exactly one of 'max_drop' (latency minimised) and 'latency', 'size_bytes', "
                             f"'macs' (accuracy maximised); got {set_ or 'none'}")
        return self

    @property
    def objective(self) -> str:
        """The field that is set: ``max_drop``, ``latency``, ``size_bytes`` or ``macs``."""
        return next(k for k in ("max_drop", "latency", "size_bytes", "macs") if getattr(self, k) is not None)

    def describe(self) -> str:
        """The budget in words, for messages and reports."""
        where = f"{'ONNX Runtime' if self.runtime == 'ort' else 'torch eager'}, batch {self.batch}"
        if self.max_drop is not None:
            return f"accuracy drop <= {self.max_drop:g} points, latency minimised ({where})"
        if self.latency is not None:
            return f"latency <= {self.latency:g}x of the dense model ({where}), accuracy maximised"
        if self.size_bytes is not None:
            return f"size <= {self.size_bytes:,} bytes, accuracy maximised"
        return f"MACs <= {self.macs:g}x of the dense model, accuracy maximised"


class SearchSpace(Config):
    """What the search may change, per coupled channel group.

    Per group, the fraction of its channels kept; the precision of the whole file (every
    measured channel plan also quantized to static int8 in ONNX Runtime and measured as that
    file, see :mod:`~torchslim.search.precision`); and, for a size budget, per Conv/Linear
    layer, unstructured sparsity and weight-sharing bits, measured as the packed ``.slim``
    file (:mod:`~torchslim.search.packed`).

    Attributes:
        keep: fractions of each group's channels that may be kept (1.0 = untouched is
            always added). Kept counts are rounded to ``round_to``; ratios that round
            to the same count are one choice.
        round_to: kept channel counts are multiples of this (8 suits SIMD kernels); a
            group smaller than it is left whole.
        exclude: layer names or ``re:`` patterns of groups never cut: a group is excluded
            when the layer writing its channels (or one only it contains, e.g. its
            BatchNorm) matches; the layers that merely read them do not count.
        importance: which channels go inside a group (see
            :class:`~torchslim.prune.structured.ChannelPruning`); ``"taylor"`` is not
            offered because it needs gradients per trial.
        bn_batches: training batches used to re-estimate BatchNorm statistics after a cut.
        bn_batch_size: samples per such batch.
        sensitivity_samples: validation samples used for the per-group sensitivity.
        lambdas: points of the Lagrangian sweep (trade-offs between drop and latency).
        max_candidates: most plans of the sweep that are built and measured.
        precision: the precisions a point may have: ``["fp32"]``, ``["int8"]`` (the dense fp32
            model stays as the reference) or both; None (default): both when ONNX Runtime's
            quantization can be imported and the budget's runtime is ``"ort"``, else fp32.
            Each int8 point costs one quantization, one ONNX Runtime evaluation of the
            validation split and one timing.
        int8_calibration_samples: training inputs int8 is calibrated on (a seeded subset, as
            the ``quantize`` stage draws it).
        int8_layers: ``"all"`` (every Conv/Linear of an int8 point int8) or ``"sweep"`` (the
            dense model's layers measured one by one first; those int8 does not pay for stay
            float in every int8 point, and in the recipe's ``quantize.method.exclude``).
        sparsity: per-layer fractions of the weights that may be pruned (magnitude, layer by
            layer; 0 is always a choice). None (default): ``[0.5, 0.75, 0.9, 0.95]`` under a
            size budget, off otherwise; ``[]``: off. Only a size budget may use it: a dense
            runtime is not faster for zeros.
        share_bits: per-layer weight-sharing bits that may be chosen (k-means codebooks of
            ``2 ** bits`` centroids; float is always a choice). None (default): ``[8, 5, 4, 3]``
            under a size budget when ``sparsity`` is None too, off otherwise; ``[]``: off.
        packed_bases: channel plans the two axes above are searched on: the dense model and
            ``packed_bases - 1`` fp32 plans spread over the latency front. Each costs one
            per-layer table (a layer's every choice scored on the sensitivity subset).

    Example:
        >>> from torchslim.search import SearchSpace
        >>> SearchSpace(keep=[1.0, 0.5, 0.25], round_to=8).keep
        [1.0, 0.5, 0.25]
    """

    keep: list[float] = Field(default_factory=lambda: [1.0, 0.75, 0.5, 0.375, 0.25])
    round_to: int = Field(1, ge=1, le=1024)
    exclude: list[str] = Field(default_factory=list)
    importance: Literal["l1", "l2", "bn", "random"] = "l2"
    bn_batches: int = Field(8, ge=0, le=10000)
    bn_batch_size: int = Field(128, ge=1)
    sensitivity_samples: int = Field(2000, ge=1)
    lambdas: int = Field(48, ge=2, le=10000)
    max_candidates: int = Field(12, ge=1, le=1000)
    precision: list[Literal["fp32", "int8"]] | None = None
    int8_calibration_samples: int = Field(512, ge=1, le=1_000_000)
    int8_layers: Literal["all", "sweep"] = "all"
    sparsity: list[float] | None = None
    share_bits: list[int] | None = None
    packed_bases: int = Field(2, ge=1, le=64)

    @model_validator(mode="after")
    def _check_keep(self) -> "SearchSpace":
        if not self.keep:
            raise ValueError("keep must list at least one fraction")
        for k in self.keep:
            if not 0.0 < k <= 1.0:
                raise ValueError(f"keep fractions must be in (0, 1], got {k}")
        for v in self.sparsity or []:
            if not 0.0 < v < 1.0:
                raise ValueError(f"sparsity choices must be in (0, 1) (0, unpruned, is always a choice), got {v}")
        for b in self.share_bits or []:
            if not 1 <= b <= 12:
                raise ValueError(f"share_bits choices must be in 1..12 (float is always a choice), got {b}")
        if self.precision is not None and (not self.precision or len(set(self.precision)) != len(self.precision)):
            raise ValueError(f"precision must list 'fp32' and/or 'int8' once each (or be None: both when "
                             f"available), got {self.precision}")
        return self


def feasible(p: Any, budget: Budget, dense: Any) -> bool:
    """Whether a measured point (a :class:`~torchslim.search.Point`) meets the budget; ``dense``: the dense point."""
    if budget.max_drop is not None:
        return p.drop <= budget.max_drop + 1e-9
    if budget.latency is not None:
        return p.latency_ratio <= budget.latency
    if budget.size_bytes is not None:
        return p.bytes <= budget.size_bytes
    return p.macs <= budget.macs * dense.macs


def violation(p: Any, budget: Budget, dense: Any) -> float:
    """How far a point is outside the budget, relative to the bound (0 inside)."""
    if budget.max_drop is not None:
        return max(0.0, p.drop - budget.max_drop)
    if budget.latency is not None:
        return max(0.0, p.latency_ratio / budget.latency - 1)
    if budget.size_bytes is not None:
        return max(0.0, p.bytes / budget.size_bytes - 1)
    return max(0.0, p.macs / (budget.macs * dense.macs) - 1)
