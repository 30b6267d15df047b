"""Deep Compression on Fashion-MNIST: prune → weight sharing (centroids fine-tuned) → packed artifact.

For LeNet-300-100 and LeNet-5 (Caffe 20-50-500), with the library's own verbs
(the ones the ``prune``, ``share_weights`` and ``pack`` stages run):

1. train the dense model (Adam, cosine);
2. prune it gradually (AGP, :func:`~torchslim.prune.gradual_pruning_hook`) to Deep
   Compression's per-layer densities (LeNet-300-100 8/9/26%, LeNet-5 66/12/8/19%),
   distilling from the dense model (Hinton KD);
3. share weights (:func:`~torchslim.quant.sharing.share_weights_`: conv 8 bits,
   linear 4 bits here (``--linear-bits``; the library's default is the paper's 5),
   linear init) and fine-tune the centroids, distilling again;
4. pack (:func:`~torchslim.quant.pack.pack`, canonical Huffman), load the file
   back with ``ts.load`` and evaluate *that*.

Prints JSON lines: ``config``; per model ``dense``, ``pruned``, ``shared``,
``packed`` (bytes, compression vs dense fp32 tensors, bit-exact check, accuracy of
the loaded file, the per-layer table) and ``summary`` (drop vs dense and the issue's
targets); ``reference`` lines with Deep Compression's Table 1 (MNIST; only
Fashion-MNIST is available here, so accuracies are not comparable, rates are).
Run from the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/deep_compression.py --quick   # a few minutes on 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/deep_compression.py           # full training set
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import torchslim as ts
from torchslim.data import load_dataset
from torchslim.distill import DistillObjective, KDConfig
from torchslim.prune import GradualSchedule, UnstructuredPruning, at_sparsity, gradual_pruning_hook, prune_
from torchslim.quant.pack import PackConfig, pack
from torchslim.quant.sharing import WeightSharing, finalize_sharing_, share_weights_
from torchslim.train import TrainConfig, fit
from torchslim.train.loop import count_steps

#: Deep Compression, Table 1 (MNIST): dense fp32 KB -> compressed KB, top-1 error dense -> compressed.
REFERENCE = [
    {"model": "lenet300_100", "dense_kb": 1070, "compressed_kb": 27, "rate": 40, "error": [1.64, 1.58]},
    {"model": "lenet5", "dense_kb": 1720, "compressed_kb": 44, "rate": 39, "error": [0.80, 0.74]},
]
#: Per-layer sparsity (1 - Deep Compression's Table 2/3 density); the first entry is the config's ``sparsity``.
SPARSITY = {
    "lenet300_100": {"classifier.0": 0.92, "classifier.2": 0.91, "classifier.4": 0.74},
    "lenet5": {"classifier.0": 0.92, "features.0": 0.34, "features.2": 0.88, "classifier.2": 0.81},
}
TARGET_RATE = {"lenet300_100": 40.0, "lenet5": 39.0}


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


def accuracy(model: nn.Module, split: Any) -> float:
    return ts.evaluate(model, split)["accuracy"]


def kd(student: nn.Module, teacher: nn.Module) -> DistillObjective:
    return DistillObjective(student, teacher, KDConfig(temperature=4.0, alpha=0.3))


def run_model(name: str, splits: Any, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = ts.models.create(name, input_size=splits.input_shape[-1])
    bs = 128
    started = time.perf_counter()
    fit(model, splits.train, TrainConfig(epochs=args.dense_epochs, batch_size=bs, optimizer="adam", lr=1e-3,
                                         schedule="cosine"), seed=args.seed, progress=False)
    dense = copy.deepcopy(model).eval()
    dense_acc = accuracy(dense, splits.test)
    emit("dense", model=name, accuracy=dense_acc, params=sum(p.numel() for p in model.parameters()),
         seconds=round(time.perf_counter() - started, 1))

    started = time.perf_counter()
    layers = SPARSITY[name]
    first, *rest = layers
    config = UnstructuredPruning(scope="layer", sparsity=layers[first], overrides={k: layers[k] for k in rest},
                                 layer_types=["Linear", "Conv2d"])
    prune_train = TrainConfig(epochs=args.prune_epochs, batch_size=bs, optimizer="adam", lr=1e-3, schedule="cosine")
    steps = count_steps(len(splits.train.y), bs) * prune_train.epochs
    schedule = GradualSchedule(start=0.0, end=0.5, frequency=50).placed(config.sparsity, steps)
    prune_(model, at_sparsity(config, 0.0, config.sparsity))
    hook = gradual_pruning_hook(model, config, schedule)
    with kd(model, dense) as loss:
        fit(model, splits.train, prune_train, objective=loss, on_step_end=hook, seed=args.seed + 1, progress=False)
    pruned_acc = accuracy(model, splits.test)
    emit("pruned", model=name, accuracy=pruned_acc, sparsity=ts.prune.global_sparsity(model),
         layers={k: round(v["sparsity"], 4) for k, v in ts.prune.layer_sparsity(model).items()},
         seconds=round(time.perf_counter() - started, 1))

    started = time.perf_counter()
    share_weights_(model, WeightSharing(conv_bits=args.conv_bits, linear_bits=args.linear_bits))
    kmeans_acc = accuracy(model, splits.test)
    share_train = TrainConfig(epochs=args.share_epochs, batch_size=bs, optimizer="adam", lr=3e-4, schedule="cosine")
    with kd(model, dense) as loss:
        fit(model, splits.train, share_train, objective=loss, seed=args.seed + 2, progress=False)
    finalize_sharing_(model)
    shared_acc = accuracy(model, splits.test)
    emit("shared", model=name, accuracy_kmeans_only=kmeans_acc, accuracy=shared_acc, conv_bits=args.conv_bits,
         linear_bits=args.linear_bits, seconds=round(time.perf_counter() - started, 1))

    path = folder / f"{name}.packed.slim"
    report = pack(model.eval(), path, PackConfig(codec=args.codec))
    loaded = ts.load(path).eval()
    sa, sb = model.state_dict(), loaded.state_dict()
    exact = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    packed_acc = accuracy(loaded, splits.test)
    ts.save(model, folder / f"{name}.slim")
    emit("packed", model=name, file_bytes=report.file_bytes, header_bytes=report.header_bytes,
         dense_fp32_bytes=report.dense_bytes, compression=round(report.compression, 2), bit_exact=exact,
         accuracy=packed_acc, plain_slim_bytes=(folder / f"{name}.slim").stat().st_size, codec=args.codec,
         table=report.table())
    summary = {"model": name, "dense_accuracy": dense_acc, "packed_accuracy": packed_acc,
               "drop_points": round(100 * (dense_acc - packed_acc), 2), "compression": round(report.compression, 2),
               "target_rate": TARGET_RATE[name], "meets_rate": report.compression >= TARGET_RATE[name]}
    if name == "lenet300_100":
        summary["meets_drop"] = summary["drop_points"] <= 0.5
    emit("summary", **summary)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k training images, short schedules")
    parser.add_argument("--models", default="lenet300_100,lenet5")
    parser.add_argument("--dense-epochs", type=int)
    parser.add_argument("--prune-epochs", type=int)
    parser.add_argument("--share-epochs", type=int)
    parser.add_argument("--conv-bits", type=int, default=8)
    parser.add_argument("--linear-bits", type=int, default=4, help="4: the 40x target (5 is the library default)")
    parser.add_argument("--codec", default="huffman", choices=["huffman", "lzma", "zstd"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    defaults = (3, 4, 2) if args.quick else (12, 16, 4)
    args.dense_epochs = args.dense_epochs or defaults[0]
    args.prune_epochs = args.prune_epochs or defaults[1]
    args.share_epochs = args.share_epochs or defaults[2]
    torch.set_num_threads(args.threads)
    limit = 10_000 if args.quick else None
    try:
        splits, dataset, why = load_dataset("fashion-mnist", val_size=5000, train_limit=limit), "fashion-mnist", None
    except ts.TorchSlimError as exc:  # offline and not installed: the always-offline fallback
        splits, dataset, why = load_dataset("digits", val_size=0.15), "digits", str(exc)[:200]
    emit("config", dataset=dataset, fallback_reason=why, train=len(splits.train.y), test=len(splits.test.y),
         quick=args.quick, epochs=[args.dense_epochs, args.prune_epochs, args.share_epochs],
         bits={"conv": args.conv_bits, "linear": args.linear_bits}, codec=args.codec, threads=args.threads,
         torch=torch.__version__, python=platform.python_version())
    for ref in REFERENCE:
        emit("reference", source="Han, Mao & Dally 2016, Table 1 (MNIST)", **ref)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            run_model(name, splits, args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
