"""Magnitude pruning, the simplest special case of :class:`~torchslim.prune.UnstructuredPruning`.

* importance: :func:`magnitude_scores` (|w|; L1 and L2 rank single weights alike);
* selection: :func:`mask_by_count` / :func:`mask_by_threshold` (now in
  :mod:`torchslim.prune.masking`), pure functions ``mask = f(scores, previous_mask, ...)``
  that never bring back a pruned weight;
* masks: :mod:`torchslim.prune.masks`.

``prune_(model, MagnitudePruning(...))`` is ``prune_(model, as_unstructured(config))``.

"Prune the weights whose importance is below the threshold" means exactly that:
a weight is kept when its score is >= the threshold and removed when below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from torchslim.config import Config
from torchslim.prune.api import prune_, register_pruning_handler
from torchslim.prune.masking import mask_by_count, mask_by_threshold  # noqa: F401  (their historical home)
from torchslim.prune.masks import effective_weight
from torchslim.prune.selection import check_pattern

if TYPE_CHECKING:
    from torchslim.prune.unstructured import UnstructuredPruning


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


def as_unstructured(config: MagnitudePruning) -> "UnstructuredPruning":
    """The :class:`~torchslim.prune.UnstructuredPruning` that ``config`` is the special case of.

    Magnitude pruning is the ``l1`` criterion with no minimum kept per layer.
    """
    from torchslim.prune.unstructured import UnstructuredPruning

    target = {"sparsity": config.sparsity} if config.sparsity is not None else {"threshold": config.threshold}
    return UnstructuredPruning(criterion="l1", scope=config.scope, min_kept=0, layer_types=list(config.layer_types),
                               include=list(config.include), exclude=list(config.exclude), **target)


@register_pruning_handler(MagnitudePruning)
def _prune_magnitude(model: nn.Module, config: MagnitudePruning, data: Any, objective: Any, context: Any) -> None:
    prune_(model, as_unstructured(config))
