"""Scaling of the distributed training path: 1 process vs 2 DDP processes (gloo, CPU).

Each process uses one thread. The same compute-bound job (training the
fmnist_teacher preset on Fashion-MNIST, digits when absent, with torchslim's
own ``fit``) runs once as a plain process and once under ``torchrun
--nproc_per_node=2``; the global batch is the same, so both do the same work
per step. Prints JSON lines and the speed-up; target >= 1.6x.

    python benchmarks/ddp_scaling.py [--samples 6144] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import torch

    import torchslim as ts
    from torchslim.data import load_dataset
    from torchslim.errors import DataError
    from torchslim.train.distributed import init_distributed, shutdown

    torch.set_num_threads(1)
    dist, device = init_distributed("cpu")
    try:
        splits = load_dataset("fashion-mnist", val_size=0.0, train_limit=args.samples, download=False)
    except DataError:
        splits = load_dataset("digits", val_size=0.0)
    torch.manual_seed(0)
    sizes = dict(in_channels=splits.input_shape[0], num_classes=splits.num_classes, input_size=splits.input_shape[-1])
    model = ts.models.create("fmnist_teacher", **sizes)
    config = ts.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3)
    ts.fit(model, splits.train, ts.TrainConfig(epochs=1, batch_size=args.batch_size), progress=False, dist=dist)  # warm-up
    started = time.perf_counter()
    history = ts.fit(model, splits.train, config, progress=False, dist=dist)
    seconds = time.perf_counter() - started
    if dist.is_main:
        samples = sum(len(splits.train.y) for _ in history)
        print(json.dumps({"processes": dist.world_size, "threads_per_process": torch.get_num_threads(),
                          "dataset": splits.name, "samples": samples, "seconds": round(seconds, 2),
                          "samples_per_second": round(samples / seconds, 1)}), flush=True)
    shutdown(dist)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6144)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [__file__, "--worker", "--samples", str(args.samples), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size)]
    one = subprocess.run([sys.executable, *common], capture_output=True, text=True, env=env, check=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *common], capture_output=True, text=True, env=env, check=True)
    r1, r2 = json.loads(one.stdout.strip().splitlines()[-1]), json.loads(two.stdout.strip().splitlines()[-1])
    print(json.dumps(r1))
    print(json.dumps(r2))
    speedup = r2["samples_per_second"] / r1["samples_per_second"]
    print(json.dumps({"summary": True, "speedup_2_vs_1": round(speedup, 3), "target": 1.6, "pass": speedup >= 1.6}))


if __name__ == "__main__":
    main()
