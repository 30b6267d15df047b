"""Datasets for torchslim: IDX reading, verified download, splits and normalization.

The one call most code needs is :func:`load_dataset`::

    from torchslim.data import load_dataset
    splits = load_dataset("fashion-mnist", val_size=5000, seed=0)
    splits.train.x.shape      # torch.Size([55000, 1, 28, 28]), float32, normalized
    splits.mean, splits.std   # per-channel statistics of the training split

Datasets: ``fashion-mnist`` and ``mnist`` (IDX files, found locally or
downloaded with a SHA-256 check, see :func:`resolve_dataset_dir`),
``digits`` (scikit-learn's bundled 8x8 digits, always offline) and
``synthetic`` (seeded toy data for tests, see :func:`make_synthetic`).
All errors about data are :class:`~torchslim.errors.DataError`.
"""

from torchslim.data.datasets import (
    DatasetSplits,
    RawDataset,
    TensorSplit,
    list_datasets,
    load_dataset,
    make_splits,
    make_synthetic,
)
from torchslim.data.download import download_file, sha256_file
from torchslim.data.idx import read_idx, write_idx
from torchslim.data.sources import (
    ENV_VAR,
    IDX_FILES,
    IDX_SOURCES,
    IdxSource,
    default_cache_dir,
    find_idx_files,
    resolve_dataset_dir,
)

__all__ = [
    "ENV_VAR",
    "IDX_FILES",
    "IDX_SOURCES",
    "DatasetSplits",
    "IdxSource",
    "RawDataset",
    "TensorSplit",
    "default_cache_dir",
    "download_file",
    "find_idx_files",
    "list_datasets",
    "load_dataset",
    "make_splits",
    "make_synthetic",
    "read_idx",
    "resolve_dataset_dir",
    "sha256_file",
    "write_idx",
]
