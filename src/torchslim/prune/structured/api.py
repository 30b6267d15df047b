"""``prune_channels``: structured pruning that returns a genuinely smaller dense model."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from torchslim.config import Config
from torchslim.errors import ConfigError
from torchslim.prune.selection import check_pattern, check_patterns_match
from torchslim.prune.structured.graph import DependencyGraph, Unsupported, build_dependency_graph
from torchslim.prune.structured.history import HISTORY_ATTR, get_history
from torchslim.prune.structured.importance import unit_scores
from torchslim.prune.structured.selection import by_ratio, by_target, group_limits, lowest, normalize
from torchslim.prune.structured.surgery import apply_ops_

class ChannelPruning(Config):
    """Remove whole channels (filters, neurons, heads) so the model becomes smaller and faster.

    Set one of ``ratio``, ``target_macs`` and ``target_params``; ``ratio`` is 0.5
    unless a target is given.

    Attributes:
        ratio: fraction of the prunable channels to remove, in [0, 1), split between
            groups as ``scope`` says.
        target_macs: fraction of the model's MACs to keep, in (0, 1) (0.5 halves them).
            Each step plans the final cut on fresh scores (the least important channels,
            split as ``scope`` says, the most that still meets the target after rounding)
            and removes ``1 / (steps left)`` of it; the last step removes the rest.
        target_params: number of parameters to reach, the same way.
        scope: ``"layer"`` (default) cuts every group by the same fraction (for a target,
            the fraction that meets it, found by bisection); ``"global"`` ranks all groups
            together on mean-normalized scores, so layers end with different widths. On
            Fashion-MNIST at 2x fewer MACs ``"layer"`` fine-tuned to higher accuracy (see
            benchmarks/README.md).
        importance: ``"l1"``, ``"l2"`` (norm of all the weights a channel owns in its
            coupled layers), ``"bn"`` (BatchNorm |gamma|, network slimming), ``"taylor"``
            (activation x gradient on ``data``) or ``"random"``.
        steps: pruning steps; importance is recomputed (and the ``finetune`` callback
            called) after each. With ``ratio`` each step removes ``1 - (1 - ratio) ** (1 / steps)``
            of what is left; with a target, see ``target_macs``. Only the final widths are
            rounded to ``round_to``.
        round_to: kept channel counts are rounded to a multiple of this (8 suits SIMD
            kernels); a group smaller than it is left whole.
        max_ratio: no group loses more than this fraction of its original channels.
        overrides: ``{pattern: ratio}`` per group (a name or ``re:`` regex matching any
            layer of the group; an exact name wins over patterns, then the first matching
            pattern in order). With ``ratio`` the group
            loses exactly that fraction, outside the global ranking; with a target it
            loses at most that fraction. ``0`` keeps the group whole.
        exclude: names or ``re:`` regexes of modules never pruned. A known layer keeps its
            output channels; any other module is kept opaque (not traced into), which
            also gets past code torch.fx cannot trace. Exclusion beats overrides.
        allow_layernorm: also prune channels a LayerNorm normalizes over (its statistics
            then change, so the result is no longer equal to the masked model).
        calibration_batches: batches of ``data`` for ``"taylor"`` importance.
        batch_size: samples per calibration batch.
        seed: for ``"random"`` importance and the calibration batches.

    Example:
        >>> from torchslim.prune.structured import ChannelPruning
        >>> ChannelPruning(target_macs=0.5, importance="l2", steps=4, round_to=8).steps
        4
        >>> ChannelPruning(ratio=0.3, overrides={"re:features\\\\.0": 0.0}).scope
        'layer'
    """

    ratio: float | None = Field(0.5, ge=0.0, lt=1.0)
    target_macs: float | None = Field(None, gt=0.0, lt=1.0)
    target_params: int | None = Field(None, ge=1)
    scope: Literal["global", "layer"] = "layer"
    importance: Literal["l1", "l2", "bn", "taylor", "random"] = "l2"
    steps: int = Field(1, ge=1, le=1000)
    round_to: int = Field(1, ge=1, le=1024)
    max_ratio: float = Field(0.9, gt=0.0, lt=1.0)
    overrides: dict[str, float] = Field(default_factory=dict)
    exclude: list[str] = Field(default_factory=list)
    allow_layernorm: bool = False
    calibration_batches: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _target_replaces_ratio(cls, data: Any) -> Any:
        if isinstance(data, dict) and "ratio" not in data and (
                data.get("target_macs") is not None or data.get("target_params") is not None):
            data = {**data, "ratio": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> "ChannelPruning":
        if sum(x is not None for x in (self.ratio, self.target_macs, self.target_params)) != 1:
            raise ValueError("set exactly one of 'ratio', 'target_macs' and 'target_params'")
        for pattern, r in self.overrides.items():
            check_pattern(pattern)
            if not 0.0 <= r < 1.0:
                raise ValueError(f"overrides[{pattern!r}] must be in [0, 1), got {r}")
        for pattern in self.exclude:
            check_pattern(pattern)
        return self


@dataclass
class PruningReport:
    """What :func:`prune_channels` did (:attr:`ChannelPruningResult.report`).

    Attributes:
        macs_before / macs_after: ``torchslim.measure.count_macs`` on the example inputs
            (with attention's fused fast path off, so attention is counted).
        params_before / params_after: parameter counts.
        steps: per step: ``macs``, ``params``, ``removed`` (units removed per group, named
            by the group's first layer in graph order) and ``aim`` (the final MACs or params
            target each step plans towards; None for a ratio).
        unsupported: ops and modules the dependency graph could not handle; the channels
            around them were left unpruned.
        frozen: ``(layers, reason)`` for channels that had to stay, from the first step.
        target_met: False when a MACs / params target could not be reached.
    """

    macs_before: int
    params_before: int
    macs_after: int = 0
    params_after: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    unsupported: list[Unsupported] = field(default_factory=list)
    frozen: list[tuple[list[str], str]] = field(default_factory=list)
    target_met: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class ChannelPruningResult:
    """What :func:`prune_channels` returns.

    Attributes:
        model: the pruned model, a new ordinary ``nn.Module`` (the input is unchanged);
            it carries ``torchslim_spec`` and ``torchslim_history`` for
            :func:`torchslim.export.save`.
        report: what was removed and what it cost, a :class:`PruningReport`.
    """

    model: nn.Module
    report: PruningReport


def check_channel_names(model: nn.Module, example_inputs: Any, config: ChannelPruning) -> None:
    """Raise when an ``exclude`` or ``overrides`` name or pattern of ``config`` matches nothing in ``model``.

    ``exclude`` may name any module, parameter or buffer (an opaque block, a
    ``scale`` parameter). ``overrides`` apply to channel groups, so with
    ``example_inputs`` they are matched against the layers of the traced
    dependency graph (a name of a ReLU or a Sequential matches no group);
    with ``example_inputs=None`` against every module and parameter name.
    :func:`prune_channels` calls this before it prunes.

    Raises:
        ConfigError: naming the field and the pattern, and listing a few names that exist.
        ModelError: with ``example_inputs``, the model cannot be traced.
    """
    names = _check_exclude(model, config)
    if not config.overrides:
        return
    if example_inputs is None:
        check_patterns_match(names, list(config.overrides), "overrides", "module or parameter",
                             plural="modules and parameters")
        return
    _check_overrides_in(build_dependency_graph(model, example_inputs, exclude=config.exclude,
                                               allow_layernorm=config.allow_layernorm), config)


def _check_exclude(model: nn.Module, config: ChannelPruning) -> list[str]:
    """Exclude patterns must name a module, parameter or buffer; returns those names, in model order."""
    names = [n for n, _ in model.named_modules() if n]
    names += [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    check_patterns_match(names, config.exclude, "exclude", "module or parameter", plural="modules and parameters")
    return names


def _check_overrides_in(graph: DependencyGraph, config: ChannelPruning) -> None:
    """Overrides must name a layer the graph reads or writes channels of, else they would do nothing."""
    names = list(dict.fromkeys(name for name, _ in graph.slot_sizes))
    check_patterns_match(names, list(config.overrides), "overrides", "prunable layer")


def _ops_for(graph: DependencyGraph, removed: dict[int, list[int]]) -> list[dict[str, Any]]:
    """The surgery ops that remove the chosen units, slot by slot in graph order."""
    gone: dict[tuple[str, str], set[int]] = {}
    for g, units in removed.items():
        group = graph.groups[g]
        for u in units:
            for slot, idx in group.units[u].items():
                gone.setdefault(slot, set()).update(idx)
    ops = []
    for slot, size in graph.slot_sizes.items():
        if slot in gone:
            ops.append({"target": slot[0], "role": slot[1], "size": size, "removed": sorted(gone[slot])})
    return ops


def _label(group: Any) -> str:
    """The group's first slot in graph order: the layer that writes its channels."""
    return next(iter(group.units[0]))[0]


def _count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """MACs (attention included, see :func:`~torchslim.measure.count_macs`) and parameters."""
    from torchslim.measure.counting import count_macs, count_parameters

    return count_macs(model, example_inputs), count_parameters(model)


def prune_channels(
    model: nn.Module,
    example_inputs: Any,
    config: ChannelPruning,
    data: Any = None,
    *,
    finetune: Callable[[nn.Module], Any] | None = None,
) -> ChannelPruningResult:
    """Remove channels of ``model``; the result holds a new, smaller, ordinary ``nn.Module`` and a report.

    The model is traced with torch.fx (:func:`~torchslim.prune.structured.build_dependency_graph`)
    to find which channels must go together (residual adds, concatenations,
    flatten into linear, depthwise and grouped convs, attention heads); each group's
    channels are scored (``config.importance``), the least important are chosen
    (``config.ratio`` or a MACs / params target) and the layers are rebuilt without
    them. The result has no masks or hooks; it computes what the original computes
    with those channels zeroed. Model outputs (the classifier's classes) are never
    pruned; ops the graph cannot see through are left alone and listed in the report.

    ``model`` is not changed. The pruned model carries ``torchslim_spec`` (unchanged)
    and ``torchslim_history`` (the removed indices, for :func:`torchslim.export.save`);
    what was done comes back beside it as a :class:`PruningReport`.

    Args:
        model: any torch.fx-traceable model (excluded submodules may be untraceable).
        example_inputs: a tensor or tuple of tensors (batch first) the model runs on;
            MACs are counted on them.
        config: what to remove.
        data: for ``importance="taylor"``: an object with input tensor ``x`` and labels ``y``
            (a :class:`torchslim.data` split).
        finetune: called with the pruned model after every step (including the last),
            e.g. ``lambda m: finetune(m, splits.train, TrainConfig(epochs=1), teacher=model)``.

    Returns:
        A :class:`ChannelPruningResult`: ``.model`` (the pruned model) and ``.report``.

    Raises:
        ConfigError: ``"taylor"`` without ``data``, or an ``exclude`` / ``overrides``
            pattern that matches nothing (:func:`check_channel_names`).
        ModelError: torch.fx cannot trace the model (the message names the op and
            what to exclude), or it fails on ``example_inputs``.

    Example:
        >>> import torch, torchslim as ts
        >>> from torchslim.prune.structured import ChannelPruning, prune_channels
        >>> model = ts.models.create("fmnist_teacher", width=8, fc=32)
        >>> x = torch.randn(1, 1, 28, 28)
        >>> result = prune_channels(model, x, ChannelPruning(target_macs=0.5, steps=2))
        >>> ts.measure.count_macs(result.model, x) <= 0.5 * ts.measure.count_macs(model, x)
        True
        >>> result.report.target_met
        True
    """
    if not isinstance(config, ChannelPruning):
        raise ConfigError(f"config must be a ChannelPruning, got {type(config).__name__}")
    if config.importance == "taylor" and data is None:
        raise ConfigError("importance 'taylor' needs data: pass data= (an object with tensors x and y)")
    _check_exclude(model, config)  # overrides are checked on the first step's graph, below
    pruned = copy.deepcopy(model)
    history = get_history(model)
    macs0, params0 = _count(pruned, example_inputs)
    report = PruningReport(macs_before=macs0, params_before=params0)
    original_sizes: dict = {}
    overrides = dict(config.overrides)
    macs, params = macs0, params0
    for step in range(config.steps):
        graph = build_dependency_graph(pruned, example_inputs, exclude=config.exclude,
                                       allow_layernorm=config.allow_layernorm)
        if step == 0:
            _check_overrides_in(graph, config)
            original_sizes = {g.slots: len(g) for g in graph.groups}
            report.unsupported = list(graph.unsupported)
            report.frozen = [(sorted({n for n, _ in f.slots}), f.reason) for f in graph.frozen]
        scores = unit_scores(pruned, graph, config.importance, data=data, batches=config.calibration_batches,
                             batch_size=config.batch_size, seed=config.seed + step)
        limits = group_limits(graph, original_sizes, config.max_ratio, overrides)
        aim = None
        if config.ratio is not None:
            step_ratio = 1.0 - (1.0 - config.ratio) ** (1.0 / config.steps)
            removed = by_ratio(normalize(scores), limits, step_ratio, config.scope, config.round_to)
        else:
            kind = "macs" if config.target_macs is not None else "params"
            now = macs if kind == "macs" else params
            aim = macs0 * config.target_macs if kind == "macs" else float(config.target_params)
            # The graph models the layers it can prune; everything else costs the same after the cut.
            offset = now - (graph.macs if kind == "macs" else graph.params)

            def cost(removed: dict[int, list[int]], kind: str = kind, offset: float = offset) -> float:
                return offset + graph.cost(removed, kind)

            # Plan the final cut on the current scores; this step takes 1/(steps left) of it,
            # the least important units first, and the next step re-plans on fresh scores.
            removed, _ = by_target(normalize(scores), limits, config.round_to, cost, aim, config.scope)
            left = config.steps - step
            if left > 1:
                removed = {g: lowest(scores[g], math.ceil(len(u) / left)) for g, u in removed.items()}
        ops = _ops_for(graph, removed)
        if ops:
            apply_ops_(pruned, ops)
            history.append({"ops": ops})
        macs, params = _count(pruned, example_inputs)
        report.steps.append({
            "step": step + 1, "macs": macs, "params": params, "aim": aim,
            "removed": {_label(graph.groups[g]): len(u) for g, u in removed.items()},
        })
        if finetune is not None:
            finetune(pruned)
    report.macs_after, report.params_after = macs, params
    if config.target_macs is not None:
        report.target_met = macs <= macs0 * config.target_macs * (1 + 1e-9)
    elif config.target_params is not None:
        report.target_met = params <= config.target_params
    if not report.target_met:
        warnings.warn(
            f"channel pruning could not reach its target: {macs:,} MACs / {params:,} params left "
            f"(max_ratio={config.max_ratio}, {len(report.unsupported)} unsupported ops, "
            f"{sum(1 for _ in report.frozen)} frozen channel sets); see the result's report",
            stacklevel=2,
        )
    setattr(pruned, HISTORY_ATTR, history)
    return ChannelPruningResult(pruned, report)


def finetune(
    model: nn.Module,
    train: Any,
    config: Any = None,
    *,
    teacher: nn.Module | None = None,
    kd: Any = None,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Fine-tune a pruned model in place with :func:`torchslim.train.fit`, optionally distilling.

    With ``teacher`` (typically the unpruned model) the objective is
    :class:`torchslim.distill.KDObjective` (Hinton loss, ``kd`` or ``KDConfig()``);
    without it, plain cross-entropy.

    Args:
        model: the pruned model, trained in place.
        train: training split (``x``, ``y``).
        config: a :class:`torchslim.TrainConfig` (default ``TrainConfig()``: one epoch).
        teacher: the model to distill from (frozen for the duration), or None.
        kd: a :class:`torchslim.KDConfig` (only with ``teacher``).
        **fit_kwargs: passed to ``fit`` (``val=``, ``seed=``, ``device=``, ``progress=``, ...).

    Returns:
        ``fit``'s per-epoch records.

    Example:
        Prune in four steps, distilling from the unpruned model for an epoch after each::

            small = prune_channels(model, x, ChannelPruning(target_macs=0.5, steps=4),
                                   finetune=lambda m: finetune(m, splits.train, ts.TrainConfig(epochs=1),
                                                               teacher=model)).model
    """
    from torchslim.distill import KDConfig, KDObjective
    from torchslim.train import TrainConfig, fit

    config = config if config is not None else TrainConfig()
    objective = None
    if teacher is not None:
        objective = KDObjective(copy.deepcopy(teacher).eval(), kd if kd is not None else KDConfig(),
                                config.label_smoothing)
    elif kd is not None:
        raise ConfigError("finetune: kd= needs a teacher=")
    stage = fit_kwargs.pop("stage", "finetune")
    return fit(model, train, config, objective=objective, stage=stage, **fit_kwargs)
