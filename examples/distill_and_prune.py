"""Distill, prune, fine-tune, measure and export with the library API.

Runs in seconds on a slice of Fashion-MNIST (or scikit-learn's digits when
Fashion-MNIST is not installed); the tests run it. Usage::

    python examples/distill_and_prune.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import torchslim as ts
from torchslim.data import load_dataset
from torchslim.errors import DataError


def main(out_dir: Path) -> dict:
    torch.manual_seed(0)
    try:
        splits = load_dataset("fashion-mnist", val_size=500, train_limit=2000, test_limit=1000, download=False)
    except DataError:
        splits = load_dataset("digits", val_size=0.1)
    sizes = dict(in_channels=splits.input_shape[0], num_classes=splits.num_classes, input_size=splits.input_shape[-1])

    # A teacher trained briefly here; a real one is trained longer or loaded with ts.load(...).
    teacher = ts.models.create("lenet5", **sizes)
    ts.fit(teacher, splits.train, ts.TrainConfig(epochs=2, lr=2e-3, batch_size=64), progress=False)

    teacher.eval()  # a teacher is used frozen; distill() warns about one left in train mode
    student = ts.models.create("lenet300_100", hidden1=64, hidden2=32, **sizes)
    ts.distill(student, teacher, splits.train, ts.KDConfig(temperature=4.0, alpha=0.3),
               ts.TrainConfig(lr=2e-3, batch_size=64), epochs=2, val=splits.val, progress=False)
    distilled_accuracy = ts.evaluate(student, splits.test)["accuracy"]

    ts.prune_(student, ts.MagnitudePruning(sparsity=0.8, scope="global"))  # masks, in place
    ts.fit(student, splits.train, ts.TrainConfig(epochs=1, lr=1e-3, batch_size=64), progress=False)
    ts.finalize_(student)  # the zeros become permanent

    example = splits.test.x[:1]
    report = ts.profile(student, example, batch_sizes=(1,), latency_budget_s=0.05)
    print(report)
    ts.save(student, out_dir / "student.slim")
    onnx = ts.export_onnx(student, splits.test.x[:8], out_dir / "student.onnx")
    return {
        "teacher_accuracy": ts.evaluate(teacher, splits.test)["accuracy"],
        "distilled_accuracy": distilled_accuracy,
        "pruned_accuracy": ts.evaluate(student, splits.test)["accuracy"],
        "sparsity": ts.prune.global_sparsity(student),
        "file_bytes": (out_dir / "student.slim").stat().st_size,
        "onnx_max_abs_diff": onnx["max_abs_diff"],
    }


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="torchslim-example-"))
    out.mkdir(parents=True, exist_ok=True)
    print(main(out))
