"""Distillation methods on Fashion-MNIST: fmnist_teacher (shipped weights) -> fmnist_student.

Every method trains the same student initialisation (per seed) with the same
TrainConfig (Adam lr 3e-3, cosine, batch 128, ``--epochs``) and the same batch
order; only the objective differs:

- ``alone``      -- cross-entropy only (the student trained alone);
- ``kd_online``  -- Hinton KD (T = ``--kd-temperature``, default 4; alpha = ``--alpha``, default 0.1),
                    teacher run on every batch;
- ``kd_cached``  -- the same KD from the teacher-output cache (fp16 logits, built once);
- ``hints_kd``   -- KD + a FitNets hint from the student's ``features`` to the teacher's
                    (a 1x1-conv adapter, 32 -> 64 channels), from the cache (logits + features);
- ``dkd``        -- Decoupled KD (T = ``--dkd-temperature``, default 4; task 1, TCKD 1,
                    NCKD ``--dkd-nckd``, default 1), from the cache;
- ``dkd_hints``  -- DKD + the hint (not in the default set; ``--methods`` adds it).

Caches are built once per run (their build time is printed in ``cache`` lines)
and reused across seeds; each run's fingerprint check is part of its time.

Output: JSON lines on stdout -- ``config``, ``teacher``, ``cache``, one ``run``
per (method, seed) with test/val accuracy and per-epoch seconds, one
``method_summary`` per method (mean and standard deviation over seeds), and a
final ``summary`` with the two targets:

- the best method recovers >= 40 % of the teacher-student test-accuracy gap
  over the student alone (means over seeds);
- cached KD's seconds per epoch <= 1.2x the student alone's: per seed, the ratio of the
  two runs' median epoch times (they run one after the other), then the median over seeds.

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/distillation.py --quick      # ~2-5 min on 2 busy cores
    PYTHONPATH=src .venv/bin/python benchmarks/distillation.py              # 10 epochs x 3 seeds x 5 methods
    PYTHONPATH=src .venv/bin/python benchmarks/distillation.py --jobs 15    # runs in parallel processes
    # the validation search's picks (benchmarks/README.md), run 2026-11-27:
    PYTHONPATH=src .venv/bin/python benchmarks/distillation.py --methods alone,kd_cached,dkd \
        --kd-temperature 8 --alpha 0.5 --dkd-temperature 2 --dkd-nckd 1

``--temperature`` sets both T's; ``--kd-temperature`` / ``--dkd-temperature`` override one.

``--jobs N`` runs the (method, seed) runs in N processes of one torch thread each
(only sensible with N free cores; per-epoch times then include memory-bandwidth
sharing between processes). Threads: one per process (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TEACHER_WEIGHTS = ROOT / "recipes" / "weights" / "fmnist_teacher.slim"
METHODS = ("alone", "kd_online", "kd_cached", "hints_kd", "dkd")
EXTRA_METHODS = ("dkd_hints",)  # not run by default
TARGET_GAP = 0.40
TARGET_TIME_RATIO = 1.2


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 epochs, 1 seed, 10000 training samples (a smoke run, not the targets' setting)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10; 2 with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 1 with --quick)")
    p.add_argument("--seed-list", default=None, help="explicit comma-separated seeds (overrides --seeds), e.g. to "
                   "finish an interrupted run")
    p.add_argument("--train-limit", type=int, default=None,
                   help="training samples (default all 55000; 10000 with --quick)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of " + ",".join(METHODS + EXTRA_METHODS))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--temperature", type=float, default=4.0,
                   help="T of KD and DKD (unless --kd-temperature / --dkd-temperature set one of them)")
    p.add_argument("--kd-temperature", type=float, default=None, help="KD's T (default: --temperature)")
    p.add_argument("--dkd-temperature", type=float, default=None, help="DKD's T (default: --temperature)")
    p.add_argument("--alpha", "--kd-alpha", dest="alpha", type=float, default=0.1, help="KD: weight of the label loss")
    p.add_argument("--hint-weight", type=float, default=1.0)
    p.add_argument("--dkd-nckd", type=float, default=1.0, help="DKD: weight of the non-target term (paper's beta)")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (one torch thread each)")
    p.add_argument("--build-threads", type=int, default=1,
                   help="torch threads while building the caches and evaluating the teacher (then 1 again)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher", default=str(TEACHER_WEIGHTS), help="teacher .slim file")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 10)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.seed_list = ([int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds)))
    if args.train_limit is None and args.quick:
        args.train_limit = 10000
    args.kd_temperature = args.temperature if args.kd_temperature is None else args.kd_temperature
    args.dkd_temperature = args.temperature if args.dkd_temperature is None else args.dkd_temperature
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS + EXTRA_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    return args


def setup(args: argparse.Namespace) -> tuple[Any, Any]:
    """Threads, data and the teacher (the same in the parent and every worker)."""
    torch.set_num_threads(1)
    import torchslim as ts
    from torchslim.data import load_dataset

    splits = load_dataset("fashion-mnist", val_size=5000, train_limit=args.train_limit, seed=0)
    teacher = ts.load(args.teacher).float().to(args.device).eval()
    return splits, teacher


def distill_config(method: str, args: argparse.Namespace):
    from torchslim.distill import DistillConfig, DKDConfig, HintConfig, KDConfig

    kd = KDConfig(temperature=args.kd_temperature, alpha=args.alpha)
    if method == "kd_online":
        return DistillConfig(logits=kd, teacher_outputs="online")
    if method == "kd_cached":
        return DistillConfig(logits=kd, teacher_outputs="cached")
    if method == "hints_kd":
        return DistillConfig(logits=kd, hints=HintConfig(layers={"features": "features"}, weight=args.hint_weight),
                             teacher_outputs="cached")
    dkd = DKDConfig(temperature=args.dkd_temperature, nckd_weight=args.dkd_nckd)
    if method == "dkd":
        return DistillConfig(logits=dkd, teacher_outputs="cached")
    if method == "dkd_hints":
        return DistillConfig(logits=dkd, hints=HintConfig(layers={"features": "features"}, weight=args.hint_weight),
                             teacher_outputs="cached")
    return None


_WORKER: dict[str, Any] = {}


def run_one(method: str, seed: int, args: argparse.Namespace, cache_dir: str,
            caches: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one student with one method and seed; returns the ``run`` record."""
    import torchslim as ts
    from torchslim.distill import distill
    from torchslim.train import TrainConfig, evaluate, fit

    if "splits" not in _WORKER:
        _WORKER["splits"], _WORKER["teacher"] = setup(args)
    splits, teacher = _WORKER["splits"], _WORKER["teacher"]
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="adam", lr=args.lr,
                               schedule="cosine")
    torch.manual_seed(seed)  # the same initialisation for every method of a seed
    student = ts.models.create("fmnist_student").to(args.device)
    started = time.perf_counter()
    config = distill_config(method, args)
    if config is None:
        records = fit(student, splits.train, train_config, seed=seed, device=args.device, progress=False)
    else:
        cache = (caches or {}).get(method)
        records = distill(student, teacher, splits.train, config, train_config, seed=seed, device=args.device,
                          progress=False, teacher_cache=cache, cache_dir=None if cache is not None else cache_dir)
    total = time.perf_counter() - started
    epoch_seconds = [r["seconds"] for r in records]
    last = records[-1]
    return {
        "event": "run", "method": method, "seed": seed,
        "test_accuracy": evaluate(student, splits.test, device=args.device)["accuracy"],
        "val_accuracy": evaluate(student, splits.val, device=args.device)["accuracy"],
        "seconds_per_epoch": statistics.median(epoch_seconds),
        "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "cache_seconds": round(last.get("cache_seconds", 0.0), 3),
        "run_seconds": round(total, 2),
        "train_losses": {k: round(v, 5) for k, v in last.items() if k.startswith("train_") and k != "train_accuracy"},
        "teacher_outputs": last.get("teacher_outputs", "none"),
        "params": sum(p.numel() for p in student.parameters()),
    }


