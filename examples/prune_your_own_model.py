"""Structured pruning of your own model: channels physically removed, MACs halved.

The model below is not a torchslim preset: it has a residual addition and a
concatenation, the couplings that make channel pruning hard. ``prune_channels``
traces it with torch.fx, removes the least important channels in two steps
(distilling from the unpruned model for an epoch after each) and returns an
ordinary, smaller ``nn.Module``. Runs in seconds on a slice of Fashion-MNIST
(or scikit-learn's digits); the tests run it. Usage::

    python examples/prune_your_own_model.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

import torchslim as ts
from torchslim.data import load_dataset
from torchslim.errors import DataError
from torchslim.prune.structured import ChannelPruning, finetune, prune_channels


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TwoBranchNet(nn.Module):
    """A stem, a residual block, two concatenated branches and an MLP head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        self.block = nn.Sequential(conv_bn(width, width), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(width))
        self.left, self.right = conv_bn(width, width), conv_bn(width, width // 2)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear((width + width // 2) * 16, 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))                     # residual: both sides keep the same channels
        x = torch.cat([self.left(x), self.right(x)], dim=1)   # concat: channel offsets shift
        return self.head(self.pool(x))


def build(**args) -> nn.Module:
    """The factory a saved file names; ``ts.load(path, factory=build)`` rebuilds the model with it."""
    return TwoBranchNet(**args)


def main(out_dir: Path) -> dict:
    torch.manual_seed(0)
    try:
        splits = load_dataset("fashion-mnist", val_size=500, train_limit=2000, test_limit=1000, download=False)
    except DataError:
        splits = load_dataset("digits", val_size=0.1)
    args = {"in_channels": splits.input_shape[0], "num_classes": splits.num_classes, "width": 16}
    model = build(**args)
    ts.fit(model, splits.train, ts.TrainConfig(epochs=2, lr=3e-3, batch_size=64), progress=False)
    model.eval()
    dense_accuracy = ts.evaluate(model, splits.test)["accuracy"]

    example = splits.test.x[:1]
    result = prune_channels(
        model, example, ChannelPruning(target_macs=0.5, steps=2, importance="l2", round_to=4),
        finetune=lambda m: finetune(m, splits.train, ts.TrainConfig(epochs=1, lr=1e-3, batch_size=64),
                                    teacher=model, progress=False),
    )
    small, report = result.model, result.report
    small.eval()
    print(f"MACs {report.macs_before:,} -> {report.macs_after:,}, params {report.params_before:,} -> "
          f"{report.params_after:,}")

    # A model built outside torchslim is saved with the spec of its factory; loading
    # rebuilds the full-width model with `build` and replays the removed channels.
    path = out_dir / "small.slim"
    ts.save(small, path, spec={"factory": "prune_your_own_model:build", "args": args})
    loaded = ts.load(path, factory=build).eval()
    onnx = ts.export_onnx(small, splits.test.x[:8], out_dir / "small.onnx")
    with torch.no_grad():
        reload_diff = (loaded(splits.test.x[:64]) - small(splits.test.x[:64])).abs().max().item()
    return {
        "dense_accuracy": dense_accuracy,
        "pruned_accuracy": ts.evaluate(small, splits.test)["accuracy"],
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "unsupported": [str(u) for u in report.unsupported],
        "reload_max_abs_diff": reload_diff,
        "onnx_max_abs_diff": onnx["max_abs_diff"],
    }


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="torchslim-example-"))
    out.mkdir(parents=True, exist_ok=True)
    print(main(out))
