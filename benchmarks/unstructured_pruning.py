"""Unstructured pruning of LeNet-300-100 on Fashion-MNIST: torchslim schedules vs torch.nn.utils.prune.

One dense model is trained once; then, for each target sparsity, four methods
get the same fine-tuning budget (``--budget-epochs`` epochs with the same
TrainConfig, starting from the same dense weights):

(a) ``oneshot``   -- torchslim one-shot ``UnstructuredPruning`` + fine-tune;
(b) ``iterative`` -- torchslim ``prune_iteratively`` (``--rounds`` rounds of budget/rounds epochs);
(c) ``agp``       -- torchslim gradual pruning (AGP) during the fine-tuning epochs;
(d) ``torch``     -- ``torch.nn.utils.prune.global_unstructured(L1Unstructured)`` + fine-tune;

and one more torchslim method with the same *total* epochs:

(c') ``agp_train`` -- AGP during training from the same initial weights as the dense
     model, over dense + budget epochs (Zhu & Gupta's setting: prune while training).

Two more torchslim methods distil from the trained dense model (frozen, its logits
on the training split cached once in fp32, so each step costs one table lookup):
Hinton KD, ``--kd-temperature`` (4) and ``--kd-alpha`` (0.1, the weight of the
hard-label loss), through ``DistillObjective`` passed to ``fit`` with the AGP hook:

(e) ``agp_kd``       -- ``agp`` (same budget, same schedule) with KD from the dense model;
(e') ``agp_train_kd`` -- ``agp_train`` (same 32 epochs from the initial weights) with KD
     from the dense model. Fair only if stated: it needs the trained dense model, so
     its real cost is the dense model's epochs + its own (52, not 32).

Prints JSON lines (``config``, ``dense``, ``teacher_cache`` when a ``*_kd`` method runs,
one ``result`` per method and sparsity, ``summary`` with the targets) and writes a PNG
of test accuracy vs sparsity. Run from the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/unstructured_pruning.py
    PYTHONPATH=src .venv/bin/python benchmarks/unstructured_pruning.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

import torchslim as ts
from torchslim.atomic import atomic_write_with
from torchslim.distill import DistillObjective, KDConfig, cache_teacher_outputs, freeze_teacher
from torchslim.prune import (
    AGPSchedule,
    IterativeSchedule,
    UnstructuredPruning,
    global_sparsity,
    gradual_pruning_hook,
    layer_sparsity,
    prune_,
    prune_iteratively,
)


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


def accuracy(model: nn.Module, split) -> float:
    return ts.evaluate(model, split)["accuracy"]


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def sparsity_of(model: nn.Module) -> float:
    return global_sparsity(model, prunable(model))


def run_oneshot(dense, splits, s, pruning, tune, seed):
    model = copy.deepcopy(dense)
    prune_(model, pruning.model_copy(update={"sparsity": s}), splits.train)
    ts.fit(model, splits.train, tune, seed=seed, progress=False)
    return model


def run_iterative(dense, splits, s, pruning, tune, seed, rounds):
    model = copy.deepcopy(dense)
    per_round = tune.model_copy(update={"epochs": tune.epochs // rounds})
    prune_iteratively(model, pruning.model_copy(update={"sparsity": s}), splits.train, per_round,
                      IterativeSchedule(rounds=rounds), seed=seed)
    return model


def run_agp(dense, splits, s, pruning, tune, seed, end_fraction, updates):
    model = copy.deepcopy(dense)
    steps = tune.epochs * math.ceil(len(splits.train.y) / tune.batch_size)
    schedule = AGPSchedule.over(s, steps, start=0.0, end=end_fraction, updates=updates)
    hook = gradual_pruning_hook(model, pruning.model_copy(update={"sparsity": s}), schedule, splits.train)
    ts.fit(model, splits.train, tune, seed=seed, on_step_end=hook, progress=False)
    return model


def run_agp_train(init, splits, s, pruning, train, seed, start_fraction, end_fraction, updates):
    model = copy.deepcopy(init)
    steps = train.epochs * math.ceil(len(splits.train.y) / train.batch_size)
    schedule = AGPSchedule.over(s, steps, start=start_fraction, end=end_fraction, updates=updates)
    hook = gradual_pruning_hook(model, pruning.model_copy(update={"sparsity": s}), schedule, splits.train)
    ts.fit(model, splits.train, train, seed=seed, on_step_end=hook, progress=False)
    return model


def run_agp_kd(start, splits, s, pruning, cfg, seed, start_fraction, end_fraction, updates, teacher, cache, kd):
    """AGP over ``cfg.epochs`` from ``start`` with Hinton KD from ``teacher`` (outputs from ``cache``)."""
    model = copy.deepcopy(start)
    steps = cfg.epochs * math.ceil(len(splits.train.y) / cfg.batch_size)
    schedule = AGPSchedule.over(s, steps, start=start_fraction, end=end_fraction, updates=updates)
    hook = gradual_pruning_hook(model, pruning.model_copy(update={"sparsity": s}), schedule, splits.train)
    with DistillObjective(model, teacher, kd, teacher_cache=cache) as objective:
        ts.fit(model, splits.train, cfg, seed=seed, objective=objective, on_step_end=hook, progress=False)
    return model


def run_torch(dense, splits, s, tune, seed):
    model = copy.deepcopy(dense)
    params = [(m, "weight") for _, m in prunable(model)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=s)
    ts.fit(model, splits.train, tune, seed=seed, progress=False)
    return model


LABELS = {
    "oneshot": "torchslim one-shot + fine-tune",
    "iterative": "torchslim iterative rounds",
    "agp": "torchslim AGP during fine-tuning",
    "agp_train": "torchslim AGP during training",
    "agp_kd": "torchslim AGP during fine-tuning + KD from dense",
    "agp_train_kd": "torchslim AGP during training + KD from dense",
    "torch": "torch.nn.utils.prune one-shot + fine-tune",
}


def plot(path: Path, dense_acc: float, results: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    # torch's one-shot L1 ranks exactly like torchslim's one-shot l1, so the two lines can
    # coincide: draw torch dashed on top so both stay visible.
    styles = {"oneshot": ("o", "-"), "iterative": ("s", "-"), "agp": ("^", "-"), "agp_train": ("v", "-"),
              "agp_kd": ("^", ":"), "agp_train_kd": ("v", ":"), "torch": ("x", "--")}
    for method in dict.fromkeys(r["method"] for r in results):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["sparsity"])
        marker, line = styles.get(method, ("o", "-"))
        ax.plot([100 * r["sparsity"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker=marker,
                linestyle=line, label=LABELS.get(method, method))
    ax.axhline(100 * dense_acc, color="grey", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("sparsity of the Linear weights (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("LeNet-300-100 on Fashion-MNIST, same epoch budget for every method")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", default="0.9,0.95,0.98")
    p.add_argument("--methods", default="oneshot,iterative,agp,agp_train,torch",
                   help="comma-separated, from oneshot, iterative, agp, agp_train, agp_kd, agp_train_kd, torch "
                        "(the *_kd ones distil from the dense model; see above)")
    p.add_argument("--dense-epochs", type=int, default=20)
    p.add_argument("--budget-epochs", type=int, default=12, help="fine-tuning epochs every method gets")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of dense training and fine-tuning")
    p.add_argument("--rounds", type=int, default=3, help="iterative rounds (budget split evenly)")
    p.add_argument("--agp-end", type=float, default=0.3, help="AGP reaches the target at this fraction of the budget")
    p.add_argument("--agp-updates", type=int, default=50, help="mask updates along the AGP ramp")
    p.add_argument("--agp-train-start", type=float, default=0.05, help="agp_train: ramp start, fraction of all epochs")
    p.add_argument("--agp-train-end", type=float, default=0.3, help="agp_train: ramp end, fraction of all epochs")
    p.add_argument("--kd-temperature", type=float, default=4.0, help="agp_kd / agp_train_kd: KD temperature")
    p.add_argument("--kd-alpha", type=float, default=0.1,
                   help="agp_kd / agp_train_kd: weight of the hard-label loss (1 - alpha on the soft targets)")
    p.add_argument("--exclude-first-last", action="store_true", help="torchslim methods skip first/last layer")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="5 dense + 3 budget epochs on 10k samples (smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default="runs/benchmarks/unstructured_pruning.png",
                   help="where the PNG goes (runs/ is git-ignored)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if args.quick:
        args.dense_epochs, args.budget_epochs, args.train_limit = 5, 3, args.train_limit or 10000
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    sparsities = [float(x) for x in args.sparsities.split(",")]
    methods = args.methods.split(",")

    splits = ts.data.load_dataset("fashion-mnist", val_size=5000, train_limit=args.train_limit, seed=args.seed)
    dense_cfg = ts.TrainConfig(epochs=args.dense_epochs, lr=args.lr)
    tune = ts.TrainConfig(epochs=args.budget_epochs, lr=args.lr)
    pruning = UnstructuredPruning(sparsity=0.5, exclude_first_last=args.exclude_first_last)
    emit("config", machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
         threads=torch.get_num_threads(), torch=torch.__version__, python=sys.version.split()[0],
         dense_train=dense_cfg.to_dict(), finetune=tune.to_dict(),
         pruning=pruning.to_dict(), rounds=args.rounds, agp_end=args.agp_end, agp_updates=args.agp_updates,
         agp_train_start=args.agp_train_start, agp_train_end=args.agp_train_end,
         kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha,
         train_samples=len(splits.train.y), val_samples=len(splits.val.y), test_samples=len(splits.test.y))

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    dense = ts.models.create("lenet300_100")
    init = copy.deepcopy(dense)
    ts.fit(dense, splits.train, dense_cfg, seed=args.seed, progress=False)
    dense_acc, dense_val = accuracy(dense, splits.test), accuracy(dense, splits.val)
    emit("dense", test_accuracy=dense_acc, val_accuracy=dense_val,
         params=sum(m.weight.numel() for _, m in prunable(dense)), seconds=round(time.perf_counter() - started, 1))

    teacher = cache = None
    kd = KDConfig(temperature=args.kd_temperature, alpha=args.kd_alpha)
    if any(m.endswith("_kd") for m in methods):
        t0 = time.perf_counter()
        teacher = freeze_teacher(copy.deepcopy(dense).eval())  # a copy: freezing must not touch the methods' start
        cache = cache_teacher_outputs(teacher, splits.train, cache_format="fp32")
        emit("teacher_cache", seconds=round(time.perf_counter() - t0, 2), samples=len(splits.train.y))

    results = []
    for s in sparsities:
        for method in methods:
            t0 = time.perf_counter()
            seed = args.seed + 1  # same fine-tuning batches for every method
            if method == "oneshot":
                model = run_oneshot(dense, splits, s, pruning, tune, seed)
            elif method == "iterative":
                model = run_iterative(dense, splits, s, pruning, tune, seed, args.rounds)
            elif method == "agp":
                model = run_agp(dense, splits, s, pruning, tune, seed, args.agp_end, args.agp_updates)
            elif method == "agp_train":
                whole = dense_cfg.model_copy(update={"epochs": args.dense_epochs + args.budget_epochs})
                model = run_agp_train(init, splits, s, pruning, whole, args.seed, args.agp_train_start,
                                      args.agp_train_end, args.agp_updates)
            elif method == "agp_kd":
                model = run_agp_kd(dense, splits, s, pruning, tune, seed, 0.0, args.agp_end, args.agp_updates,
                                   teacher, cache, kd)
            elif method == "agp_train_kd":
                whole = dense_cfg.model_copy(update={"epochs": args.dense_epochs + args.budget_epochs})
                model = run_agp_kd(init, splits, s, pruning, whole, args.seed, args.agp_train_start,
                                   args.agp_train_end, args.agp_updates, teacher, cache, kd)
            elif method == "torch":
                model = run_torch(dense, splits, s, tune, seed)
            else:
                raise SystemExit(f"unknown method {method!r}")
            row = {"method": method, "sparsity": s, "achieved_sparsity": round(sparsity_of(model), 6),
                   "test_accuracy": accuracy(model, splits.test), "val_accuracy": accuracy(model, splits.val),
                   "drop_points": None, "seconds": round(time.perf_counter() - t0, 1),
                   "layers": {n: round(v["sparsity"], 4) for n, v in layer_sparsity(model, prunable(model)).items()}}
            row["drop_points"] = round(100 * (dense_acc - row["test_accuracy"]), 2)
            results.append(row)
            emit("result", **row)

    summary: dict[str, Any] = {"dense_test_accuracy": dense_acc, "targets": {}}
    ours = [m for m in methods if m != "torch"]

    def best(s: float) -> dict[str, Any] | None:
        rows = [r for r in results if r["sparsity"] == s and r["method"] in ours]
        return max(rows, key=lambda r: r["val_accuracy"]) if rows else None  # chosen on val, reported on test

    checks = []
    if 0.95 in sparsities and (b := best(0.95)):
        ok = 100 * (dense_acc - b["test_accuracy"]) <= 0.3
        summary["targets"]["95%: best torchslim within 0.3 pt of dense"] = {"best": b["method"],
                                                                           "drop_points": b["drop_points"], "pass": ok}
        checks.append(ok)
    if 0.98 in sparsities and (b := best(0.98)):
        ok = 100 * (dense_acc - b["test_accuracy"]) <= 1.5
        summary["targets"]["98%: best torchslim within 1.5 pt of dense"] = {"best": b["method"],
                                                                           "drop_points": b["drop_points"], "pass": ok}
        checks.append(ok)
        peer = next((r for r in results if r["sparsity"] == 0.98 and r["method"] == "torch"), None)
        if peer is not None:
            gap = 100 * (b["test_accuracy"] - peer["test_accuracy"])
            summary["targets"]["98%: >= 2 pt above torch.nn.utils.prune one-shot"] = {
                "gap_points": round(gap, 2), "pass": gap >= 2.0}
            checks.append(gap >= 2.0)
    summary["pass"] = all(checks)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if args.plot:
        plot(Path(args.plot), dense_acc, results)
        summary["plot"] = args.plot
    emit("summary", **summary)
    return 0 if (summary["pass"] or not args.check) else 1


if __name__ == "__main__":
    raise SystemExit(main())
