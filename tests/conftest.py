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


_DIGITS_TEACHERS: dict[tuple[int, int], tuple[object, torch.nn.Module]] = {}


def digits_teacher(train, epochs: int) -> torch.nn.Module:
    """A width-8 fmnist_teacher trained on sklearn's digits: the search tests' dense model.

    Trained once per session for each (training split, epochs) and handed out as a copy, so the
    search test modules share the training and none can change another's model.
    """
    import copy

    import torchslim as ts

    key = (id(train), epochs)
    held = _DIGITS_TEACHERS.get(key)
    if held is None or held[0] is not train:  # the split is held too: its id cannot pass to another object
        torch.manual_seed(0)
        model = ts.models.create("fmnist_teacher", input_size=8, num_classes=10, width=8, fc=32)
        ts.fit(model, train, ts.TrainConfig(epochs=epochs, lr=3e-3), progress=False)
        held = _DIGITS_TEACHERS[key] = (train, model.eval())
    return copy.deepcopy(held[1])


def require_fashion_mnist() -> None:
    """Skip the calling test when Fashion-MNIST's files are not on this machine (nothing is downloaded)."""
    from torchslim.data import resolve_dataset_dir
    from torchslim.errors import DataError

    try:
        resolve_dataset_dir("fashion-mnist", download=False)
    except DataError:
        pytest.skip("Fashion-MNIST is not available offline")


@pytest.fixture(scope="session")
def splits():
    """sklearn's digits (train / val / test), loaded once: the search tests' data (read, never changed)."""
    import torchslim as ts

    return ts.data.load_dataset("digits")


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
