"""Importance criteria: how much each weight matters, as a tensor of scores.

A criterion is a pure function ``scores = criterion(module, name, context)``
returning a tensor shaped like the module's weight; a larger score means more
important. Criteria are looked up by name in :data:`CRITERIA`, filled by the
:func:`register_criterion` decorator beside each one, so a config names a
criterion with a plain string and a user adds one without touching torchslim::

    @register_criterion("abs_cubed")
    def abs_cubed(module, name, context):
        return effective_weight(module).detach().abs() ** 3

    prune_(model, UnstructuredPruning(criterion="abs_cubed", sparsity=0.9))

Built in:

* ``l1`` -- ``|w|``; ``l2`` -- ``w**2``. They rank single weights alike, and differ
  once scores are averaged over a unit (``structural=True``).
* ``taylor`` -- first-order Taylor / gradient sensitivity ``|w * dL/dw|``, averaged
  over ``taylor_batches`` batches (the absolute value taken per batch), after
  Molchanov et al. (2017/2019).
* ``snip`` -- SNIP connection sensitivity (Lee et al., 2019): ``|w * g|`` with ``g`` the
  gradient of the loss summed over the batches *before* the absolute value,
  normalized to sum to 1 over all scored layers. Call it on an untrained model
  to prune at initialization, as the paper does.
* ``random`` -- uniform random scores, seeded per layer: the control every paper reports.

Gradient criteria read an :class:`ImportanceContext`, built once per pruning
call by :meth:`ImportanceContext.from_data` (the model is left exactly as it
was: gradients go through ``torch.autograd.grad``, buffers such as BatchNorm
statistics are restored, and the global RNG is not advanced).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn

from torchslim.errors import ConfigError
from torchslim.prune.masks import effective_weight, is_masked


@dataclass
class ImportanceContext:
    """What criteria may read beyond the module itself.

    Attributes:
        seed: seeds the ``random`` criterion (each layer also mixes in its name).
        taylor: per layer name, the mean over batches of ``|w * dL/dw|``.
        grad: per layer name, the mean over batches of ``dL/dw`` (for ``snip``).
        batches: how many batches the gradient statistics were accumulated over.
        snip_total: sum of unnormalized SNIP scores over all layers (SNIP normalizes by it).
    """

    seed: int = 0
    taylor: dict[str, torch.Tensor] = field(default_factory=dict)
    grad: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    snip_total: float = 1.0

    @property
    def has_gradients(self) -> bool:
        """True when gradient statistics were collected."""
        return self.batches > 0

    @classmethod
    def from_data(
        cls,
        model: nn.Module,
        layers: list[tuple[str, nn.Module]],
        data: object,
        *,
        batches: int = 8,
        batch_size: int = 128,
        objective: Callable | None = None,
        seed: int = 0,
    ) -> "ImportanceContext":
        """Accumulate gradient statistics of ``layers`` over ``batches`` batches of ``data``.

        Args:
            model: the model; left unchanged (parameters, ``.grad``, buffers, mode, RNG).
            layers: the ``(name, module)`` pairs to score.
            data: anything with ``x`` and ``y`` tensors (a :class:`~torchslim.data.TensorSplit`).
            batches: number of batches; fewer when ``data`` is smaller.
            batch_size: samples per batch.
            objective: ``objective(model, x, y) -> (logits, {"loss": ...})`` as in
                :func:`torchslim.train.fit`; default cross-entropy.
            seed: picks which samples form the batches (a seeded permutation).

        Returns:
            A context with ``taylor`` and ``grad`` filled for every layer.

        Example:
            >>> import torch, torchslim as ts
            >>> from torchslim.prune import ImportanceContext, select_layers
            >>> model = ts.models.create("lenet300_100", input_size=8, hidden1=16, hidden2=8)
            >>> from types import SimpleNamespace
            >>> split = SimpleNamespace(x=torch.randn(64, 1, 8, 8), y=torch.arange(64) % 10)
            >>> ctx = ImportanceContext.from_data(model, select_layers(model), split, batches=2, batch_size=16)
            >>> ctx.batches, tuple(ctx.taylor["classifier.0"].shape)
            (2, (16, 64))
        """
        from torchslim.train.loop import CrossEntropyObjective

        objective = objective or CrossEntropyObjective()
        x_all, y_all = data.x, data.y  # type: ignore[attr-defined]
        n = len(y_all)
        if n == 0:
            raise ConfigError("gradient criteria need data, and the split given is empty")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        params = [getattr(m, "weight_orig") if is_masked(m) else m.weight for _, m in layers]
        taylor = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        grad = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        device = params[0].device if params else torch.device("cpu")
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        was_training = model.training
        count = 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            # Train mode, as during training (dropout, batch statistics); the buffers
            # it updates (BatchNorm running stats) are put back below.
            model.train()
            try:
                for b in range(batches):
                    idx = order[b * batch_size:(b + 1) * batch_size]
                    if len(idx) == 0:
                        break
                    x, y = x_all[idx].to(device), y_all[idx].to(device)
                    _, parts = objective(model, x, y)
                    grads = torch.autograd.grad(parts["loss"], params, allow_unused=True)
                    for i, ((_, module), g) in enumerate(zip(layers, grads)):
                        if g is None:
                            continue
                        g = g.detach().float()
                        w = effective_weight(module).detach().float()
                        taylor[i] += (w * g).abs()
                        grad[i] += g
                    count += 1
            finally:
                model.train(was_training)
                with torch.no_grad():
                    for k, v in model.named_buffers():
                        if k in buffers:
                            v.copy_(buffers[k])
        count = max(count, 1)
        ctx = cls(seed=seed, batches=count)
        for (name, module), t, g in zip(layers, taylor, grad):
            ctx.taylor[name] = t / count
            ctx.grad[name] = g / count
        total = sum(float((effective_weight(m).detach().float() * ctx.grad[n]).abs().sum()) for n, m in layers)
        ctx.snip_total = total if total > 0 else 1.0
        return ctx


class Criterion(Protocol):
    """``scores = criterion(module, name, context)``: a tensor shaped like ``module.weight``."""

    def __call__(self, module: nn.Module, name: str, context: ImportanceContext) -> torch.Tensor: ...


CRITERIA: dict[str, Criterion] = {}
#: Criteria that read gradient statistics (and so need data).
GRADIENT_CRITERIA: set[str] = set()


def register_criterion(name: str, *, needs_gradients: bool = False) -> Callable[[Criterion], Criterion]:
    """Register ``fn`` as the criterion called ``name`` (a decorator).

    Args:
        name: the name configs use (``UnstructuredPruning(criterion=name)``).
        needs_gradients: the criterion reads ``context.taylor``/``context.grad``, so
            pruning with it needs data.

    Example:
        >>> import torchslim as ts
        >>> from torchslim.prune import register_criterion, effective_weight
        >>> @register_criterion("doc_abs")
        ... def doc_abs(module, name, context):
        ...     return effective_weight(module).detach().abs()
        >>> ts.prune.UnstructuredPruning(criterion="doc_abs", sparsity=0.5).criterion
        'doc_abs'
    """
    def decorate(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        if needs_gradients:
            GRADIENT_CRITERIA.add(name)
        else:
            GRADIENT_CRITERIA.discard(name)
        return fn

    return decorate


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name`` (ConfigError listing the known ones otherwise)."""
    if name not in CRITERIA:
        raise ConfigError(f"unknown importance criterion {name!r}; known: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


def _needs_context(name: str, context: ImportanceContext) -> None:
    if not context.has_gradients or name not in context.taylor:
        raise ConfigError(f"layer {name!r}: this criterion needs gradient statistics; pass data to prune_")


@register_criterion("l1")
def l1_scores(module: nn.Module, name: str, context: ImportanceContext) -> torch.Tensor:
    """``|w|`` of the weight in use."""
    return effective_weight(module).detach().abs().float()


@register_criterion("l2")
def l2_scores(module: nn.Module, name: str, context: ImportanceContext) -> torch.Tensor:
    """``w**2`` of the weight in use."""
    return effective_weight(module).detach().float().pow(2)


@register_criterion("lamp")
def lamp_scores(module: nn.Module, name: str, context: ImportanceContext) -> torch.Tensor:
    """LAMP (Lee et al., ICLR 2021): ``w_u**2 / sum(w_v**2 for |w_v| >= |w_u|)`` within the layer.

    Each weight's square is divided by the mass of the weights at least as large in
    its own layer, so scores are comparable across layers: a global threshold on them
    leaves every layer a share of its largest weights, where a global threshold on
    ``|w|`` empties layers with small weights. The largest weight of a layer scores 1.
    """
    w2 = effective_weight(module).detach().float().pow(2).flatten()
    order = torch.argsort(w2)
    sorted_w2 = w2[order]
    # tail[i] = sum of sorted_w2[i:], the mass at or above the i-th smallest weight.
    tail = sorted_w2.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(w2)
    scores[order] = sorted_w2 / tail.clamp_min(torch.finfo(torch.float32).tiny)
    return scores.view_as(effective_weight(module))


@register_criterion("taylor", needs_gradients=True)
def taylor_scores(module: nn.Module, name: str, context: ImportanceContext) -> torch.Tensor:
    """First-order Taylor sensitivity ``|w * dL/dw|``, averaged over the context's batches."""
    _needs_context(name, context)
    # Pruned weights have w = 0 and so score 0; the previous mask keeps them pruned anyway.
    return context.taylor[name].clone()


@register_criterion("snip", needs_gradients=True)
def snip_scores(module: nn.Module, name: str, context: ImportanceContext) -> torch.Tensor:
    """SNIP connection sensitivity ``|w * g| / sum(|w * g|)`` with ``g`` the mean gradient."""
    _needs_context(name, context)
    return (effective_weight(module).detach().float() * context.grad[name]).abs() / context.snip_total


@register_criterion("random")
def random_scores(module: nn.Module, name: str, context: ImportanceContext) -> torch.Tensor:
    """Uniform random scores, the same for the same ``(context.seed, layer name)``."""
    w = effective_weight(module)
    generator = torch.Generator().manual_seed(context.seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.rand(w.shape, generator=generator).to(w.device)


def unit_mean_scores(scores: torch.Tensor) -> torch.Tensor:
    """Give every weight the mean ``|score|`` of its output unit (row / filter).

    Dimension 0 indexes output units (``Linear``: rows; ``Conv``: filters), so
    whole units rank together: the structural score, where a unit's importance is
    the mean of the scores of the weights connected to it.

    Example:
        >>> unit_mean_scores(torch.tensor([[1.0, -3.0], [0.5, 0.5]])).tolist()
        [[2.0, 2.0], [0.5, 0.5]]
    """
    flat = scores.abs().reshape(scores.shape[0], -1).mean(dim=1)
    return flat.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores).clone()


def compute_scores(
    layers: list[tuple[str, nn.Module]],
    criterion: str,
    context: ImportanceContext,
    *,
    structural: bool = False,
) -> list[torch.Tensor]:
    """Scores of every layer under ``criterion`` (optionally averaged per output unit)."""
    fn = get_criterion(criterion)
    out = []
    for name, module in layers:
        s = fn(module, name, context)
        w = effective_weight(module)
        if tuple(s.shape) != tuple(w.shape):
            raise ConfigError(f"criterion {criterion!r} returned shape {tuple(s.shape)} for layer {name!r}, "
                              f"expected {tuple(w.shape)}")
        s = s.detach().float().to(w.device)
        out.append(unit_mean_scores(s) if structural else s)
    return out
