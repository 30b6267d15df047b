"""Robustness matrix: torchslim's defaults against the simplest thing a user could write instead.

Models: two zoo presets (``fmnist_student``, ``lenet300_100``) and two models written here
the way a user writes them (``user_mlp``: ``nn.Sequential`` without BatchNorm; ``user_cnn``:
``nn.Sequential`` with BatchNorm). Budgets: 1, 3 and 10 epochs. Seeds: 0, 1, 2. Data: real
Fashion-MNIST (a training subset, ``--train-limit``; the ``config`` line says how many).

Cells (every comparison at equal epochs, equal data, equal initial weights):

* ``kd``: ``ts.distill(student, teacher, train, ts.KDConfig(), epochs=E)`` and the same with
  ``ts.DKDConfig()`` against the student alone (``ts.fit(student, train, ts.TrainConfig(epochs=E))``)
  and against a tutorial online-KD loop written below in plain PyTorch (Adam 1e-3, constant,
  T = 4, loss = 0.5 CE + 0.5 T^2 KL). Teacher: the shipped ``recipes/weights/fmnist_teacher.slim``.
* ``unstructured``: a dense model (trained here, ``--dense-epochs``, the same for both sides)
  pruned to 90/95/98 % with ``ts.prune_(m, ts.UnstructuredPruning(sparsity=s))`` and fine-tuned
  with ``ts.fit(m, train, ts.TrainConfig(epochs=E))``, against
  ``torch.nn.utils.prune.global_unstructured(L1Unstructured)`` + a plain constant-LR Adam loop.
* ``channels``: ``ts.prune_channels(m, x, ts.ChannelPruning(target_macs=1/f)).model`` (f = 2, 4)
  against Torch-Pruning's ``MetaPruner`` (``GroupMagnitudeImportance(p=2)``, pruning ratio bisected
  to the largest MACs <= the target), both fine-tuned with the same ``ts.fit`` call. Skipped, with
  a ``skip`` line, when ``torch_pruning`` is not importable.

Output: JSON lines on stdout (``config``, ``teacher``, ``dense``, one ``run`` per side and seed,
one ``cell`` per comparison with mean +- standard error over seeds and the winner, ``summary``),
then a plain-text summary table on stderr (``--table-stdout`` prints it on stdout after the JSON).
``--workers N`` runs the (cell, model) jobs in N processes of ``--threads`` threads each; a job's
figures do not depend on which process ran it.

    PYTHONPATH=src .venv/bin/python benchmarks/robustness.py --quick
    PYTHONPATH=src .venv/bin/python benchmarks/robustness.py --workers 2     # the whole matrix on 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/robustness.py --cells kd --models fmnist_student,user_cnn --budgets 1,3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as tprune

import torchslim as ts
from torchslim.data import load_dataset
from torchslim.distill.kd import prepare_teacher_cache
from torchslim.measure import count_macs

HERE = os.path.dirname(os.path.abspath(__file__))
TEACHER = os.path.join(HERE, "..", "recipes", "weights", "fmnist_teacher.slim")
CELLS = ("kd", "unstructured", "channels")


# ---------------------------------------------------------------------------
# Models a user writes
# ---------------------------------------------------------------------------


def user_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def user_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


USER_MODELS: dict[str, Callable[[], nn.Module]] = {"user_mlp": user_mlp, "user_cnn": user_cnn}
ALL_MODELS = ("fmnist_student", "lenet300_100", "user_mlp", "user_cnn")


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return USER_MODELS[name]() if name in USER_MODELS else ts.models.create(name)


# ---------------------------------------------------------------------------
# Plain PyTorch: what a user writes instead
# ---------------------------------------------------------------------------


def plain_loop(model: nn.Module, train, epochs: int, seed: int, *, teacher: nn.Module | None = None,
               temperature: float = 4.0, alpha: float = 0.5, lr: float = 1e-3, batch_size: int = 128) -> None:
    """Adam at a constant learning rate; with ``teacher``, the tutorials' online KD loss."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    if teacher is not None:
        teacher.eval()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train.y), generator=gen).split(batch_size):
            x, y = train.x[idx], train.y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / temperature, dim=1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean")
                loss = alpha * loss + (1 - alpha) * temperature ** 2 * kd
            opt.zero_grad()
            loss.backward()
            opt.step()


def torch_prune_global(model: nn.Module, sparsity: float) -> None:
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[classifier])
    pruner.step()
    return model


