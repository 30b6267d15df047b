"""Unstructured magnitude pruning: importance, selection and masks kept apart.

* importance: :func:`magnitude_scores` (|w|; L1 and L2 rank single weights alike);
* selection: :func:`mask_by_count` / :func:`mask_by_threshold`, pure functions
  ``mask = f(scores, previous_mask, ...)`` that never bring back a pruned weight;
* masks: :mod:`torchslim.prune.masks`.

"Prune the weights whose importance is below the threshold" means exactly that:
a weight is kept when its score is >= the threshold and removed when below.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from torchslim.config import Config
from torchslim.prune.masks import apply_mask_, effective_weight, get_mask
from torchslim.prune.selection import check_pattern, select_layers


class MagnitudePruning(Config):
    """Prune the smallest-magnitude weights, to a target sparsity or below a threshold.

    Attributes:
        sparsity: fraction of the selected weights to remove, in [0, 1). Exclusive with ``threshold``.
        threshold: remove weights with ``|w| < threshold``. Exclusive with ``sparsity``.
        scope: ``"global"`` ranks all selected weights together (layers end with different
            sparsities); ``"layer"`` gives each layer the same sparsity.
        layer_types: module types to prune (``Linear``, ``Conv1d``, ``Conv2d``, ``Conv3d``).
        include: names or ``re:`` regexes; when non-empty only matching layers are pruned.
        exclude: names or ``re:`` regexes of layers never pruned (wins over ``include``).

    Example:
        >>> import torchslim as ts
        >>> model = ts.models.create("lenet300_100")
        >>> ts.prune_(model, ts.MagnitudePruning(sparsity=0.9, scope="global"))
        >>> round(ts.prune.global_sparsity(model), 2)
        0.9
    """

    sparsity: float | None = Field(None, ge=0.0, lt=1.0)
    threshold: float | None = Field(None, ge=0.0)
    scope: Literal["global", "layer"] = "global"
    layer_types: list[str] = Field(default_factory=lambda: ["Linear", "Conv2d"], min_length=1)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_target(self) -> "MagnitudePruning":
        if (self.sparsity is None) == (self.threshold is None):
            raise ValueError("set exactly one of 'sparsity' and 'threshold'")
        for p in self.include + self.exclude:
            check_pattern(p)
        return self


def magnitude_scores(module: nn.Module) -> torch.Tensor:
    """Importance of each weight of ``module``: the absolute value of the weight in use."""
    return effective_weight(module).detach().abs()


def mask_by_count(scores: torch.Tensor, n_prune: int, previous_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mask that removes the ``n_prune`` lowest-scoring entries (ties broken by position).

    Entries already removed by ``previous_mask`` stay removed and count toward ``n_prune``.
    """
    flat = scores.flatten().clone().float()
    if previous_mask is not None:
        flat[previous_mask.flatten() == 0] = -float("inf")
        n_prune = max(n_prune, int((previous_mask == 0).sum()))
    mask = torch.ones_like(flat)
    if n_prune > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:n_prune]] = 0.0
    return mask.view_as(scores)


def mask_by_threshold(scores: torch.Tensor, threshold: float, previous_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mask that keeps entries with ``score >= threshold`` (and not already removed)."""
    mask = (scores >= threshold).to(scores.dtype)
    if previous_mask is not None:
        mask = mask * (previous_mask != 0).to(scores.dtype)
    return mask


def prune_(model: nn.Module, config: MagnitudePruning) -> None:
    """Prune ``model`` in place with masks, as ``config`` says.

    The masked model keeps training normally (pruned weights stay exactly zero);
    call :func:`torchslim.prune.finalize_` to make the zeros permanent.
    """
    layers = select_layers(model, config.layer_types, config.include, config.exclude)
    if not layers:
        from torchslim.errors import ConfigError

        raise ConfigError(
            "no layer matched the pruning selection "
            f"(layer_types={config.layer_types}, include={config.include}, exclude={config.exclude})"
        )
    scores = [magnitude_scores(m) for _, m in layers]
    previous = [get_mask(m) for _, m in layers]
    if config.threshold is not None:
        masks = [mask_by_threshold(s, config.threshold, p) for s, p in zip(scores, previous)]
    elif config.scope == "layer":
        masks = [mask_by_count(s, round(config.sparsity * s.numel()), p) for s, p in zip(scores, previous)]
    else:
        # Global: rank every selected weight together, then split the mask back per layer.
        flat_prev = None
        if any(p is not None for p in previous):
            flat_prev = torch.cat([(p if p is not None else torch.ones_like(s)).flatten() for s, p in zip(scores, previous)])
        flat_scores = torch.cat([s.flatten() for s in scores])
        flat_mask = mask_by_count(flat_scores, round(config.sparsity * flat_scores.numel()), flat_prev)
        masks = list(torch.split(flat_mask, [s.numel() for s in scores]))
        masks = [m.view_as(s) for m, s in zip(masks, scores)]
    for (_, module), mask in zip(layers, masks):
        apply_mask_(module, mask)
