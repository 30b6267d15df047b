"""Shared fixtures: tiny seeded models and in-memory data."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

# Tiny models gain nothing from threads, and on a busy machine spinning thread
# pools make millisecond tests take seconds.
torch.set_num_threads(1)


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def make_blobs(n: int = 256, classes: int = 4, shape=(1, 8, 8), seed: int = 0) -> Split:
    """Learnable toy data: one random prototype per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, *shape, generator=g)
    y = torch.arange(n) % classes
    x = protos[y] + 0.5 * torch.randn(n, *shape, generator=g)
    return Split(x, y)


def digits_teacher(train, epochs: int) -> torch.nn.Module:
    """A width-8 fmnist_teacher trained on sklearn's digits: the search tests' dense model."""
    import torchslim as ts

    torch.manual_seed(0)
    model = ts.models.create("fmnist_teacher", input_size=8, num_classes=10, width=8, fc=32)
    ts.fit(model, train, ts.TrainConfig(epochs=epochs, lr=3e-3), progress=False)
    return model.eval()


@pytest.fixture
def blobs() -> Split:
    return make_blobs()


@pytest.fixture
def tiny_cnn() -> torch.nn.Module:
    import torchslim.models as models

    torch.manual_seed(0)
    return models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)


@pytest.fixture
def tiny_mlp() -> torch.nn.Module:
    import torchslim.models as models

    torch.manual_seed(0)
    return models.create("lenet300_100", input_size=8, num_classes=4, hidden1=16, hidden2=8)


@pytest.fixture
def hermetic_data_env(monkeypatch, tmp_path):
    """Keep the user's $TORCHSLIM_DATA and ~/.cache out of a data test."""
    monkeypatch.delenv("TORCHSLIM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# tests/fuzz_strategies.py is shared with benchmarks/fuzz_parsers.py
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
