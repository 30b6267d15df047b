"""Measured CPU latency and accuracy."""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from torchslim.errors import ModelError
from torchslim.measure.counting import eval_mode, finalized_copy

# A measurement aims at about this much timed work, so a tiny model gets many
# repeats and batch 256 of a big one still finishes in about a second.
DEFAULT_BUDGET_S = 1.0
MIN_REPEATS = 5
MAX_REPEATS = 500


def make_batch(example: torch.Tensor | Sequence[int], batch_size: int, seed: int = 0) -> torch.Tensor:
    """An input of ``batch_size`` samples.

    From a shape (one sample, no batch dimension): standard-normal values, seeded.
    From a tensor (batch dimension first): its rows repeated in turn, so dtype
    and value range stay those of real inputs.
    """
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(example, torch.Tensor):
        if example.dim() < 1 or example.shape[0] < 1:
            raise ModelError(f"example tensor must have a non-empty batch dimension first, got shape {tuple(example.shape)}")
        return example.detach().cpu()[torch.arange(batch_size) % example.shape[0]]
    shape = tuple(int(d) for d in example)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *shape), generator=gen)


def measure_latency(
    model: nn.Module,
    example_input_shape_or_tensor: torch.Tensor | Sequence[int],
    batch_size: int = 1,
    *,
    warmup: int = 3,
    repeats: int | None = None,
    threads: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
) -> dict[str, Any]:
    """CPU latency of one forward pass at ``batch_size``, in milliseconds.

    Runs on a finalized, eval-mode CPU deep copy under ``torch.inference_mode``
    (the model passed in is not touched). Zeros left by unstructured pruning run
    on dense kernels, so they do not make this faster; channel pruning does.

    Args:
        model: the model.
        example_input_shape_or_tensor: shape of one sample without the batch
            dimension (``(1, 28, 28)``), or an example tensor with the batch first.
        batch_size: samples per forward pass.
        warmup: untimed passes first (at least one).
        repeats: timed passes; None picks ``budget_s / (time of one pass)``,
            clamped to [5, 500], and stops early (after at least 5) once the
            timed passes have taken twice ``budget_s``.
        threads: ``torch.set_num_threads`` for the measurement (restored after);
            None keeps the current setting.
        budget_s: target seconds of timed work when ``repeats`` is None.

    Returns:
        ``{"batch_size", "median_ms", "p90_ms", "min_ms", "mean_ms", "repeats", "threads"}``.

    Example:
        >>> import torchslim as ts
        >>> model = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
        >>> result = ts.measure.measure_latency(model, (1, 28, 28), batch_size=32, repeats=5)
        >>> result["median_ms"] > 0
        True
    """
    if repeats is not None and repeats < 1:
        raise ModelError(f"repeats must be >= 1, got {repeats}")
    x = make_batch(example_input_shape_or_tensor, batch_size)
    timed_model = finalized_copy(model).cpu().eval()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            fastest = float("inf")
            for _ in range(max(1, warmup)):
                start = time.perf_counter()
                timed_model(x)
                fastest = min(fastest, time.perf_counter() - start)
            # The fastest warm-up pass, not the last: one pass slowed by another
            # process should not cut the number of repeats.
            n = repeats if repeats is not None else int(np.clip(budget_s / max(fastest, 1e-6), MIN_REPEATS, MAX_REPEATS))
            times = []
            deadline = time.perf_counter() + 2 * budget_s
            for _ in range(n):
                start = time.perf_counter()
                timed_model(x)
                times.append(time.perf_counter() - start)
                # Passes stalled by other processes must not stretch an adaptive
                # measurement far past its budget; the median shrugs them off.
                if repeats is None and len(times) >= MIN_REPEATS and start > deadline:
                    break
            n = len(times)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    ms = np.asarray(times) * 1e3
    return {
        "batch_size": batch_size,
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "repeats": n,
        "threads": used_threads,
    }


def compare_latency(
    models: Mapping[str, nn.Module],
    example_input_shape_or_tensor: torch.Tensor | Sequence[int],
    batch_size: int = 1,
    *,
    warmup: int = 2,
    repeats: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
) -> dict[str, dict[str, Any]]:
    """CPU latency of several models, timed pass by pass in alternation, for fair ratios.

    Timing one model after another lets a burst of load from other processes land
    on one of them; alternating single passes (in a rotating order) exposes every
    model to the same conditions, so ratios between them hold on a busy machine.
    Each model runs as a finalized, eval-mode CPU copy under ``torch.inference_mode``.

    Args:
        models: ``{name: model}``; not changed.
        example_input_shape_or_tensor: as in :func:`measure_latency`.
        batch_size: samples per forward pass.
        warmup: untimed passes of each model first.
        repeats: timed passes of each model; None picks ``budget_s`` over the slowest
            model's fastest warm-up pass, clamped to [5, 500].
        budget_s: target seconds of timed work per model when ``repeats`` is None.

    Returns:
        Per name: ``{"median_ms", "min_ms", "repeats"}``. ``min_ms`` (the fastest pass)
        is the best estimate of a model's own cost: other processes only ever add time.

    Example:
        >>> import torchslim as ts
        >>> big = ts.models.create("lenet300_100", hidden1=64, hidden2=32)
        >>> small = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
        >>> t = compare_latency({"big": big, "small": small}, (1, 28, 28), batch_size=8, repeats=5)
        >>> sorted(t), t["big"]["repeats"]
        (['big', 'small'], 5)
    """
    if not models:
        raise ModelError("compare_latency needs at least one model")
    if repeats is not None and repeats < 1:
        raise ModelError(f"repeats must be >= 1, got {repeats}")
    x = make_batch(example_input_shape_or_tensor, batch_size)
    names = list(models)
    copies = [finalized_copy(models[n]).cpu().eval() for n in names]
    times: list[list[float]] = [[] for _ in names]
    with torch.inference_mode():
        fastest = []
        for m in copies:
            best = float("inf")
            for _ in range(max(1, warmup)):
                start = time.perf_counter()
                m(x)
                best = min(best, time.perf_counter() - start)
            fastest.append(best)
        n = repeats if repeats is not None else int(np.clip(budget_s / max(max(fastest), 1e-6), MIN_REPEATS,
                                                            MAX_REPEATS))
        for r in range(n):
            for k in range(len(copies)):
                i = (k + r) % len(copies)  # rotate, so no model always runs right after another
                start = time.perf_counter()
                copies[i](x)
                times[i].append(time.perf_counter() - start)
    return {name: {"median_ms": float(np.median(t) * 1e3), "min_ms": float(min(t) * 1e3), "repeats": len(t)}
            for name, t in zip(names, times)}


def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in [0, 1].

    Runs without gradients in eval mode, on the model's device, batch by batch;
    the model's train/eval modes are restored afterwards.

    Args:
        model: a classifier returning logits ``(N, num_classes)``.
        x: inputs ``(N, ...)``.
        y: integer labels ``(N,)``.
        batch_size: samples per forward pass.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Linear(4, 3)
        >>> acc = evaluate_accuracy(model, torch.randn(10, 4), torch.randint(0, 3, (10,)))
        >>> 0.0 <= acc <= 1.0
        True
    """
    if len(x) != len(y):
        raise ModelError(f"x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise ModelError("cannot evaluate accuracy on an empty set")
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    correct = 0
    # no_grad, not inference_mode: a masked model's pre-hook stores the weight it
    # computes on the module, and an inference tensor there would break training later.
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size].to(device))
            correct += int((logits.argmax(dim=1).cpu() == y[start:start + batch_size].cpu()).sum())
    return correct / len(x)
