"""Automatic compression under a size bound (issue 13: the sparsity and weight-sharing axes).

A model is searched with :func:`torchslim.search.search` under "size <= B bytes, accuracy
maximised", ``B`` a fraction (``--fraction``, default 1/25) of its dense fp32 ONNX file. The
space: channels kept per group, and per Conv/Linear layer an unstructured sparsity and
weight-sharing bits (the defaults of :class:`~torchslim.search.SearchSpace` under a size bound);
a point's size is its file, written and measured (the packed ``.slim`` for the sparse/shared
points). The chosen plan gets the search's full fine-tune (KD from the dense model, ``--epochs``,
then a third of them for the centroids) and is scored once on test.

Compared at the same bound, with the same fine-tunes (KD, the same epochs, the same data), on test:

* ``uniform``: the dense model with one (sparsity, bits) choice in every layer, the most accurate
  such point within the bound (measured by the same search), finished exactly as the search
  finishes its choice;
* ``deep_compression_user``: Deep Compression as a user writes it with the tools at hand:
  ``torch.nn.utils.prune.global_unstructured`` (L1, every Conv/Linear), the KD fine-tune with the
  masks held, k-means weight sharing at the paper's bits (8 for convolutions, 5 for Linear, as
  :class:`~torchslim.quant.sharing.WeightSharing` defaults), the centroid fine-tune, packed; the
  global sparsity bisected (``--bisect-steps``) until the packed file, before fine-tuning, meets
  the bound.

Nothing here was tuned on these runs: the space's defaults (sparsity 0.5/0.75/0.9/0.95, bits
8/5/4/3, two bases, the centroid fine-tune a third of the epochs) were set before any of them.

Output: JSON lines on stdout (``config``, ``dense``, ``chosen``, ``uniform``, ``deep_compression_user``,
``summary``); progress on stderr.

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/auto_size.py --model fmnist_student --out /tmp/as_student
    PYTHONPATH=src .venv/bin/python benchmarks/auto_size.py --quick      # 10k training samples, 1 epoch
    PYTHONPATH=src .venv/bin/python benchmarks/auto_size.py --smoke      # about a minute: that it runs
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.utils import prune as torch_prune

import torchslim as ts
import torchslim.search as search
from torchslim.search import Budget, SearchSpace
from torchslim.search.finalists import finetune_seed, kd_finetune_, recovery_finetune
from torchslim.search.packed import SHARE_ID, compressible_layers, finish_packed, packed_size, share_finetune
from torchslim.search.recipe import FINETUNE_ID
from torchslim.search.sensitivity import accuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto_compression import dense_model, emit, log  # noqa: E402 (the same models, the same output)


def user_deep_compression(dense: torch.nn.Module, sparsity: float, splits, finetune, kd, seed: int,
                          tune: bool) -> torch.nn.Module:
    """Global L1 pruning with torch.nn.utils.prune, KD fine-tune, k-means at the paper's bits, centroid fine-tune."""
    from torchslim.quant.sharing import WeightSharing, finalize_sharing_, share_weights_

    model = copy.deepcopy(dense)
    layers = [(model.get_submodule(n), "weight") for n in compressible_layers(model)]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    if tune:
        kd_finetune_(model, dense, splits.train, splits.val, finetune, seed=finetune_seed(seed, FINETUNE_ID), kd=kd)
    share_weights_(model, WeightSharing())
    if tune:
        kd_finetune_(model, dense, splits.train, splits.val, share_finetune(finetune),
                     seed=finetune_seed(seed, SHARE_ID), kd=kd, stage=SHARE_ID)
    finalize_sharing_(model)
    return model.eval()


