"""The README's Python snippet runs as written (on a small slice of the data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import torchslim.data

ROOT = Path(__file__).resolve().parent.parent
HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists() or bool(
    os.environ.get("TORCHSLIM_DATA"))

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # about 20 s: kept out of the default run


def _python_blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


@pytest.mark.skipif(not HAVE_FMNIST, reason="the snippet loads Fashion-MNIST")
def test_the_readme_library_snippet_runs(tmp_path, monkeypatch):
    (block,) = _python_blocks(ROOT / "README.md")
    real = torchslim.data.load_dataset

    def small(name, *args, **kwargs):  # the same calls on a slice, so the snippet takes seconds
        return real(name, *args, **{**kwargs, "train_limit": 512, "test_limit": 256})

    monkeypatch.setattr(torchslim.data, "load_dataset", small)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 (our own documentation)
    assert (tmp_path / "student.slim").is_file() and (tmp_path / "student.onnx").is_file()
