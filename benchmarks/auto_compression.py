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
``tables_error``, ``chosen`` per budget, ``torch_pruning`` per budget whose choice is faster than
dense (or ``skip``), ``uniform_vs_front``, ``summary``); progress on stderr.

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/auto_compression.py --quick   # a few minutes, 1 thread
    PYTHONPATH=src .venv/bin/python benchmarks/auto_compression.py           # full data, 3 fine-tune epochs
    PYTHONPATH=src .venv/bin/python benchmarks/auto_compression.py --quick --trials 8   # + Optuna refinement
    PYTHONPATH=src .venv/bin/python benchmarks/auto_compression.py --quick --model fmnist_student --int8-layers sweep

The precision axis (``--precision both``, the default): every measured plan is also measured
as a static int8 ONNX file (PTQ on 512 training inputs, accuracy in ONNX Runtime on validation,
latency alternated with the dense fp32 file); uniform plans then come in both precisions (the
issue's "all-int8 or all-float"). A chosen int8 point is fine-tuned in float, then quantized;
its test accuracy is the int8 file's in ONNX Runtime. Speed-ups of a chosen model: ONNX Runtime
(its deployed file, fp32 or int8, against the dense fp32 file), torch eager (its float model
against the dense teacher), and its deployed file against the dense teacher in torch eager, all
timed in one alternated rotation.

Torch-Pruning baseline (issue 13 benchmark (b); ``torch_pruning`` is a benchmark-only peer,
never imported by the library; a ``skip`` line when it is missing): global pruning
(``MetaPruner(global_pruning=True)``, ``GroupMagnitudeImportance(p=2)``, the classifier's last
Linear ignored, ``round_to`` the space's) with its ratio bisected until its file, in the chosen
point's precision, has the chosen point's measured ONNX Runtime latency; then the same KD
fine-tune and the same measurement (``torch_pruning`` line per budget).

Finalists (``--finalists K``, default 3, as ``search(finalists=)``): each budget's choice is
decided after the full KD fine-tune, not by the front's proxy accuracy. Under "drop <= 0.5" a
bisection by measured latency over the front's points faster than the proxy's choice (the
fastest within 0.5 points on validation after the fine-tune wins); under "latency <= 0.25x"
the K most accurate feasible points are fine-tuned and the best on validation wins. A
``finalists`` line per budget lists them (proxy drop, drop after the fine-tune).

``--model fmnist_student``: no trained student is shipped, so one is trained here first (seeded,
``--train-epochs`` on the same training split, saved to ``OUT/dense_trained.slim`` and reused by
a later run with the same folder); the search treats it as the dense model.

The sparsity and weight-sharing axes serve a size bound: ``benchmarks/auto_size.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import torchslim as ts
import torchslim.search as search
from torchslim.search import Budget, InfeasibleBudget, SearchSpace, choose
from torchslim.search.api import finetune_seed, kd_finetune_
from torchslim.search.finalists import best_within_bound, bisect_drop, finish_point, recovery_finetune
from torchslim.search.finetunes import open_finetune_store
from torchslim.search.precision import finish_int8, int8_config
from torchslim.search.sensitivity import accuracy

PRECISION = {"fp32": ["fp32"], "int8": ["int8"], "both": ["fp32", "int8"]}

ROOT = Path(__file__).resolve().parent.parent


def emit(kind: str, **record) -> None:
    print(json.dumps({"kind": kind, **record}, default=float), flush=True)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _point(p) -> dict:
    return {"source": p.source, "precision": p.precision, "val_accuracy": p.accuracy, "drop": p.drop,
            "latency_ratio": p.latency_ratio,
            "p50_ms": p.latency_p50_ms, "p90_ms": p.latency_p90_ms, "macs": p.macs, "bytes": p.bytes,
            "predicted_drop": p.predicted_drop, "predicted_latency": p.predicted_latency, "plan": p.plan,
            "trial": p.extra.get("trial")}


def compare_uniform(points) -> list[dict]:
    """Per uniform plan: the best sweep point at equal (or lower) latency, and the fastest at equal accuracy."""
    sweep = [p for p in points if p.source in ("sweep", "global", "dense", "trial")]  # the searched side
    rows = []
    for u in sorted((p for p in points if p.source == "uniform"), key=lambda p: p.latency_ratio):
        faster = [p for p in sweep if p.latency_ratio <= u.latency_ratio]
        better = [p for p in sweep if p.accuracy >= u.accuracy]
        at_lat = max(faster, key=lambda p: p.accuracy) if faster else None
        at_acc = min(better, key=lambda p: p.latency_ratio) if better else None
        rows.append({"uniform_precision": u.precision, "uniform_latency_ratio": u.latency_ratio,
                     "uniform_val_accuracy": u.accuracy,
                     "front_source": f"{at_lat.source}/{at_lat.precision}" if at_lat else None,
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


def deployed(m: search.Measurer, teacher, model, precision: str, splits, q_cfg, batch: int, threads: int,
             budget_s: float, dense_acc: float, quantized=None) -> dict:
    """A chosen model as it ships (its fp32 file, or int8 file quantized as the recipe does), measured once.

    Test accuracy of the shipped file (ONNX Runtime for int8, the torch model for fp32); latency of
    that file against the dense fp32 file, and both float models in torch eager, in one rotation.
    """
    from torchslim.measure.ort import compare_ort_latency

    if precision == "int8":
        q = quantized or finish_int8(model, q_cfg, splits.train, splits.val, None, threads,
                                     dense_acc)[0]
        test, file = q.evaluate(splits.test, threads=threads)["accuracy"], q.int8_onnx
    else:
        test, file = accuracy(model, splits.test.x, splits.test.y), m.onnx(model)
    t = compare_ort_latency({"dense": m.dense_file(), "cand": file}, splits.test.x[:1], batch, threads=threads,
                            budget_s=budget_s, torch_models={"eager_dense": teacher, "eager_cand": model})
    ms = {k: v["median_ms"] for k, v in t.items()}
    return {"test_accuracy": test, "ort_p50_ms": ms["cand"], "ort_speedup": ms["dense"] / ms["cand"],
            "eager_speedup": ms["eager_dense"] / ms["eager_cand"], "vs_dense_eager": ms["eager_dense"] / ms["cand"],
            "dense_ort_ms": ms["dense"], "dense_eager_ms": ms["eager_dense"]}


def reproduce(out: Path, r, splits, threads: int) -> dict:
    """``torchslim run`` on the emitted recipe: the shipped file's test accuracy against the search's."""
    from torchslim.measure.ort import ort_accuracy

    t0 = time.time()
    again = out / "reproduce"
    if again.exists():  # this benchmark's own earlier replay (a run folder refuses to be overwritten)
        shutil.rmtree(again)
    run = ts.run_recipe(out / "recipe.yaml", out=again, progress=False)
    if r.chosen.precision == "int8":
        again = ort_accuracy(str(run / "model.int8.onnx"), splits.test.x, splits.test.y, threads=threads)
    else:
        name = "finetuned.slim" if (run / "models" / "finetuned.slim").is_file() else "pruned.slim"
        again = accuracy(ts.load(run / "models" / name).eval(), splits.test.x, splits.test.y)
    return {"precision": r.chosen.precision, "search_test_accuracy": r.metrics["test_accuracy"],
            "recipe_test_accuracy": again, "difference_points": 100 * (again - r.metrics["test_accuracy"]),
            "within_0.1": abs(100 * (again - r.metrics["test_accuracy"])) <= 0.1 + 1e-9,
            "seconds": time.time() - t0}


def tp_global(teacher, ratio: float, round_to: int, example: torch.Tensor):
    """Torch-Pruning 1.6 global pruning at ``ratio`` (a new model): L2 group magnitude, last Linear ignored."""
    import torch_pruning as tp

    model = copy.deepcopy(teacher).eval()
    last = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  global_pruning=True, pruning_ratio=ratio, ignored_layers=[last], round_to=round_to)
    pruner.step()
    return model.eval()


def tp_latency(m: search.Measurer, model, precision: str, q_cfg, splits, budget) -> float:
    """Measured latency ratio of ``model``'s file in ``precision`` against the dense fp32 file."""
    from torchslim.measure.ort import compare_ort_latency
    from torchslim.quant import quantize

    file = m.onnx(model)
    if precision == "int8":
        file = quantize(model, q_cfg, calib=splits.train, example=m.example, fp32_onnx=file).int8_onnx
    t = compare_ort_latency({"dense": m.dense_file(), "cand": file}, m.example[:1], budget.batch,
                            threads=budget.threads, budget_s=budget.latency_budget_s)
    return t["cand"]["median_ms"] / t["dense"]["median_ms"]


def tp_at_latency(m, teacher, target: float, precision: str, space, q_cfg, splits, budget, steps: int) -> tuple:
    """Bisect Torch-Pruning's global ratio to the ``target`` latency ratio; the (ratio, measured ratio) closest."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        lat = tp_latency(m, tp_global(teacher, mid, space.round_to, m.example[:1]), precision, q_cfg, splits,
                         budget)
        log(f"torch_pruning global ratio {mid:.3f}: {precision} latency {lat:.3f}x (target {target:.3f}x)")
        if best is None or abs(lat - target) < abs(best[1] - target):
            best = (mid, lat)
        lo, hi = (mid, hi) if lat > target else (lo, mid)
    return best


def uniform_at_accuracy(run, uniform: list, p, target_drop: float, splits, ft, steps: int) -> dict:
    """The fastest uniform plan as accurate as the chosen one after the same fine-tune (validation).

    Per precision, the uniform points, fastest first, are bisected like the search's finalists
    (:func:`~torchslim.search.finalists.bisect_drop`): a probe is fine-tuned (and quantized, when
    int8) exactly as the chosen point was, and matches when its validation drop is at most the
    chosen one's. The bisection takes accuracy to rise with latency, which holds within one
    precision, not across them (an int8 plan can be faster and more accurate than a smaller fp32
    one). ``speedup`` is the fastest match's measured latency over the chosen point's (both
    against the dense fp32 file); None when no probe matched; 1.0 when the chosen point is itself
    a uniform plan.
    """
    out = {"chosen_latency_ratio": p.latency_ratio, "chosen_val_drop": target_drop}
    if p.source == "uniform":
        return {**out, "uniform": [], "match_latency_ratio": p.latency_ratio, "speedup": 1.0}
    tried, wins = [], []
    for precision in sorted({q.precision for q in uniform}):
        ladder = sorted((q for q in uniform if q.precision == precision), key=lambda q: q.latency_ratio)
        win, probes = bisect_drop(ladder, target_drop,
                                  lambda q: finish_point(run, q, splits.train, splits.val, ft, None, 0), steps, log)
        tried += probes
        wins += [win] if win is not None else []
    win = min(wins, key=lambda f: f.point.latency_ratio, default=None)
    return {**out, "uniform": [{"precision": f.point.precision, "latency_ratio": f.point.latency_ratio,
                                "val_drop": f.metrics["val_drop"], "matches": f.feasible} for f in tried],
            "match_latency_ratio": win.point.latency_ratio if win else None,
            "speedup": win.point.latency_ratio / p.latency_ratio if win else None}


def tp_at_accuracy(m, teacher, p, target_drop: float, space, q_cfg, splits, budget, ft, dense_acc: float,
                   steps: int) -> dict:
    """Torch-Pruning's largest global ratio (bisected) whose fine-tuned file is as accurate as the chosen one.

    Each probe: global pruning at the ratio, the same KD fine-tune, int8 when the chosen point is,
    validation accuracy. The match's latency is then measured against the dense fp32 file.
    """
    lo, hi, best, rows = 0.0, 0.95, None, []
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = tp_global(teacher, mid, space.round_to, m.example[:1])
        kd_finetune_(model, teacher, splits.train, splits.val, ft, seed=finetune_seed(0))
        model.eval()
        if p.precision == "int8":
            val = finish_int8(model, q_cfg, splits.train, splits.val, None, budget.threads, dense_acc)[1]["val_accuracy"]
        else:
            val = accuracy(model, splits.val.x, splits.val.y)
        drop = 100 * (dense_acc - val)
        rows.append({"global_ratio": mid, "val_drop": drop, "matches": drop <= target_drop + 1e-9})
        log(f"torch_pruning global ratio {mid:.3f} fine-tuned: val {drop:+.2f} pts (chosen {target_drop:+.2f})")
        if drop <= target_drop + 1e-9:
            best, lo = (mid, model), mid
        else:
            hi = mid
    lat = tp_latency(m, best[1], p.precision, q_cfg, splits, budget) if best else None
    return {"chosen_latency_ratio": p.latency_ratio, "chosen_val_drop": target_drop, "probes": rows,
            "match_global_ratio": best[0] if best else None, "match_latency_ratio": lat,
            "speedup": lat / p.latency_ratio if lat else None}


def dense_model(args, splits, out: Path) -> torch.nn.Module:
    """The shipped teacher, or the seeded zoo model ``args.model`` trained on ``splits.train`` (cached in ``out``)."""
    if args.model == "fmnist_teacher":
        return ts.load(ROOT / "recipes" / "weights" / "fmnist_teacher.slim").eval()
    cached = out / "dense_trained.slim"
    if cached.is_file():
        return ts.load(cached).eval()
    torch.manual_seed(0)
    model = ts.models.create(args.model)
    ts.fit(model, splits.train, ts.TrainConfig(epochs=args.train_epochs), seed=0, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    ts.save(model, cached)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k training samples, 2k test, 1 fine-tune epoch")
    ap.add_argument("--smoke", action="store_true", help="a run in about a minute that exercises every step "
                    "(the tests run it): 2,000 training, 500 validation and 500 test samples, three kept fractions, "
                    "few candidates and bisection steps; its figures mean nothing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, help="KD fine-tune epochs of each chosen plan (default 1 quick, 3 full)")
    ap.add_argument("--trial-samples", type=int, help="training samples of each candidate's trial KD fine-tune "
                    "(1 epoch; default 2000 quick, 10000 full; 0: no trial fine-tune, BatchNorm re-estimation only)")
    ap.add_argument("--trials", type=int, default=0, help="Optuna trials refining the front (0: the Lagrangian "
                    "front alone; needs pip install 'torchslim[search]')")
    ap.add_argument("--precision", choices=sorted(PRECISION), default="both",
                    help="precisions of the measured points (both: every plan also as an int8 file)")
    ap.add_argument("--int8-layers", choices=["all", "sweep"], default="all",
                    help="int8 points: every layer int8, or the per-layer sweep on the dense model keeps some float")
    ap.add_argument("--finalists", type=int, default=3, help="front points given the full fine-tune before each "
                    "budget's choice (search(finalists=)); 0: the proxy accuracy decides")
    ap.add_argument("--reproduce", action="store_true", help="run the emitted recipe with torchslim's pipeline "
                    "and compare its shipped file's test accuracy with the search's (a \"reproduce\" line)")
    ap.add_argument("--keep", type=float, nargs="+", help="kept fractions per group (default the space's: "
                    "1 0.75 0.5 0.375 0.25)")
    ap.add_argument("--round-to", type=int, default=8, help="channel counts rounded to a multiple of this")
    ap.add_argument("--tp-steps", type=int, default=7, help="bisection steps of Torch-Pruning's global ratio "
                    "(0: no Torch-Pruning baseline)")
    ap.add_argument("--equal-accuracy", type=int, default=3, help="fine-tunes each baseline (uniform ladder, "
                    "Torch-Pruning ratio) may spend finding the plan as accurate as each chosen one (0: skip)")
    ap.add_argument("--model", choices=["fmnist_teacher", "fmnist_student"], default="fmnist_teacher",
                    help="the dense model: the shipped teacher, or a student trained here first")
    ap.add_argument("--train-epochs", type=int, default=5, help="epochs of the student's training (--model "
                    "fmnist_student)")
    ap.add_argument("--out", default=None, help="folder for the search's files (default runs/auto_compression, "
                    "runs/auto_compression_study with --trials)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.quick, args.keep, args.tp_steps = True, args.keep or [1.0, 0.5, 0.25], min(args.tp_steps, 2)
        args.equal_accuracy, args.finalists = min(args.equal_accuracy, 2), min(args.finalists, 2)
        args.train_epochs = 1
    epochs = args.epochs or (1 if args.quick else 3)
    limits = ({"train_limit": 2000, "test_limit": 500} if args.smoke else
              {"train_limit": 10000, "test_limit": 2000} if args.quick else {})
    val_size = 500 if args.smoke else 5000
    splits = ts.data.load_dataset("fashion-mnist", val_size=val_size, seed=0, **limits)
    out = args.out or ROOT / "runs" / ("auto_compression_study" if args.trials else "auto_compression")
    teacher = dense_model(args, splits, Path(out))
    keep = {"keep": args.keep} if args.keep else {}
    space = SearchSpace(**keep, round_to=args.round_to,
                        sensitivity_samples=300 if args.smoke else 1000 if args.quick else 2000,
                        max_candidates=3 if args.smoke else 10 if args.quick else 16, precision=PRECISION[args.precision],
                        int8_layers=args.int8_layers, **({"bn_batches": 2} if args.smoke else {}))
    budget = Budget(max_drop=0.5, batch=args.batch, threads=args.threads,
                    latency_budget_s=0.1 if args.smoke else 0.4 if args.quick else 1.0)
    # Written out as the search trains (recovery_finetune): the baselines' fine-tunes (Torch-Pruning's,
    # the hand-written Deep Compression) get exactly the same config.
    ft = recovery_finetune(ts.TrainConfig(epochs=epochs))
    data = {"dataset": "fashion-mnist", "val_size": val_size, **limits}
    emit("config", model=args.model, quick=args.quick, smoke=args.smoke, precision=args.precision,
         load_average=list(os.getloadavg()), trial_samples=args.trial_samples, trials=args.trials,
         threads=args.threads, batch=args.batch, finetune_epochs=epochs, int8_layers=args.int8_layers,
         finalists=args.finalists,
         train=len(splits.train.y), val=len(splits.val.y), test=len(splits.test.y), space=space.to_dict(),
         torch=torch.__version__)
    start = time.time()
    trial_n = args.trial_samples if args.trial_samples is not None else (
        500 if args.smoke else 2000 if args.quick else 10000)
    trial = ts.TrainConfig(epochs=1) if trial_n else None
    r = search.search(teacher, splits.train, splits.val, budget, space, finetune=ft, test=splits.test,
                      out=out, recipe_data=data, progress=log, trial_finetune=trial, trial_samples=trial_n or None,
                      trials=args.trials, finalists=args.finalists)
    dense_test = accuracy(teacher, splits.test.x, splits.test.y)
    emit("dense", val_accuracy=r.dense.accuracy, test_accuracy=dense_test, p50_ms=r.dense.latency_p50_ms,
         macs=r.dense.macs, bytes=r.dense.bytes)
    for p in r.points:
        emit("point", on_front=p in r.front, **_point(p))
    emit("tables_error", **r.prediction_error)
    m = search.Measurer(teacher, r.groups, space, budget, splits.train.x)
    dense_acc = r.dense.accuracy
    chosen = {"max_drop_0.5": (r.chosen, r.best, r.quantized)}
    val_drop = {"max_drop_0.5": r.metrics["val_drop"]}  # after the full fine-tune (and int8), what the choice used
    emit("finalists", budget="max_drop_0.5", chosen_by=r.metrics.get("chosen_by"),
         rows=json.loads((Path(out) / "pareto.json").read_text()).get("finalists", []))
    # int8 files of the baselines are made as the search's twins are: its per-layer choice of float layers included.
    d8 = [p for p in r.points if p.precision == "int8" and p.source == "dense"]
    q_cfg = int8_config(space).model_copy(update={"exclude": tuple(d8[0].extra["int8"]["excluded"]) if d8 else ()})
    bound = Budget(latency=0.25, batch=args.batch, threads=args.threads)
    # Fine-tunes made as search() makes them (finish_point needs the measurer, the dense accuracy and the int8
    # settings), kept in the search's own store: a plan the search already fine-tuned is loaded, not trained again.
    run = SimpleNamespace(m=m, dense_acc=dense_acc, int8_cfg=q_cfg, budget=budget,
                          finetunes=open_finetune_store(None, Path(out), teacher, space))
    finish = lambda q: finish_point(run, q, splits.train, splits.val, ft, None, 0)  # noqa: E731
    try:
        p = choose(r.points, bound, r.dense)
        if p.source != "dense" and args.finalists:
            # As search() decides under a bound: the most accurate feasible points get the full fine-tune.
            feasible = [q for q in r.front if q.latency_ratio <= bound.latency]
            win, tried = best_within_bound(feasible, finish, args.finalists, log)
            emit("finalists", budget="latency_0.25x", rows=[f.record() for f in tried])
            chosen["latency_0.25x"] = (win.point, win.model, win.quantized)
            val_drop["latency_0.25x"] = win.metrics["val_drop"]
        else:
            chosen["latency_0.25x"] = (p, finish(p)[0] if p.source != "dense" else teacher, None)
    except InfeasibleBudget as exc:
        emit("chosen", budget="latency_0.25x", feasible=False, message=str(exc))
    uniform = [p for p in r.points if p.source == "uniform"]
    shipped = lambda p, model, q=None: deployed(m, teacher, model, p.precision, splits, q_cfg, args.batch,  # noqa: E731
                                                args.threads, budget.latency_budget_s, dense_acc, q)
    equal = {}  # per budget and baseline: the baseline's latency at the chosen one's accuracy over the chosen's
    for name, (p, model, q) in chosen.items():
        d = shipped(p, model, q)
        # The uniform plan nearest in latency at or above the chosen one (either precision), given the same fine-tune.
        slower = [u for u in uniform if u.latency_ratio >= p.latency_ratio]
        u = min(slower, key=lambda q: q.latency_ratio) if slower else None
        u_test = shipped(u, *[finish(u)[i] for i in (0, 2)])["test_accuracy"] if u else None
        emit("chosen", budget=name, feasible=True, source=p.source, precision=p.precision,
             test_drop=100 * (dense_test - d["test_accuracy"]), val_drop_before_finetune=p.drop,
             val_drop_after_finetune=val_drop.get(name),
             latency_ratio=p.latency_ratio, macs=p.macs, bytes=p.bytes, plan=p.plan, **d,
             uniform_precision=u.precision if u else None, uniform_latency_ratio=u.latency_ratio if u else None,
             uniform_test_accuracy=u_test,
             gain_over_uniform_points=100 * (d["test_accuracy"] - u_test) if u_test is not None else None)
        target = val_drop.get(name)
        if args.equal_accuracy and p.source != "dense" and target is not None:
            row = uniform_at_accuracy(run, uniform, p, target, splits, ft, args.equal_accuracy)
            emit("uniform_at_equal_accuracy", budget=name, **row)
            equal[f"{name}_vs_uniform"] = row["speedup"]
        if p.latency_ratio >= 0.99 or not args.tp_steps:
            continue
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            emit("skip", what="torch_pruning", why="torch_pruning is not importable (pip install torch-pruning)")
            continue
        ratio, lat = tp_at_latency(m, teacher, p.latency_ratio, p.precision, space, q_cfg, splits, budget,
                                   args.tp_steps)
        tpm = tp_global(teacher, ratio, space.round_to, splits.train.x[:1])
        kd_finetune_(tpm, teacher, splits.train, splits.val, ft, seed=finetune_seed(0))
        td = shipped(p, tpm.eval())
        emit("torch_pruning", budget=name, precision=p.precision, global_ratio=ratio, bisect_latency_ratio=lat,
             macs=ts.measure.count_macs(tpm, splits.test.x[:1]), **td,
             chosen_test_accuracy=d["test_accuracy"], chosen_ort_p50_ms=d["ort_p50_ms"],
             gain_of_chosen_points=100 * (d["test_accuracy"] - td["test_accuracy"]))
        if args.equal_accuracy and target is not None:
            row = tp_at_accuracy(m, teacher, p, target, space, q_cfg, splits, budget, ft, dense_acc,
                                 args.equal_accuracy)
            emit("torch_pruning_at_equal_accuracy", budget=name, **row)
            equal[f"{name}_vs_torch_pruning"] = row["speedup"]
    if args.trials:
        emit("refinement", rows=compare_refinement(r.points))
        before = choose([p for p in r.points if p.source != "trial"], budget, r.dense)
        if before.plan != r.chosen.plan:
            model = finish(before)[0] if before.source != "dense" else teacher
            test = accuracy(model, splits.test.x, splits.test.y)
            ort = m.latency(model)
            emit("chosen_without_trials", source=before.source, val_drop_before_finetune=before.drop,
                 latency_ratio=before.latency_ratio, test_accuracy=test, ort_speedup=1 / ort["ratio"],
                 refined_latency_ratio=r.chosen.latency_ratio, refined_source=r.chosen.source, plan=before.plan)
        else:
            emit("chosen_without_trials", same_as_refined=True, source=before.source)
    if args.reproduce:
        emit("reproduce", **reproduce(Path(out), r, splits, args.threads))
    rows = compare_uniform(r.points)
    emit("uniform_vs_front", rows=rows)
    gains = [row["gain_points"] for row in rows if row["gain_points"] is not None]
    emit("summary", seconds=time.time() - start, search_seconds=r.seconds, points=len(r.points), front=len(r.front),
         trial_points=sum(p.source == "trial" for p in r.points),
         trial_points_on_front=sum(p.source == "trial" for p in r.front), chosen_source=r.chosen.source,
         chosen_precision=r.chosen.precision, int8_points_on_front=sum(p.precision == "int8" for p in r.front),
         load_average_end=list(os.getloadavg()),
         mean_gain_points_at_equal_latency=sum(gains) / len(gains) if gains else None,
         speedup_at_equal_accuracy_after_finetune=equal,
         targets={"front_points_ge_5": len(r.front) >= 5, "search_minutes_le_30": r.seconds <= 1800})


if __name__ == "__main__":
    main()
