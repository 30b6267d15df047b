"""Weight sharing: Deep Compression's trained quantization (Han, Mao & Dally, ICLR 2016).

Each chosen layer's *surviving* weights (unmasked, or nonzero when the layer
carries no mask) are clustered by 1-D k-means into ``k = 2 ** bits`` centroids
(linear initialisation over ``[min, max]`` by default, which the paper found
best); each weight is replaced by its centroid and pruned weights stay exactly
zero. The layer then computes with ``weight = codebook[codes]`` (zero where
pruned): the codebook is the trainable parameter, so training with
:func:`torchslim.train.fit` (or distilling with a
:class:`~torchslim.distill.DistillObjective`) fine-tunes the centroids, and a
centroid's gradient is the sum of its weights' gradients (the backward pass of
the gather). :func:`finalize_sharing_` bakes the weights back into plain
tensors (and the masks back into ``torch.nn.utils.prune``'s convention), keeping
every layer's codebook on ``model.torchslim_codebooks`` for the report.

While shared, a layer holds ``<attr>_codebook`` (parameter, ``(k,)``) and
``<attr>_codes`` (int16 buffer shaped like the weight, ``-1`` where pruned), and
a forward pre-hook recomputes ``<attr>`` before every forward, as the pruning
hook does; a checkpoint taken by ``fit`` then resumes into a model shared the
same way. The layer carries no mask meanwhile: the pruned positions are the
``-1`` codes, and :func:`finalize_sharing_` puts the mask back.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.quant.sharing import WeightSharing, share_weights_, finalize_sharing_
    >>> model = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
    >>> ts.prune_(model, ts.prune.MagnitudePruning(sparsity=0.8))
    >>> share_weights_(model, WeightSharing(linear_bits=3))
    >>> # ... fit(model, train, TrainConfig(...)) fine-tunes the centroids ...
    >>> books = finalize_sharing_(model)
    >>> len(torch.unique(model.classifier[0].weight[model.classifier[0].weight != 0])) <= 8
    True
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator
from torch.nn.utils import prune as torch_prune

from torchslim.config import Config
from torchslim.core.masks import apply_mask_, get_mask, is_masked
from torchslim.errors import ConfigError

#: Layer types weight sharing knows, and whether each counts as ``conv`` or ``linear`` for the bits.
LAYER_TYPES: dict[str, tuple[type[nn.Module], str]] = {
    "Linear": (nn.Linear, "linear"),
    "Conv1d": (nn.Conv1d, "conv"),
    "Conv2d": (nn.Conv2d, "conv"),
    "Conv3d": (nn.Conv3d, "conv"),
}
#: Attribute of a model holding the codebooks :func:`finalize_sharing_` baked (tensor name -> info).
CODEBOOKS_ATTR = "torchslim_codebooks"
_MAX_BITS = 12  # codes are int16; the packed form's Huffman tables stay small


def _matches(name: str, pattern: str) -> bool:
    # A copy of prune.selection's rule (exact name, or a fully matching "re:" regex):
    # quant must not import prune, since export reads packed files through quant.
    return re.fullmatch(pattern[3:], name) is not None if pattern.startswith("re:") else name == pattern


def _check_pattern(pattern: str) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"bad regular expression in layer pattern {pattern!r}: {exc}") from None


class WeightSharing(Config):
    """Per-layer k-means weight sharing (Deep Compression's trained quantization).

    Attributes:
        conv_bits: bits per weight of convolutions (``2 ** bits`` centroids); the paper
            keeps AlexNet lossless with 8.
        linear_bits: bits per weight of Linear layers; 5 in the paper (fully connected
            layers hold to about 2).
        overrides: per-layer bits by exact module name or ``re:`` regex; ``None`` leaves
            the layer float. An exact name wins over every regex; among regexes the first
            match (in the mapping's order) wins. A pattern matching no layer is an error.
        init: centroid initialisation: ``linear`` (evenly over ``[min, max]`` of the
            surviving weights, the paper's choice), ``density`` (at quantiles of their
            distribution) or ``random`` (``k`` of the weights, seeded).
        iterations: most k-means (Lloyd) iterations; it stops earlier when no weight
            changes cluster. 0 keeps the initial centroids (nearest-centroid rounding).
        layer_types: module types to share (``Linear``, ``Conv1d``, ``Conv2d``, ``Conv3d``).
        exclude: names or ``re:`` regexes of layers left float (wins over ``overrides``).
        bias_bits: share the biases of the shared layers too, each layer's bias with its
            own codebook of ``2 ** bias_bits`` centroids, fine-tuned like the weights; None
            keeps biases float. Biases are few, but once the weights are pruned and coded
            their raw fp32 bytes are a visible part of a packed file (1,640 of LeNet-300-100's
            ~25 KB), and a few bits each lose nothing measurable.
        seed: seeds the ``random`` initialisation.

    Example:
        >>> WeightSharing(linear_bits=4, overrides={"re:features\\\\..*": 6}).init
        'linear'
    """

    conv_bits: int = Field(8, ge=1, le=_MAX_BITS)
    linear_bits: int = Field(5, ge=1, le=_MAX_BITS)
    overrides: dict[str, int | None] = Field(default_factory=dict)
    init: Literal["linear", "density", "random"] = "linear"
    iterations: int = Field(50, ge=0, le=10_000)
    layer_types: list[str] = Field(default_factory=lambda: ["Linear", "Conv2d"], min_length=1)
    exclude: list[str] = Field(default_factory=list)
    bias_bits: int | None = Field(None, ge=1, le=_MAX_BITS)
    seed: int = Field(0, ge=0)

    @field_validator("layer_types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        for t in v:
            if t not in LAYER_TYPES:
                raise ValueError(f"unknown layer type {t!r}; known: {', '.join(LAYER_TYPES)}")
        return v

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            _check_pattern(p)
        return v

    @field_validator("overrides")
    @classmethod
    def _override_bits(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        for pattern, bits in v.items():
            _check_pattern(pattern)
            if bits is not None and not 1 <= bits <= _MAX_BITS:
                raise ValueError(f"bits for {pattern!r} must be in 1..{_MAX_BITS} or null, got {bits}")
        return v


# ---------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------


def kmeans_1d(values: torch.Tensor, k: int, *, init: str = "linear", iterations: int = 50,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means (Lloyd) of ``values`` into at most ``k`` clusters.

    Args:
        values: 1-D tensor of the weights to cluster.
        k: most clusters.
        init: ``linear`` | ``density`` | ``random`` (see :class:`WeightSharing`).
        iterations: most Lloyd iterations.
        seed: seeds ``random``.

    Returns:
        ``(centroids, codes)``: the used centroids, sorted ascending, in ``values``'
        dtype (clusters left empty are dropped), and each value's centroid index
        (int64). With at most ``k`` distinct values the centroids are exactly those
        values, so nothing is rounded.
    """
    if values.dim() != 1:
        raise ValueError(f"kmeans_1d clusters a 1-D tensor, got shape {tuple(values.shape)}")
    if values.numel() == 0:
        return values.new_zeros(0), torch.zeros(0, dtype=torch.long, device=values.device)
    distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
    if distinct.numel() <= k:
        return distinct, inverse
    v = values.detach().double()
    if init == "linear":
        c = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64, device=v.device)
    elif init == "density":
        # Quantiles by sorting (torch.quantile refuses tensors of more than 2**24 elements).
        ranks = torch.linspace(0, v.numel() - 1, k, device=v.device).round().long()
        c = v.sort().values[ranks]
    elif init == "random":
        g = torch.Generator().manual_seed(seed)
        c = v[torch.randperm(v.numel(), generator=g)[:k].to(v.device)]
    else:
        raise ValueError(f"unknown k-means initialisation {init!r}")
    c = c.sort().values
    codes = None
    for _ in range(max(iterations, 0) + 1):
        # Sorted centroids: the nearest one is found by the midpoints between them.
        new = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        if codes is not None and torch.equal(new, codes):
            break
        codes = new
        counts = torch.bincount(codes, minlength=c.numel()).double()
        sums = torch.zeros_like(c).index_add_(0, codes, v)
        squares = torch.zeros_like(c).index_add_(0, codes, v * v)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        c = _split_into_empty(c, counts, sums, squares).sort().values
        if iterations == 0:
            break
    codes = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
    used = torch.unique(codes, sorted=True)
    remap = torch.full((c.numel(),), -1, dtype=torch.long, device=v.device)
    remap[used] = torch.arange(used.numel(), device=v.device)
    return c[used].to(values.dtype), remap[codes]


def _split_into_empty(c: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor,
                      squares: torch.Tensor) -> torch.Tensor:
    """Move each empty cluster's centroid into the cluster of largest squared error, splitting it.

    Linear initialisation over ``[min, max]`` of pruned weights puts centroids in the
    gap around zero where no weight survives; without this they stay empty and the
    layer uses fewer than ``2 ** bits`` values.
    """
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return c
    c = c.clone()
    var = (squares / counts.clamp(min=1) - (sums / counts.clamp(min=1)) ** 2).clamp(min=0)
    sse = var * counts
    for e in empty:
        j = int(sse.argmax())
        if sse[j] <= 0:
            break
        half = 0.5 * float(var[j].sqrt())
        c[e], c[j] = c[j] + half, c[j] - half
        sse[j] = sse[e] = sse[j] / 4  # roughly what each half keeps; enough to spread the next splits
    return c


# ---------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------


def _bits_for(name: str, kind: str, config: WeightSharing) -> int | None:
    if any(_matches(name, p) for p in config.exclude):
        return None
    if name in config.overrides:
        return config.overrides[name]
    for pattern, bits in config.overrides.items():
        if pattern.startswith("re:") and _matches(name, pattern):
            return bits
    return config.conv_bits if kind == "conv" else config.linear_bits


def _candidates(model: nn.Module, config: WeightSharing) -> list[tuple[str, nn.Module, str]]:
    types = [LAYER_TYPES[t] for t in config.layer_types]
    out = []
    for name, module in model.named_modules():
        kind = next((kind for cls, kind in types if isinstance(module, cls)), None)
        if kind is not None:
            out.append((name, module, kind))
    return out


def check_sharing(model: nn.Module, config: WeightSharing) -> None:
    """Raise when an ``overrides`` or ``exclude`` pattern matches no layer, or nothing would be shared.

    Raises:
        ConfigError: naming the field, the pattern and a few layers that exist.
    """
    names = [n for n, _, _ in _candidates(model, config)]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    what = "/".join(config.layer_types)
    for field, patterns in (("overrides", list(config.overrides)), ("exclude", config.exclude)):
        missing = [p for p in patterns if not any(_matches(n, p) for n in names)]
        if missing:
            raise ConfigError(f"weight sharing {field}: {', '.join(map(repr, missing))} match no {what} layer of "
                              f"the model; layers that exist: {shown or 'none'}")
    if not sharing_layers(model, config):
        raise ConfigError(f"weight sharing selects no layer (layer_types {config.layer_types}, exclude "
                          f"{config.exclude}); {what} layers that exist: {shown or 'none'}")


def sharing_layers(model: nn.Module, config: WeightSharing) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, bits)`` of every layer ``config`` shares, in model order."""
    out = []
    for name, module, kind in _candidates(model, config):
        bits = _bits_for(name, kind, config)
        if bits is not None and not is_shared(module):
            out.append((name, module, bits))
    return out


class SharedWeight:
    """Forward pre-hook recomputing ``module.<attr> = codebook[codes]`` (zero where ``codes == -1``).

    Attributes:
        attr: the weight's attribute name (``"weight"``).
        bits: the configured bits (``2 ** bits`` centroids at most).
        masked: whether the weight carried a pruning mask, restored by :func:`finalize_sharing_`.
    """

    def __init__(self, attr: str, bits: int, masked: bool):
        self.attr, self.bits, self.masked = attr, bits, masked

    def compute(self, module: nn.Module) -> torch.Tensor:
        """The weight from the module's codebook and codes (differentiable in the codebook)."""
        codebook = getattr(module, f"{self.attr}_codebook")
        codes = getattr(module, f"{self.attr}_codes")
        weight = codebook[codes.clamp(min=0).long()]
        return torch.where(codes >= 0, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        setattr(module, self.attr, self.compute(module))


class _DetachAfterForward:
    """Forward hook: leave a graph leaf in ``module.<attr>`` once the forward is done.

    The computed weight is not a leaf, and ``copy.deepcopy`` refuses non-leaf
    tensors; the autograd graph keeps its own reference, so backward is unaffected.
    """

    def __init__(self, attr: str):
        self.attr = attr

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        setattr(module, self.attr, getattr(module, self.attr).detach())


def is_shared(module: nn.Module, attr: str = "weight") -> bool:
    """True when ``module.<attr>`` is computed from a codebook (between sharing and finalizing)."""
    return any(isinstance(h, SharedWeight) and h.attr == attr for h in module._forward_pre_hooks.values())


def _hooks(module: nn.Module) -> list[SharedWeight]:
    """The module's sharing hooks (its weight's, then its bias's when that is shared too)."""
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, SharedWeight)]


