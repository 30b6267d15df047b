"""Training-loop throughput: ``torchslim.train.fit`` vs. a minimal hand-written PyTorch loop.

Both sides train the same model (identical initial weights), on the same
in-memory tensors, with the same batch size, optimizer (Adam, lr 1e-3, fit's
default) and per-step cosine LR schedule, in the same process. The hand-written
loop does exactly the per-epoch work ``fit`` must do -- a fresh random
permutation per epoch (seeded like fit's, so both see the same batches), index
the tensors per batch, forward, cross-entropy, zero_grad, backward, step,
scheduler step -- and nothing else (no progress bar, no metrics). ``fit`` runs
with ``progress=False``, no validation and no checkpoint.

Measurements are interleaved (torchslim, handwritten, torchslim, ...), after a
warm-up pair, and the median of the repeats is reported, so machine noise hits
both sides alike. Each measurement trains for a whole number of epochs chosen
from the warm-up so that it lasts about ``--target-seconds``. The warm-up pair
also checks that both loops really do the same work: after one epoch from the
same weights their parameters must agree (``max_param_diff``).

Output: JSON lines on stdout -- one ``"event": "measurement"`` line per timed
run, one ``"event": "model_summary"`` line per model, and a final
``"event": "summary"`` line whose ``ratio`` per model is
``torchslim_samples_per_s / handwritten_samples_per_s`` (medians).

Target: ratio >= 0.9 for every model (``"pass"`` in the summary line).

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/train_throughput.py           # ~1.5 min
    PYTHONPATH=src .venv/bin/python benchmarks/train_throughput.py --quick   # ~20 s
    PYTHONPATH=src .venv/bin/python benchmarks/train_throughput.py --models lenet300_100 --threads 2

Threads: ``--threads`` defaults to 1 (``torch.set_num_threads(1)``): least
noisy on a small shared machine; pass 0 to keep torch's default. Data is
Fashion-MNIST (``load_dataset("fashion-mnist", val_size=5000, train_limit=N)``)
or, if it cannot be found locally or downloaded, scikit-learn's ``digits``; the
output says which (``dataset``). Exit status is 0 whether or not the target is met
(use ``--check`` to exit 1 when it is missed).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchslim
from torchslim.data import load_dataset
from torchslim.models import create
from torchslim.train import fit
from torchslim.train.config import TrainConfig

TARGET_RATIO = 0.9
DEFAULT_MODELS = ("fmnist_student", "lenet300_100")


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line and flush (so partial results survive an interrupt)."""
    print(json.dumps(record, sort_keys=False), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated model presets (torchslim.models.create names)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads value; 0 keeps torch's default")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-limit", type=int, default=None,
                   help="training samples (default 10000, --quick 4096)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed measurements per side and model (default 9, --quick 5)")
    p.add_argument("--target-seconds", type=float, default=None,
                   help="approximate length of one measurement (default 1.5, --quick 0.35)")
    p.add_argument("--order", choices=("abab", "abba"), default="abab",
                   help="interleaving: abab always runs torchslim first in a pair; "
                        "abba swaps the order every other pair")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="dataset to try first; falls back to digits if it is unavailable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a ~20 s run with fewer, shorter measurements")
    p.add_argument("--check", action="store_true", help="exit with status 1 if a ratio is below the target")
    args = p.parse_args(argv)
    args.train_limit = args.train_limit or (4096 if args.quick else 10000)
    args.repeats = args.repeats or (5 if args.quick else 9)
    args.target_seconds = args.target_seconds or (0.35 if args.quick else 1.5)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def load_data(args: argparse.Namespace) -> tuple[str, Any, str | None]:
    """The training split, trying ``args.dataset`` first and falling back to digits."""
    try:
        splits = load_dataset(args.dataset, val_size=5000, train_limit=args.train_limit, seed=args.seed)
        return args.dataset, splits, None
    except Exception as exc:  # noqa: BLE001 -- any failure to get the data means: use the fallback
        reason = f"{type(exc).__name__}: {exc}"
        # digits has 1437 training images; keep a small validation split.
        splits = load_dataset("digits", val_size=200, train_limit=args.train_limit, seed=args.seed)
        return "digits", splits, reason


def handwritten_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                     optimizer_name: str, lr: float, seed: int) -> None:
    """The minimal loop: the same work per step as ``fit``, nothing more."""
    if optimizer_name == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    elif optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = len(y)
    steps = math.ceil(n / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps))
    torch.manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        # Same seeding as torchslim's epoch_permutation, so both loops see the same batches.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def torchslim_loop(model: nn.Module, train: Any, *, epochs: int, batch_size: int,
                   optimizer_name: str, lr: float, seed: int) -> None:
    config = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer_name, lr=lr,
                         momentum=0.9, weight_decay=0.0, schedule="cosine")
    fit(model, train, config, seed=seed, progress=False)


def timed(fn, *a, **kw) -> float:
    gc.collect()
    start = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - start


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(((sa[k].double() - sb[k].double()).abs().max().item() if sa[k].numel() else 0.0) for k in sa)