def tp_at_macs(model: nn.Module, x: torch.Tensor, target: float) -> tuple[nn.Module, float]:
    """Torch-Pruning with the smallest pruning ratio whose MACs are <= ``target`` x the dense MACs."""
    dense = count_macs(model, x)
    lo, hi = 0.0, 0.9
    best, best_ratio = tp_prune(model, x, hi), hi
    if count_macs(best, x) > target * dense:
        return best, hi
    for _ in range(12):
        mid = (lo + hi) / 2
        pruned = tp_prune(model, x, mid)
        if count_macs(pruned, x) <= target * dense:
            hi, best, best_ratio = mid, pruned, mid
        else:
            lo = mid
    return best, best_ratio


# ---------------------------------------------------------------------------


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


@torch.no_grad()
def accuracy(model: nn.Module, split) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(split.x.split(1024), split.y.split(1024)))
    model.train(was)
    return correct / len(split.y)


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, sd / math.sqrt(n)


def parse_list(text: str, kind=str) -> list:
    return [kind(t) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: 1 model per cell kind, budget 1, seed 0, 1000 training / 1000 test samples")
    p.add_argument("--cells", default=",".join(CELLS), help="comma list of kd, unstructured, channels")
    p.add_argument("--models", default=",".join(ALL_MODELS))
    p.add_argument("--budgets", default="1,3,10", help="fine-tuning / training epochs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sparsities", default="0.9,0.95,0.98")
    p.add_argument("--factors", default="2,4", help="channel pruning: f-times fewer MACs")
    p.add_argument("--train-limit", type=int, default=None, help="training samples (default 10000)")
    p.add_argument("--test-limit", type=int, default=None, help="test samples (default 10000: all)")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--dense-epochs", type=int, default=None, help="dense training before pruning (default 5)")
    p.add_argument("--schedule", default=None,
                   help="override TrainConfig.schedule on every torchslim side (to measure a candidate default)")
    p.add_argument("--lr", type=float, default=None,
                   help="set TrainConfig.lr on every torchslim side (with --schedule: an earlier default written out)")
    p.add_argument("--kd-variants", default="",
                   help="extra torchslim KD sides, ';'-separated: 'kd:T:alpha' or 'dkd:T:nckd' (candidate defaults)")
    p.add_argument("--skip-peers", action="store_true", help="torchslim sides only (the peers do not change)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--workers", type=int, default=1,
                   help="processes running (cell, model) jobs at once (e.g. 2 on 2 cores with --threads 1)")
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--table-stdout", action="store_true", help="print the summary table on stdout too")
    args = p.parse_args(argv)
    if args.quick:
        args.budgets, args.seeds = "1", "0"
        args.train_limit = args.train_limit or 1000
        args.test_limit = args.test_limit or 1000
        args.dense_epochs = args.dense_epochs or 1
        if "--models" not in (argv or sys.argv[1:]):
            args.models = None  # one per cell kind, chosen in main
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    args.cells = parse_list(args.cells)
    bad = set(args.cells) - set(CELLS)
    if bad:
        p.error(f"unknown cells {sorted(bad)}; known: {', '.join(CELLS)}")
    args.budgets = parse_list(args.budgets, int)
    args.seeds = parse_list(args.seeds, int)
    args.sparsities = parse_list(args.sparsities, float)
    args.factors = parse_list(args.factors, float)
    args.train_limit = args.train_limit or 10000
    args.test_limit = args.test_limit or 10000
    args.dense_epochs = args.dense_epochs or 5
    return args


def train_config(args, epochs: int) -> ts.TrainConfig:
    """What a user writes: ``TrainConfig(epochs=E)``; ``--schedule`` / ``--lr`` measure a candidate (or an earlier)
    default: a field given is kept as given, also by the pruned-model rule."""
    given = {k: v for k, v in (("schedule", args.schedule), ("lr", args.lr)) if v is not None}
    return ts.TrainConfig(epochs=epochs, **given)


def kd_variants(text: str) -> list[tuple[str, Any]]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        method, t, w = item.split(":")
        if method == "kd":
            out.append((f"kd_T{t}_a{w}", ts.KDConfig(temperature=float(t), alpha=float(w))))
        elif method == "dkd":
            out.append((f"dkd_T{t}_n{w}", ts.DKDConfig(temperature=float(t), nckd_weight=float(w))))
        else:
            raise SystemExit(f"--kd-variants: {item!r} is not kd:T:alpha or dkd:T:nckd")
    return out


class Recorder:
    def __init__(self, splits):
        self.splits = splits
        self.runs: dict[tuple, dict[int, dict[str, float]]] = {}

    def run(self, key: tuple, side: str, seed: int, model: nn.Module, seconds: float, **extra: Any) -> None:
        rec = {"val": accuracy(model, self.splits.val), "test": accuracy(model, self.splits.test)}
        self.runs.setdefault(key + (side,), {})[seed] = rec
        emit({"event": "run", "cell": key[0], "model": key[1], "budget": key[2], "setting": key[3], "side": side,
              "seed": seed, "val_accuracy": rec["val"], "test_accuracy": rec["test"], "seconds": round(seconds, 2),
              **extra})


def compare(rec: Recorder, key: tuple, ours: str, peer: str, rows: list[dict], extra: dict | None = None) -> None:
    a, b = rec.runs.get(key + (ours,)), rec.runs.get(key + (peer,))
    if not a or not b:
        return
    seeds = sorted(set(a) & set(b))
    ma, sa = mean_se([a[s]["test"] for s in seeds])
    mb, sb = mean_se([b[s]["test"] for s in seeds])
    va, _ = mean_se([a[s]["val"] for s in seeds])
    vb, _ = mean_se([b[s]["val"] for s in seeds])
    se = math.sqrt(sa ** 2 + sb ** 2)
    diff = ma - mb
    winner = "torchslim" if diff > 0 else ("peer" if diff < 0 else "tie")
    row = {"event": "cell", "cell": key[0], "model": key[1], "budget": key[2], "setting": key[3], "ours": ours,
           "peer": peer, "seeds": seeds, "ours_mean": ma, "ours_se": sa, "peer_mean": mb, "peer_se": sb,
           "ours_val": va, "peer_val": vb, "diff": diff, "se": se, "winner": winner,
           "within_se": diff >= -se, **(extra or {})}
    rows.append(row)
    emit(row)


# ---------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------


def cell_kd(args, rec: Recorder, teacher: nn.Module, teacher_acc: float, models: list[str], rows: list[dict]) -> None:
    train = rec.splits.train
    cache = prepare_teacher_cache(teacher, train, ts.KDConfig())  # the one ts.distill builds; shared by its calls
    sides = [("kd_default", ts.KDConfig()), ("dkd_default", ts.DKDConfig())] + kd_variants(args.kd_variants)
    for name in models:
        for epochs in args.budgets:
            key = ("kd", name, epochs, "-")
            for seed in args.seeds:
                init = build(name, seed)
                m = copy.deepcopy(init)
                t0 = time.perf_counter()
                ts.fit(m, train, train_config(args, epochs), seed=seed, progress=False)
                rec.run(key, "alone", seed, m, time.perf_counter() - t0)
                for side, cfg in sides:
                    m = copy.deepcopy(init)
                    t0 = time.perf_counter()
                    ts.distill(m, teacher, train, cfg, train_config(args, epochs), teacher_cache=cache, seed=seed,
                               progress=False)
                    rec.run(key, side, seed, m, time.perf_counter() - t0)
                if not args.skip_peers:
                    m = copy.deepcopy(init)
                    t0 = time.perf_counter()
                    plain_loop(m, train, epochs, seed, teacher=teacher)
                    rec.run(key, "tutorial_kd", seed, m, time.perf_counter() - t0)
            for side, _ in sides:
                for peer in ("alone", "tutorial_kd"):
                    extra = {}
                    a, b = rec.runs.get(key + (side,)), rec.runs.get(key + ("alone",))
                    if peer == "alone" and a and b:
                        ma = mean_se([v["test"] for v in a.values()])[0]
                        mb = mean_se([v["test"] for v in b.values()])[0]
                        extra["gap_recovered"] = (ma - mb) / (teacher_acc - mb) if teacher_acc > mb else None
                    compare(rec, key, side, peer, rows, extra)


def train_dense(args, rec: Recorder, name: str, seed: int) -> nn.Module:
    """The starting point both sides of a pruning cell share (explicit cosine: independent of the default)."""
    model = build(name, seed)
    ts.fit(model, rec.splits.train, ts.TrainConfig(epochs=args.dense_epochs, schedule="cosine"), seed=seed,
           progress=False)
    emit({"event": "dense", "model": name, "seed": seed, "epochs": args.dense_epochs,
          "val_accuracy": accuracy(model, rec.splits.val), "test_accuracy": accuracy(model, rec.splits.test)})
    return model


def cell_unstructured(args, rec: Recorder, models: list[str], dense: dict, rows: list[dict]) -> None:
    train = rec.splits.train
    for name in models:
        for epochs in args.budgets:
            for sparsity in args.sparsities:
                key = ("unstructured", name, epochs, f"{sparsity:g}")
                for seed in args.seeds:
                    d = dense[(name, seed)]
                    m = copy.deepcopy(d)
                    t0 = time.perf_counter()
                    ts.prune_(m, ts.UnstructuredPruning(sparsity=sparsity))
                    ts.fit(m, train, train_config(args, epochs), seed=seed, progress=False)
                    rec.run(key, "torchslim", seed, m, time.perf_counter() - t0)
                    if not args.skip_peers:
                        m = copy.deepcopy(d)
                        t0 = time.perf_counter()
                        torch_prune_global(m, sparsity)
                        plain_loop(m, train, epochs, seed)
                        rec.run(key, "torch_prune_plain", seed, m, time.perf_counter() - t0)
                compare(rec, key, "torchslim", "torch_prune_plain", rows)


def cell_channels(args, rec: Recorder, models: list[str], dense: dict, rows: list[dict]) -> None:
    train = rec.splits.train
    x = train.x[:1]
    for name in models:
        for factor in args.factors:
            for epochs in args.budgets:
                key = ("channels", name, epochs, f"{factor:g}x")
                for seed in args.seeds:
                    d = dense[(name, seed)]
                    macs = count_macs(d, x)
                    # The same fine-tune for both sides: what fit picks for torchslim's cut model (the
                    # pruned-model rule), written out, as fit cannot tell Torch-Pruning's model was cut.
                    tune = train_config(args, epochs).for_pruned_model()
                    t0 = time.perf_counter()
                    m = ts.prune_channels(d, x, ts.ChannelPruning(target_macs=1 / factor)).model
                    ratio = count_macs(m, x) / macs
                    ts.fit(m, train, tune, seed=seed, progress=False)
                    rec.run(key, "torchslim", seed, m, time.perf_counter() - t0, macs_ratio=ratio)
                    if not args.skip_peers:
                        t0 = time.perf_counter()
                        m, tp_ratio = tp_at_macs(d, x, 1 / factor)
                        ratio = count_macs(m, x) / macs
                        ts.fit(m, train, tune, seed=seed, progress=False)
                        rec.run(key, "torch_pruning", seed, m, time.perf_counter() - t0, macs_ratio=ratio,
                                pruning_ratio=tp_ratio)
                compare(rec, key, "torchslim", "torch_pruning", rows)


# ---------------------------------------------------------------------------


def table(rows: list[dict], teacher_acc: float) -> str:
    head = f"{'cell':<13}{'model':<16}{'ep':>3} {'setting':<8}{'torchslim side':<16}{'peer':<18}" \
           f"{'torchslim %':>16}{'peer %':>16}{'diff':>7}  winner"
    lines = [f"teacher test accuracy {100 * teacher_acc:.2f} %; mean ± standard error over seeds, test split", head,
             "-" * len(head)]
    for r in rows:
        mark = "" if r["within_se"] else "  (below by > 1 SE)"
        lines.append(f"{r['cell']:<13}{r['model']:<16}{r['budget']:>3} {r['setting']:<8}{r['ours']:<16}"
                     f"{r['peer']:<18}{100 * r['ours_mean']:>9.2f} ± {100 * r['ours_se']:<4.2f}"
                     f"{100 * r['peer_mean']:>9.2f} ± {100 * r['peer_se']:<4.2f}{100 * r['diff']:>+7.2f}  "
                     f"{r['winner']}{mark}")
    n = len(rows)
    wins = sum(r["winner"] == "torchslim" for r in rows)
    ok = sum(r["within_se"] for r in rows)
    lines.append(f"{n} comparisons: torchslim ahead in {wins}, within one SE or ahead in {ok}")
    return "\n".join(lines)


# Rough single-thread cost of one job (cell, model), for handing the heaviest out first.
_CELL_COST = {"kd": 4.0, "unstructured": 3.0, "channels": 1.0}
_MODEL_COST = {"fmnist_student": 3.0, "user_cnn": 3.0, "lenet300_100": 1.0, "user_mlp": 1.0}


#: Dense starts trained in this process, by (model, seed): the unstructured and channel jobs share them.
_DENSE: dict[tuple[str, int], nn.Module] = {}


def load_splits(args):
    return load_dataset("fashion-mnist", val_size=args.val_size, train_limit=args.train_limit,
                        test_limit=args.test_limit, seed=0)


def run_job(args, cell: str, model: str, teacher_acc: float, splits=None) -> list[dict]:
    """One (cell, model) of the matrix: its comparison rows (JSON lines go to stdout as they come).

    Self-contained so that ``--workers`` can run it in another process: it loads the data, the
    teacher (kd) or trains the shared dense starts (pruning cells) itself. The dense start of a
    model and seed is the same in every job (seeded, one thread), so two jobs that each train it
    get the same weights.
    """
    torch.set_num_threads(args.threads)
    rec = Recorder(splits if splits is not None else load_splits(args))
    rows: list[dict] = []
    if cell == "kd":
        teacher = ts.load(args.teacher).float().eval()
        cell_kd(args, rec, teacher, teacher_acc, [model], rows)
    else:
        for s in args.seeds:
            if (model, s) not in _DENSE:
                _DENSE[(model, s)] = train_dense(args, rec, model, s)
        dense = {(model, s): _DENSE[(model, s)] for s in args.seeds}
        (cell_unstructured if cell == "unstructured" else cell_channels)(args, rec, [model], dense, rows)
    return rows


def run_jobs(args, jobs: list[tuple[str, str]], teacher_acc: float, splits) -> list[dict]:
    """Every job's rows in job order: in this process, or spread over ``args.workers`` processes."""
    if args.workers <= 1:
        return [row for cell, model in jobs for row in run_job(args, cell, model, teacher_acc, splits)]
    import concurrent.futures as cf
    import multiprocessing

    order = sorted(range(len(jobs)), key=lambda i: -_CELL_COST[jobs[i][0]] * _MODEL_COST.get(jobs[i][1], 1.0))
    with cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {i: pool.submit(run_job, args, *jobs[i], teacher_acc) for i in order}
        return [row for i in range(len(jobs)) for row in futures[i].result()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    splits = load_splits(args)
    try:
        import torch_pruning  # noqa: F401
        have_tp = True
    except ImportError:
        have_tp = False
    per_cell = {c: (parse_list(args.models) if args.models else
                    {"kd": ["user_cnn"], "unstructured": ["user_mlp"], "channels": ["user_mlp"]}[c])
                for c in args.cells}
    emit({"event": "config", "dataset": "fashion-mnist", "train_samples": len(splits.train.y),
          "val_samples": len(splits.val.y), "test_samples": len(splits.test.y), "cells": args.cells,
          "models": per_cell, "budgets": args.budgets, "seeds": args.seeds, "sparsities": args.sparsities,
          "factors": args.factors, "dense_epochs": args.dense_epochs, "threads": args.threads,
          "workers": args.workers, "torchslim_train_config": train_config(args, 1).model_dump(),
          "schedule_override": args.schedule, "lr_override": args.lr,
          "kd_default": ts.KDConfig().model_dump(), "dkd_default": ts.DKDConfig().model_dump(),
          "torch": torch.__version__, "torchslim": ts.__version__, "python": platform.python_version(),
          "torch_pruning": have_tp, "quick": args.quick})
    teacher_acc = float("nan")
    if "kd" in args.cells:
        teacher_acc = accuracy(ts.load(args.teacher).float().eval(), splits.test)
        emit({"event": "teacher", "path": os.path.relpath(args.teacher), "test_accuracy": teacher_acc})
    if "channels" in args.cells and not (have_tp or args.skip_peers):
        emit({"event": "skip", "cell": "channels",
              "reason": "torch_pruning is not importable (pip install torch-pruning): channel cells skipped"})
        args.cells = [c for c in args.cells if c != "channels"]
    jobs = [(cell, model) for cell in args.cells for model in per_cell[cell]]
    rows = run_jobs(args, jobs, teacher_acc, splits)
    text = table(rows, teacher_acc)
    emit({"event": "summary", "comparisons": len(rows), "torchslim_ahead": sum(r["winner"] == "torchslim" for r in rows),
          "within_se": sum(r["within_se"] for r in rows), "seconds": round(time.perf_counter() - started, 1)})
    print(text, file=sys.stderr, flush=True)
    if args.table_stdout:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