def bisect_user_sparsity(dense, bound: int, splits, steps: int, example) -> tuple[float, int]:
    """The smallest global sparsity whose packed file (k-means at the paper's bits, no fine-tune) meets ``bound``."""
    lo, hi = 0.0, 0.999
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(steps):
            mid = (lo + hi) / 2
            size = packed_size(user_deep_compression(dense, mid, splits, None, None, 0, False), example, Path(tmp))[0]
            lo, hi = (lo, mid) if size <= bound else (mid, hi)
        size = packed_size(user_deep_compression(dense, hi, splits, None, None, 0, False), example, Path(tmp))[0]
    return hi, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["fmnist_teacher", "fmnist_student", "lenet300_100"], default="fmnist_student",
                    help="fmnist_teacher: the shipped weights; the others are trained here first (seeded, "
                    "--train-epochs, cached in OUT/dense_trained.slim)")
    ap.add_argument("--quick", action="store_true", help="10k training samples, 2k test, 1 fine-tune epoch")
    ap.add_argument("--smoke", action="store_true", help="a run of about a minute that exercises every step "
                    "(the tests run it): 2,000 training, 500 validation and 500 test samples, one base, few "
                    "candidates and bisection steps; its figures mean nothing")
    ap.add_argument("--fraction", type=float, default=1 / 25, help="size bound as a fraction of the dense fp32 ONNX")
    ap.add_argument("--epochs", type=int, help="KD fine-tune epochs (default 1 quick, 3 full)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="the recipe seed of every fine-tune")
    ap.add_argument("--bisect-steps", type=int, default=10)
    ap.add_argument("--packed-bases", type=int, default=2, help="channel plans the packed axes are searched on")
    ap.add_argument("--sensitivity-samples", type=int, help="validation samples of the per-layer tables "
                    "(default 1000 quick, 2000 full)")
    ap.add_argument("--trials", type=int, default=0, help="Optuna trials (search(trials=)): each trial's model is "
                    "also measured as a packed file (needs pip install 'torchslim[search]')")
    ap.add_argument("--train-epochs", type=int, default=5, help="epochs of the student's training (fmnist_student)")
    ap.add_argument("--out", default=None, help="run folder (default runs/auto_size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.quick, args.train_epochs, args.packed_bases = True, 1, 1
        args.bisect_steps, args.sensitivity_samples = min(args.bisect_steps, 3), args.sensitivity_samples or 300
    epochs = args.epochs or (1 if args.quick else 3)
    limits = ({"train_limit": 2000, "test_limit": 500} if args.smoke else
              {"train_limit": 10000, "test_limit": 2000} if args.quick else {})
    val_size = 500 if args.smoke else 5000
    splits = ts.data.load_dataset("fashion-mnist", val_size=val_size, seed=0, **limits)
    out = Path(args.out or Path(__file__).resolve().parent.parent / "runs" / "auto_size")
    dense = dense_model(args, splits, out)
    space = SearchSpace(round_to=4, precision=["fp32"], max_candidates=3 if args.smoke else 8 if args.quick else 12,
                        sensitivity_samples=args.sensitivity_samples or (1000 if args.quick else 2000),
                        packed_bases=args.packed_bases)
    probe = search.Measurer(dense, [], space, Budget(size_bytes=1), splits.train.x)
    bound = int(args.fraction * len(probe.dense_file()))
    budget = Budget(size_bytes=bound, batch=args.batch, threads=args.threads,
                    latency_budget_s=0.1 if args.smoke else 0.4)
    # Written out as the search trains (recovery_finetune): the baselines' fine-tunes (Torch-Pruning's,
    # the hand-written Deep Compression) get exactly the same config.
    ft = recovery_finetune(ts.TrainConfig(epochs=epochs))
    emit("config", model=args.model, quick=args.quick, smoke=args.smoke, trials=args.trials, fraction=args.fraction, size_bytes=bound, epochs=epochs,
         seed=args.seed, threads=args.threads, load_average=list(os.getloadavg()), train=len(splits.train.y),
         val=len(splits.val.y), test=len(splits.test.y), space=space.to_dict(), torch=torch.__version__)
    start = time.time()
    r = search.search(dense, splits.train, splits.val, budget, space, finetune=ft, test=splits.test, out=out,
                      seed=args.seed, recipe_data={"dataset": "fashion-mnist", "val_size": val_size, **limits},
                      progress=log, trials=args.trials)
    dense_test = accuracy(dense, splits.test.x, splits.test.y)
    emit("dense", val_accuracy=r.dense.accuracy, test_accuracy=dense_test, onnx_bytes=r.dense.bytes)
    m = r.metrics
    emit("chosen", precision=r.chosen.precision, source=r.chosen.source, plan=r.chosen.plan,
         codes=r.chosen.extra.get("packed"), proxy_drop=r.chosen.drop, val_drop=m["val_drop"],
         test_accuracy=m["test_accuracy"], test_drop=100 * (dense_test - m["test_accuracy"]),
         bytes=m.get("bytes", r.chosen.bytes), chosen_by=m.get("chosen_by"), search_seconds=r.seconds,
         trial=r.chosen.extra.get("trial"))
    # What finish_packed needs of a search: a measurer over its groups, the dense accuracy, the space, the bound.
    run = SimpleNamespace(m=search.Measurer(copy.deepcopy(dense).eval(), r.groups, space, budget, splits.train.x),
                          dense_acc=r.dense.accuracy, space=space, budget=budget, groups=r.groups)
    uniform = [p for p in r.points if p.source == "uniform" and p.precision == "packed" and p.bytes <= bound]
    u_test = None
    if uniform:
        u = max(uniform, key=lambda p: p.accuracy)
        model, um = finish_packed(run, u, splits.train, splits.val, ft, None, args.seed)
        u_test = accuracy(model, splits.test.x, splits.test.y)
        emit("uniform", codes=sorted(set(u.extra["packed"].values())), proxy_drop=u.drop, val_drop=um["val_drop"],
             bytes=um["bytes"], test_accuracy=u_test, gain_of_chosen_points=100 * (m["test_accuracy"] - u_test))
    sparsity, proxy_bytes = bisect_user_sparsity(dense, bound, splits, args.bisect_steps, splits.train.x[:2])
    user = user_deep_compression(dense, sparsity, splits, ft, None, args.seed, True)
    with tempfile.TemporaryDirectory() as tmp:
        user_bytes = packed_size(user, splits.train.x[:2], Path(tmp))[0]
    user_test = accuracy(user, splits.test.x, splits.test.y)
    emit("deep_compression_user", global_sparsity=sparsity, proxy_bytes=proxy_bytes, bytes=user_bytes,
         within_bound=user_bytes <= bound, val_drop=100 * (r.dense.accuracy - accuracy(user, splits.val.x,
                                                                                           splits.val.y)),
         test_accuracy=user_test, gain_of_chosen_points=100 * (m["test_accuracy"] - user_test))
    emit("summary", seconds=time.time() - start, search_seconds=r.seconds, points=len(r.points),
         packed_points=sum(p.precision == "packed" for p in r.points), bound=bound,
         trial_packed_points=sum(p.precision == "packed" and p.source == "trial" for p in r.points),
         trial_packed_within_bound=sum(p.precision == "packed" and p.source == "trial" and p.bytes <= bound
                                       for p in r.points),
         chosen_bytes=m.get("bytes", r.chosen.bytes), chosen_test=m["test_accuracy"], uniform_test=u_test,
         user_test=user_test, load_average_end=list(os.getloadavg()))


if __name__ == "__main__":
    main()