def _worker_run(method: str, seed: int, args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    return run_one(method, seed, args, cache_dir)


def build_caches(args: argparse.Namespace, splits: Any, teacher: Any, cache_dir: str) -> dict[str, Any]:
    """One cache per distinct cached configuration, built once (and written to ``cache_dir``)."""
    from torchslim.distill import cache_teacher_outputs

    caches: dict[str, Any] = {}
    built: dict[tuple, Any] = {}
    torch.set_num_threads(args.build_threads)
    for method in args.methods:
        config = distill_config(method, args)
        if config is None or config.teacher_outputs != "cached":
            continue
        key = (config.teacher_layers(), config.cache_format, config.cache_top_k)
        if key not in built:
            started = time.perf_counter()
            built[key] = cache_teacher_outputs(teacher, splits.train, layers=config.teacher_layers(),
                                               cache_format=config.cache_format, top_k=config.cache_top_k,
                                               cache_dir=cache_dir, device=args.device)
            emit({"event": "cache", "layers": list(key[0]), "format": key[1], "samples": built[key].num_samples,
                  "megabytes": round(built[key].nbytes / 1e6, 2),
                  "build_seconds": round(time.perf_counter() - started, 2)})
        caches[method] = built[key]
    torch.set_num_threads(1)
    return caches


def summarize(runs: list[dict[str, Any]], teacher_accuracy: float, args: argparse.Namespace) -> dict[str, Any]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    summaries = {}
    for method in args.methods:
        rs = by_method.get(method, [])
        if not rs:
            continue
        acc = [r["test_accuracy"] for r in rs]
        summaries[method] = {
            "event": "method_summary", "method": method, "seeds": len(rs),
            "test_accuracy_mean": statistics.mean(acc),
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "val_accuracy_mean": statistics.mean(r["val_accuracy"] for r in rs),
            "seconds_per_epoch": statistics.median(s for r in rs for s in r["epoch_seconds"]),
        }
    out: dict[str, Any] = {"event": "summary", "teacher_test_accuracy": teacher_accuracy}
    if "alone" in summaries:
        alone = summaries["alone"]["test_accuracy_mean"]
        gap = teacher_accuracy - alone
        for method, s in summaries.items():
            s["gap_recovered"] = (s["test_accuracy_mean"] - alone) / gap if gap > 0 else None
            # Per seed, the method's median epoch over alone's (the two ran next to each other, so
            # a change in machine load between seeds cancels), then the median over seeds.
            alone_by_seed = {r["seed"]: r["seconds_per_epoch"] for r in by_method["alone"]}
            ratios = [r["seconds_per_epoch"] / alone_by_seed[r["seed"]] for r in by_method[method]
                      if r["seed"] in alone_by_seed]
            s["epoch_time_vs_alone"] = statistics.median(ratios) if ratios else None
            s["pooled_epoch_time_vs_alone"] = s["seconds_per_epoch"] / summaries["alone"]["seconds_per_epoch"]
        others = [m for m in summaries if m != "alone"]
        if others:
            best = max(others, key=lambda m: summaries[m]["test_accuracy_mean"])
            out.update(best_method=best, best_gap_recovered=summaries[best]["gap_recovered"],
                       target_gap_recovered=TARGET_GAP,
                       gap_pass=summaries[best]["gap_recovered"] is not None
                       and summaries[best]["gap_recovered"] >= TARGET_GAP)
        if "kd_cached" in summaries:
            ratio = summaries["kd_cached"]["epoch_time_vs_alone"]
            out.update(cached_epoch_time_vs_alone=ratio, target_time_ratio=TARGET_TIME_RATIO,
                       time_pass=ratio <= TARGET_TIME_RATIO)
        if "kd_online" in summaries:
            out["online_epoch_time_vs_alone"] = summaries["kd_online"]["epoch_time_vs_alone"]
    out["methods"] = {m: {k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items() if k != "event"}
                      for m, s in summaries.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    splits, teacher = setup(args)
    _WORKER["splits"], _WORKER["teacher"] = splits, teacher
    from torchslim.train import evaluate

    emit({"event": "config", "epochs": args.epochs, "seeds": args.seed_list, "train_samples": len(splits.train.y),
          "methods": args.methods, "optimizer": "adam", "lr": args.lr, "schedule": "cosine",
          "batch_size": args.batch_size, "temperature": args.temperature, "kd_temperature": args.kd_temperature,
          "alpha": args.alpha, "dkd_temperature": args.dkd_temperature,
          "hint_weight": args.hint_weight, "dkd_nckd_weight": args.dkd_nckd, "jobs": args.jobs,
          "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "threads_per_process": 1})
    torch.set_num_threads(args.build_threads)
    teacher_accuracy = evaluate(teacher, splits.test, device=args.device)["accuracy"]
    torch.set_num_threads(1)
    emit({"event": "teacher", "test_accuracy": teacher_accuracy,
          "params": sum(p.numel() for p in teacher.parameters())})

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="torchslim-distill-bench-") as cache_dir:
        caches = build_caches(args, splits, teacher, cache_dir)
        jobs = [(method, seed) for seed in args.seed_list for method in args.methods]
        if args.jobs <= 1:
            for method, seed in jobs:  # methods interleaved within each seed: machine noise hits all alike
                runs.append(run_one(method, seed, args, cache_dir, caches))
                emit(runs[-1])
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            # longest runs first, so the pool's tail is short
            jobs.sort(key=lambda j: j[0] != "kd_online")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
                futures = [pool.submit(_worker_run, m, s, args, cache_dir) for m, s in jobs]
                for future in as_completed(futures):
                    runs.append(future.result())
                    emit(runs[-1])
    summary = summarize(runs, teacher_accuracy, args)
    for s in summary["methods"].values():
        emit({"event": "method_summary", **s})
    summary["wall_seconds"] = round(time.perf_counter() - wall, 1)
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
