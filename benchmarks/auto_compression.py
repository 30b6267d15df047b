"""Automatic compression (issue 13, channel axis): the searched front against uniform plans.

The shipped ``fmnist_teacher`` (``recipes/weights/fmnist_teacher.slim``) on Fashion-MNIST is
searched once with :func:`torchslim.search.search` under "accuracy drop <= 0.5 points,
latency minimised" (ONNX Runtime fp32, batch 256, threads pinned). The front does not depend
on the budget (only the final choice does), so the second budget, "latency <= 0.25x of the
dense model, accuracy maximised", is chosen from the same measured points and fine-tuned the
same way.

Compared, all measured end to end in ONNX Runtime:

* the uniform plans (the same kept fraction in every group, the search space's fractions),
  measured by the same search run (``source == "uniform"``);
* at equal measured latency: for each uniform plan, the most accurate sweep point that is
  at most as slow (validation accuracy after each candidate's short trial KD fine-tune,
  ``--trial-samples``; with 0, right after the cut with BatchNorm re-estimated);
* at equal accuracy: for each uniform plan, the fastest sweep point at least as accurate;
* after the same KD fine-tune: the chosen plan against the uniform plan closest in latency
  at or above it (so the uniform plan is never favoured), test accuracy.

Also the chosen model's speed-up over the dense teacher in ONNX Runtime and in torch eager
(both at batch 256, the same threads).

With ``--trials N`` the front is refined by N Optuna trials (:mod:`torchslim.search.study`;
each a plan near the front, the same trial KD fine-tune, measured end to end) and the run
also reports what refinement bought: per trial point on the final front, the accuracy gain
over the best stage-one point (sweep, uniform, dense) at most as slow (``refinement``), and
the "drop <= 0.5" choice made without the trials, fine-tuned the same way, beside the refined
choice (``chosen_without_trials``). The study lives in the run folder: running again with the
same settings and a larger ``--trials`` continues it.

Output: JSON lines on stdout (``config``, ``dense``, ``point`` per measured point,
``tables_error``, ``chosen`` per budget, ``uniform_vs_front``, ``summary``); progress on stderr.

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/auto_compression.py --quick   # a few minutes, 1 thread
    PYTHONPATH=src .venv/bin/python benchmarks/auto_compression.py           # full data, 3 fine-tune epochs
    PYTHONPATH=src .venv/bin/python benchmarks/auto_compression.py --quick --trials 8   # + Optuna refinement

Not here yet (issue 13): fmnist_student, Torch-Pruning global at equal latency, int8 and
weight-sharing axes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import torchslim as ts
import torchslim.search as search
from torchslim.search import Budget, InfeasibleBudget, SearchSpace, choose
from torchslim.search.api import finetune_seed, kd_finetune_
from torchslim.search.sensitivity import accuracy

ROOT = Path(__file__).resolve().parent.parent


def emit(kind: str, **record) -> None:
    print(json.dumps({"kind": kind, **record}, default=float), flush=True)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _point(p) -> dict:
    return {"source": p.source, "val_accuracy": p.accuracy, "drop": p.drop, "latency_ratio": p.latency_ratio,
            "p50_ms": p.latency_p50_ms, "p90_ms": p.latency_p90_ms, "macs": p.macs, "bytes": p.bytes,
            "predicted_drop": p.predicted_drop, "predicted_latency": p.predicted_latency, "plan": p.plan,
            "trial": p.extra.get("trial")}


def compare_uniform(points) -> list[dict]:
    """Per uniform plan: the best sweep point at equal (or lower) latency, and the fastest at equal accuracy."""
    sweep = [p for p in points if p.source in ("sweep", "dense", "trial")]  # the searched side, refined or not
    rows = []
    for u in sorted((p for p in points if p.source == "uniform"), key=lambda p: p.latency_ratio):
        faster = [p for p in sweep if p.latency_ratio <= u.latency_ratio]
        better = [p for p in sweep if p.accuracy >= u.accuracy]
        at_lat = max(faster, key=lambda p: p.accuracy) if faster else None
        at_acc = min(better, key=lambda p: p.latency_ratio) if better else None
        rows.append({"uniform_latency_ratio": u.latency_ratio, "uniform_val_accuracy": u.accuracy,
                     "front_accuracy_at_equal_latency": at_lat.accuracy if at_lat else None,
                     "gain_points": 100 * (at_lat.accuracy - u.accuracy) if at_lat else None,
                     "front_latency_at_equal_accuracy": at_acc.latency_ratio if at_acc else None,
                     "speedup_at_equal_accuracy": u.latency_ratio / at_acc.latency_ratio if at_acc else None})
    return rows


def compare_refinement(points) -> list[dict]:
    """Per trial point on the front: the gain over the best stage-one point that is at most as slow."""
    from torchslim.search import pareto_front

    front = pareto_front(points)
    base = [p for p in points if p.source != "trial"]
    rows = []
    for t in (p for p in front if p.source == "trial"):
        faster = [p for p in base if p.latency_ratio <= t.latency_ratio]
        b = max(faster, key=lambda p: p.accuracy) if faster else None
        rows.append({"trial": t.extra.get("trial"), "latency_ratio": t.latency_ratio, "val_accuracy": t.accuracy,
                     "stage_one_source": b.source if b else None,
                     "stage_one_accuracy_at_equal_latency": b.accuracy if b else None,
                     "gain_points": 100 * (t.accuracy - b.accuracy) if b else None, "plan": t.plan})
    return rows


def finetuned(m: search.Measurer, plan: dict, splits, config, seed: int) -> torch.nn.Module:
    model = m.build(plan, recalibrate=False)
    kd_finetune_(model, m.dense, splits.train, splits.val, config, seed=finetune_seed(seed))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k training samples, 2k test, 1 fine-tune epoch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, help="KD fine-tune epochs of each chosen plan (default 1 quick, 3 full)")
    ap.add_argument("--trial-samples", type=int, help="training samples of each candidate's trial KD fine-tune "
                    "(1 epoch; default 2000 quick, 10000 full; 0: no trial fine-tune, BatchNorm re-estimation only)")
    ap.add_argument("--trials", type=int, default=0, help="Optuna trials refining the front (0: the Lagrangian "
                    "front alone; needs pip install 'torchslim[search]')")
    ap.add_argument("--out", default=None, help="folder for the search's files (default runs/auto_compression, "
                    "runs/auto_compression_study with --trials)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else 3)
    limits = {"train_limit": 10000, "test_limit": 2000} if args.quick else {}
    splits = ts.data.load_dataset("fashion-mnist", val_size=5000, seed=0, **limits)
    teacher = ts.load(ROOT / "recipes" / "weights" / "fmnist_teacher.slim").eval()
    space = SearchSpace(round_to=8, sensitivity_samples=1000 if args.quick else 2000,
                        max_candidates=10 if args.quick else 16)
    budget = Budget(max_drop=0.5, batch=args.batch, threads=args.threads,
                    latency_budget_s=0.4 if args.quick else 1.0)
    ft = ts.TrainConfig(epochs=epochs)
    data = {"dataset": "fashion-mnist", "val_size": 5000, **limits}
    emit("config", quick=args.quick, trial_samples=args.trial_samples, trials=args.trials, threads=args.threads, batch=args.batch, finetune_epochs=epochs,
         train=len(splits.train.y), val=len(splits.val.y), test=len(splits.test.y), space=space.to_dict(),
         torch=torch.__version__)
    start = time.time()
    trial_n = args.trial_samples if args.trial_samples is not None else (2000 if args.quick else 10000)
    trial = ts.TrainConfig(epochs=1) if trial_n else None
    out = args.out or ROOT / "runs" / ("auto_compression_study" if args.trials else "auto_compression")
    r = search.search(teacher, splits.train, splits.val, budget, space, finetune=ft, test=splits.test,
                      out=out, recipe_data=data, progress=log, trial_finetune=trial, trial_samples=trial_n or None,
                      trials=args.trials)
    dense_test = accuracy(teacher, splits.test.x, splits.test.y)
    emit("dense", val_accuracy=r.dense.accuracy, test_accuracy=dense_test, p50_ms=r.dense.latency_p50_ms,
         macs=r.dense.macs, bytes=r.dense.bytes)
    for p in r.points:
        emit("point", on_front=p in r.front, **_point(p))
    emit("tables_error", **r.prediction_error)
    m = search.Measurer(teacher, r.groups, space, budget, splits.train.x)
    chosen = {"max_drop_0.5": (r.chosen, r.best)}
    try:
        p = choose(r.points, Budget(latency=0.25, batch=args.batch, threads=args.threads), r.dense)
        chosen["latency_0.25x"] = (p, finetuned(m, p.plan, splits, ft, 0) if p.source != "dense" else teacher)
    except InfeasibleBudget as exc:
        emit("chosen", budget="latency_0.25x", feasible=False, message=str(exc))
    uniform = [p for p in r.points if p.source == "uniform"]
    for name, (p, model) in chosen.items():
        test = accuracy(model, splits.test.x, splits.test.y)
        ort = m.latency(model)
        eager = ts.measure.compare_latency({"dense": teacher, "cand": model}, splits.test.x[:1], args.batch,
                                           budget_s=budget.latency_budget_s)
        # The uniform plan nearest in latency at or above the chosen one, given the same fine-tune.
        slower = [u for u in uniform if u.latency_ratio >= p.latency_ratio]
        u = min(slower, key=lambda q: q.latency_ratio) if slower else None
        u_test = accuracy(finetuned(m, u.plan, splits, ft, 0), splits.test.x, splits.test.y) if u else None
        emit("chosen", budget=name, feasible=True, test_accuracy=test, test_drop=100 * (dense_test - test),
             val_drop_before_finetune=p.drop, ort_speedup=1 / ort["ratio"], ort_p50_ms=ort["p50_ms"],
             eager_speedup=eager["dense"]["median_ms"] / eager["cand"]["median_ms"], macs=p.macs, plan=p.plan,
             uniform_latency_ratio=u.latency_ratio if u else None, uniform_test_accuracy=u_test,
             gain_over_uniform_points=100 * (test - u_test) if u_test is not None else None)
    if args.trials:
        emit("refinement", rows=compare_refinement(r.points))
        before = choose([p for p in r.points if p.source != "trial"], budget, r.dense)
        if before.plan != r.chosen.plan:
            model = finetuned(m, before.plan, splits, ft, 0) if before.source != "dense" else teacher
            test = accuracy(model, splits.test.x, splits.test.y)
            ort = m.latency(model)
            emit("chosen_without_trials", source=before.source, val_drop_before_finetune=before.drop,
                 latency_ratio=before.latency_ratio, test_accuracy=test, ort_speedup=1 / ort["ratio"],
                 refined_latency_ratio=r.chosen.latency_ratio, refined_source=r.chosen.source, plan=before.plan)
        else:
            emit("chosen_without_trials", same_as_refined=True, source=before.source)
    rows = compare_uniform(r.points)
    emit("uniform_vs_front", rows=rows)
    gains = [row["gain_points"] for row in rows if row["gain_points"] is not None]
    emit("summary", seconds=time.time() - start, points=len(r.points), front=len(r.front),
         trial_points=sum(p.source == "trial" for p in r.points),
         trial_points_on_front=sum(p.source == "trial" for p in r.front), chosen_source=r.chosen.source,
         mean_gain_points_at_equal_latency=sum(gains) / len(gains) if gains else None,
         targets={"front_points_ge_5": len(r.front) >= 5, "minutes_le_30": (time.time() - start) <= 1800})


if __name__ == "__main__":
    main()