def shared_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs with a weight (or bias) currently computed from a codebook."""
    return [(n, m) for n, m in model.named_modules() if _hooks(m)]


def _share_layer_(module: nn.Module, bits: int, config: WeightSharing, attr: str = "weight") -> None:
    masked = is_masked(module, attr)
    with torch.no_grad():
        if masked:
            keep = get_mask(module, attr) != 0
            torch_prune.remove(module, attr)  # weight = orig * mask, a plain parameter again
        weight = getattr(module, attr)
        if not masked:
            keep = weight != 0
        centroids, codes = kmeans_1d(weight.detach()[keep], 1 << bits, init=config.init,
                                     iterations=config.iterations, seed=config.seed)
        if centroids.numel() == 0:  # every weight pruned: one unused centroid keeps indexing valid
            centroids = weight.new_zeros(1)
        full = torch.full(weight.shape, -1, dtype=torch.int16, device=weight.device)
        full[keep] = codes.to(torch.int16)
    del module._parameters[attr]
    module.register_parameter(f"{attr}_codebook", nn.Parameter(centroids.detach().clone()))
    module.register_buffer(f"{attr}_codes", full)
    hook = SharedWeight(attr, bits, masked)
    module.register_forward_pre_hook(hook)
    module.register_forward_hook(_DetachAfterForward(attr))
    with torch.no_grad():
        setattr(module, attr, hook.compute(module))


def share_weights_(model: nn.Module, config: WeightSharing | None = None) -> None:
    """Cluster each chosen layer's surviving weights and make its codebook the trainable parameter, in place.

    Afterwards every chosen layer computes with at most ``2 ** bits`` distinct
    nonzero weights and its pruned weights are exactly zero. Train the model as
    usual (``fit``, ``distill``) to fine-tune the centroids, then call
    :func:`finalize_sharing_` before saving it.

    Args:
        model: the model (dense, masked, or with pruned weights already zero).
        config: which layers, how many bits, how to initialise (default :class:`WeightSharing`).

    Raises:
        ConfigError: an ``overrides``/``exclude`` pattern matches no layer, or no layer is selected.
    """
    config = config or WeightSharing()
    check_sharing(model, config)
    for _, module, bits in sharing_layers(model, config):
        _share_layer_(module, bits, config)
        if config.bias_bits is not None and isinstance(getattr(module, "bias", None), torch.Tensor):
            _share_layer_(module, config.bias_bits, config, "bias")


@dataclass(frozen=True)
class LayerCodebook:
    """One layer's shared weights after :func:`finalize_sharing_`.

    Attributes:
        bits: the configured bits per weight.
        codebook: the centroids, ascending (1-D tensor).
        codes: index of each weight's centroid, ``-1`` where pruned (int16, weight-shaped).
    """

    bits: int
    codebook: torch.Tensor
    codes: torch.Tensor


def codebooks(model: nn.Module) -> dict[str, LayerCodebook]:
    """The codebook and codes of every shared layer (while shared), by weight name (``"fc.weight"``)."""
    out = {}
    for name, module in shared_layers(model):
        for hook in _hooks(module):
            out[f"{name}.{hook.attr}" if name else hook.attr] = LayerCodebook(
                hook.bits, getattr(module, f"{hook.attr}_codebook").detach().clone(),
                getattr(module, f"{hook.attr}_codes").clone())
    return out


def finalize_sharing_(model: nn.Module) -> dict[str, LayerCodebook]:
    """Bake every shared layer's weights into plain tensors, in place; masks come back as masks.

    A layer that was masked when shared gets its mask back (``weight_orig`` and
    ``weight_mask``, pruned positions as before); the others get a plain
    ``weight`` parameter with zeros where pruned. The model then saves and loads
    as any (``ts.save``, :func:`torchslim.quant.pack.pack`).

    Returns:
        The codebooks by weight name (also kept on ``model.torchslim_codebooks`` as
        ``{"bits", "codebook"}`` lists, which :func:`torchslim.quant.pack.pack` reports).
    """
    books = codebooks(model)
    for _, module in shared_layers(model):
        for hook in _hooks(module):
            _finalize_layer_(module, hook)
    info = dict(getattr(model, CODEBOOKS_ATTR, None) or {})
    info.update({k: {"bits": b.bits, "codebook": b.codebook.tolist()} for k, b in books.items()})
    setattr(model, CODEBOOKS_ATTR, info)
    return books


def _finalize_layer_(module: nn.Module, hook: SharedWeight) -> None:
    """Bake one shared tensor (``hook.attr``) of ``module`` back into a plain parameter (or a mask)."""
    attr = hook.attr
    with torch.no_grad():
        weight = hook.compute(module).detach().clone()
        keep = getattr(module, f"{attr}_codes") >= 0
    for handle, h in list(module._forward_pre_hooks.items()):
        if h is hook:
            del module._forward_pre_hooks[handle]
    for handle, h in list(module._forward_hooks.items()):
        if isinstance(h, _DetachAfterForward) and h.attr == attr:
            del module._forward_hooks[handle]
    del module._parameters[f"{attr}_codebook"]
    del module._buffers[f"{attr}_codes"]
    if attr in module.__dict__:
        delattr(module, attr)
    module.register_parameter(attr, nn.Parameter(weight))
    if hook.masked:
        apply_mask_(module, keep.to(weight.dtype), attr)


def sharing_summary(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per shared layer (while shared): bits, centroids used, surviving weights and total weights."""
    out = {}
    for name, book in codebooks(model).items():
        kept = int((book.codes >= 0).sum())
        used = int(torch.unique(book.codes[book.codes >= 0]).numel())
        out[name] = {"bits": book.bits, "centroids": used, "kept": kept, "weights": book.codes.numel(),
                     "effective_bits": math.log2(used) if used > 1 else 0.0}
    return out
