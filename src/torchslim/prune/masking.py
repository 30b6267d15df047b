"""Selection: pure functions that turn scores (and the previous mask) into a mask.

Every function here is ``mask = f(scores, ..., previous_mask)``: it never
modifies its inputs, returns 1 for kept and 0 for removed entries, and never
brings back an entry the previous mask removed (those count as already pruned).

* :func:`mask_by_count` -- remove the ``n`` lowest scores (ties by position);
* :func:`mask_by_threshold` -- remove scores below a threshold;
* :func:`han_threshold` / :func:`mask_by_han` -- Han et al.'s rule,
  threshold = quality x standard deviation of the layer's weights;
* :func:`global_masks` -- rank several layers together to an exact total,
  with a minimum kept per layer;
* :func:`layer_prune_count` -- how many entries a per-layer target removes;
* :func:`mask_n_m` / :func:`is_n_m_sparse` -- N:M semi-structured sparsity.
"""

from __future__ import annotations

import warnings

import torch

from torchslim.errors import ConfigError


def _pruned(previous_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if previous_mask is None else previous_mask == 0


def mask_by_count(scores: torch.Tensor, n_prune: int, previous_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mask that removes the ``n_prune`` lowest-scoring entries (ties broken by position).

    Entries already removed by ``previous_mask`` stay removed and count toward ``n_prune``.

    Example:
        >>> mask_by_count(torch.tensor([3.0, 1.0, 2.0, 4.0]), 2).tolist()
        [1.0, 0.0, 0.0, 1.0]
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
    """Mask that keeps entries with ``score >= threshold`` (and not already removed).

    Example:
        >>> mask_by_threshold(torch.tensor([0.1, 0.5, 0.9]), 0.5).tolist()
        [0.0, 1.0, 1.0]
    """
    mask = (scores >= threshold).to(scores.dtype)
    if previous_mask is not None:
        mask = mask * (previous_mask != 0).to(scores.dtype)
    return mask


def layer_prune_cap(numel: int, min_kept: int, previous_mask: torch.Tensor | None = None) -> int:
    """The most entries a layer may lose: all but ``min_kept`` (or what is already gone, if more)."""
    already = 0 if previous_mask is None else int((previous_mask == 0).sum())
    return max(min(numel, max(numel - min_kept, 0)), already)


def layer_prune_count(numel: int, sparsity: float, min_kept: int = 0, previous_mask: torch.Tensor | None = None) -> int:
    """Entries to remove for ``sparsity`` of ``numel``, capped so ``min_kept`` stay.

    Example:
        >>> layer_prune_count(10, 0.95), layer_prune_count(10, 0.95, min_kept=2)
        (10, 8)
    """
    return min(round(sparsity * numel), layer_prune_cap(numel, min_kept, previous_mask))


def keep_at_least(mask: torch.Tensor, scores: torch.Tensor, min_kept: int,
                  previous_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mask``, or, if it keeps fewer than ``min_kept`` entries, the ``min_kept`` best of them.

    Entries the previous mask removed are never brought back, even to honour ``min_kept``.
    """
    if int(mask.sum()) >= min_kept:
        return mask
    return mask_by_count(scores, layer_prune_cap(scores.numel(), min_kept, previous_mask), previous_mask)


def han_threshold(weight: torch.Tensor, quality: float) -> float:
    """Han et al.'s threshold: ``quality`` x the standard deviation of the layer's weights.

    The standard deviation is taken over the whole weight tensor as the model
    computes with it (already-pruned zeros included), as Distiller does.
    """
    return float(quality * weight.detach().float().std())


def mask_by_han(weight: torch.Tensor, quality: float, previous_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keep weights with ``|w| >= quality * std(w)`` (Han et al., 2015).

    Example:
        >>> w = torch.tensor([1.0, -1.0, 0.1, -0.1])
        >>> mask_by_han(w, 1.0).tolist()  # std = 0.82
        [1.0, 1.0, 0.0, 0.0]
    """
    return mask_by_threshold(weight.detach().abs().float(), han_threshold(weight, quality), previous_mask)


def global_masks(
    scores: list[torch.Tensor],
    n_prune: int,
    previous_masks: list[torch.Tensor | None] | None = None,
    min_kept: int = 0,
) -> list[torch.Tensor]:
    """Masks that remove the ``n_prune`` lowest scores over all layers together.

    Each layer keeps at least ``min_kept`` entries; what a full layer cannot take
    goes to the next-lowest scores of the other layers, so the total removed is
    exactly ``n_prune`` whenever the layers can hold it (a warning says when not).
    Entries removed by a previous mask stay removed and count toward ``n_prune``.

    Example:
        >>> a, b = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6.0])
        >>> [m.tolist() for m in global_masks([a, b], 3, min_kept=1)]
        [[0.0, 0.0, 1.0], [0.0, 1.0]]
    """
    if not scores:
        return []
    previous_masks = previous_masks or [None] * len(scores)
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.flatten().float() for s in scores]).clone()
    already = []
    offset = 0
    for s, p in zip(scores, previous_masks):
        if p is not None:
            seg = p.flatten() == 0
            flat[offset:offset + s.numel()][seg.to(flat.device)] = -float("inf")
            already.append(int(seg.sum()))
        else:
            already.append(0)
        offset += s.numel()
    n_prune = max(n_prune, sum(already))
    caps = torch.tensor([layer_prune_cap(n, min_kept, p) for n, p in zip(sizes, previous_masks)])
    layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    sorted_layer = layer_of[torch.argsort(flat.cpu(), stable=True)]

    # Water-filling: take the lowest scores; a layer that would lose more than its
    # cap is fixed at its cap and leaves the pool; repeat with what is left.
    active = torch.ones(len(sizes), dtype=torch.bool)
    counts = torch.zeros(len(sizes), dtype=torch.long)
    remaining = n_prune
    while True:
        pool = sorted_layer[active[sorted_layer]]
        take = pool[:remaining]
        taken = torch.bincount(take, minlength=len(sizes))
        over = active & (taken > caps)
        if not bool(over.any()):
            counts[active] = taken[active]
            remaining -= int(taken[active].sum())
            break
        counts[over] = caps[over]
        remaining -= int(caps[over].sum())
        active &= ~over
    if remaining > 0:
        warnings.warn(f"global pruning could remove only {n_prune - remaining} of {n_prune} weights: "
                      f"every layer keeps at least min_kept={min_kept}", stacklevel=3)
    return [mask_by_count(s, int(c), p) for s, c, p in zip(scores, counts.tolist(), previous_masks)]


def _groups_view(t: torch.Tensor, m: int) -> torch.Tensor:
    """``t`` with its input dimension (dim 1) last, cut into groups of ``m``: shape (..., m)."""
    if t.dim() < 2:
        raise ConfigError(f"N:M sparsity needs a weight with an input dimension, got shape {tuple(t.shape)}")
    moved = t.movedim(1, -1)
    if moved.shape[-1] % m != 0:
        raise ConfigError(f"N:M sparsity: input dimension {moved.shape[-1]} is not a multiple of M={m}")
    return moved.reshape(-1, m)


def mask_n_m(scores: torch.Tensor, n: int, m: int, previous_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs.

    Groups run along the input dimension: a ``Linear`` weight ``[out, in]`` is cut
    along ``in``; a convolution ``[out, in, kh, kw]`` along its input channels at
    each kernel position (the layout sparse tensor cores use). Previously
    removed entries are never kept, so a group may end with fewer than ``n``.

    Example:
        >>> mask_n_m(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4).tolist()
        [[1.0, 0.0, 1.0, 0.0]]
    """
    groups = _groups_view(scores.float(), m).clone()
    alive = None
    if previous_mask is not None:
        alive = _groups_view((previous_mask != 0).float(), m)
        groups[alive == 0] = -float("inf")
    order = torch.argsort(groups, dim=1, descending=True, stable=True)
    keep = torch.zeros_like(groups)
    keep.scatter_(1, order[:, :n], 1.0)
    if alive is not None:
        keep = keep * alive
    moved_shape = scores.movedim(1, -1).shape
    return keep.reshape(moved_shape).movedim(-1, 1).contiguous().to(scores.dtype)


def is_n_m_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of ``weight`` holds at most ``n`` nonzeros.

    Example:
        >>> is_n_m_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4)
        True
    """
    groups = _groups_view(weight.detach(), m)
    return bool(((groups != 0).sum(dim=1) <= n).all())