def bench_model(name: str, train: Any, args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    x, y = train.x, train.y
    n = len(y)
    shape = tuple(x.shape[1:])
    torch.manual_seed(args.seed)
    base = create(name, in_channels=shape[0], input_size=shape[-1], num_classes=int(y.max()) + 1)
    common = dict(batch_size=args.batch_size, optimizer_name=args.optimizer, lr=args.lr, seed=args.seed)
    run = {
        "torchslim": lambda m, e: torchslim_loop(m, train, epochs=e, **common),
        "handwritten": lambda m, e: handwritten_loop(m, x, y, epochs=e, **common),
    }

    # Warm-up: one epoch each from the same weights; doubles as the same-work check.
    warm_models = {impl: copy.deepcopy(base) for impl in run}
    warm_seconds = {impl: timed(run[impl], warm_models[impl], 1) for impl in run}
    diff = max_param_diff(warm_models["torchslim"], warm_models["handwritten"])
    # A second warm-up pass (allocator, kernels, caches); its time calibrates the epoch count.
    warm_seconds = {impl: timed(run[impl], copy.deepcopy(base), 1) for impl in run}
    epoch_seconds = min(warm_seconds.values())
    epochs = max(1, round(args.target_seconds / epoch_seconds))
    emit({"event": "warmup", "model": name, "epoch_seconds": {k: round(v, 4) for k, v in warm_seconds.items()},
          "epochs_per_measurement": epochs, "max_param_diff": diff, "same_result": diff < 1e-4})

    samples = n * epochs
    results: dict[str, list[float]] = {impl: [] for impl in run}
    for rep in range(args.repeats):
        order = ["torchslim", "handwritten"]
        if args.order == "abba" and rep % 2 == 1:
            order.reverse()
        for impl in order:
            model = copy.deepcopy(base)
            seconds = timed(run[impl], model, epochs)
            sps = samples / seconds
            results[impl].append(sps)
            emit({"event": "measurement", "model": name, "impl": impl, "rep": rep, "epochs": epochs,
                  "samples": samples, "seconds": round(seconds, 4), "samples_per_s": round(sps, 1),
                  "ms_per_step": round(1000 * seconds / (epochs * math.ceil(n / args.batch_size)), 4)})

    ts, hw = statistics.median(results["torchslim"]), statistics.median(results["handwritten"])
    pair_ratios = [a / b for a, b in zip(results["torchslim"], results["handwritten"])]
    steps = epochs * math.ceil(n / args.batch_size)
    summary = {
        "event": "model_summary", "model": name, "dataset": dataset, "train_samples": n,
        "batch_size": args.batch_size, "epochs_per_measurement": epochs, "repeats": args.repeats,
        "torchslim_samples_per_s": round(ts, 1), "handwritten_samples_per_s": round(hw, 1),
        "ratio": round(ts / hw, 4), "pair_ratio_median": round(statistics.median(pair_ratios), 4),
        "pair_ratio_min": round(min(pair_ratios), 4), "pair_ratio_max": round(max(pair_ratios), 4),
        # Extra time fit spends per optimizer step, from the medians.
        "overhead_us_per_step": round(1e6 * (samples / ts - samples / hw) / steps, 1),
        "torchslim_ms_per_step": round(1000 * samples / ts / steps, 4),
        "handwritten_ms_per_step": round(1000 * samples / hw / steps, 4),
    }
    emit(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    started = time.perf_counter()
    dataset, splits, fallback_reason = load_data(args)
    header = {
        "event": "config", "dataset": dataset, "train_samples": len(splits.train.y),
        "input_shape": list(splits.train.x.shape[1:]), "models": args.models, "batch_size": args.batch_size,
        "optimizer": args.optimizer, "lr": args.lr, "schedule": "cosine (per step)",
        "threads": torch.get_num_threads(),
        "threads_source": f"--threads {args.threads}" if args.threads > 0 else "torch default",
        "repeats": args.repeats, "order": args.order, "quick": args.quick,
        "torch": torch.__version__, "torchslim": getattr(torchslim, "__version__", "?"),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }
    if fallback_reason:
        header["fallback_reason"] = fallback_reason
    emit(header)

    summaries = {name: bench_model(name, splits.train, args, dataset) for name in args.models}
    ratios = {name: s["ratio"] for name, s in summaries.items()}
    passed = all(r >= TARGET_RATIO for r in ratios.values())
    emit({
        "event": "summary", "dataset": dataset, "threads": torch.get_num_threads(), "target": TARGET_RATIO,
        "ratio": ratios,
        "torchslim_samples_per_s": {k: s["torchslim_samples_per_s"] for k, s in summaries.items()},
        "handwritten_samples_per_s": {k: s["handwritten_samples_per_s"] for k, s in summaries.items()},
        "min_ratio": min(ratios.values()) if ratios else None, "pass": passed,
        "total_seconds": round(time.perf_counter() - started, 1),
    })
    return 1 if (args.check and not passed) else 0


if __name__ == "__main__":
    sys.exit(main())
