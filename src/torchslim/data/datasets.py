"""Built-in datasets as in-memory tensors, split into train/val/test and normalized.

Every dataset goes through the same two steps:

1. a *raw* loader returns a :class:`RawDataset`: pixel arrays
   ``N x C x H x W`` in their stored type (uint8 for IDX files), integer
   labels, and the official train/test split;
2. :func:`make_splits` carves a validation set out of the training set with
   a seeded permutation (never out of the test set), optionally trims the
   splits for quick runs, computes the per-channel mean and std on the
   resulting training split, and returns normalized float32 tensors.

The datasets are small (Fashion-MNIST is 55 MB as uint8), so everything stays
in memory and all work is vectorized: there is no per-sample Python code.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from torchslim.data.idx import read_idx
from torchslim.data.sources import IDX_SOURCES, IdxSource, find_idx_files, resolve_dataset_dir
from torchslim.errors import DataError

__all__ = [
    "DatasetSplits",
    "RawDataset",
    "TensorSplit",
    "list_datasets",
    "load_dataset",
    "make_splits",
    "make_synthetic",
]

#: Spellings accepted for dataset names, besides the canonical ones.
_ALIASES = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}

#: The digits test split is fixed (not tied to the ``seed`` argument) so that
#: runs with different seeds are scored on the same test images.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True, eq=False)
class TensorSplit(Dataset):
    """One split held as two in-memory tensors; behaves like ``TensorDataset(x, y)``.

    Attributes:
        x: Inputs, float32, ``N x C x H x W``, normalized.
        y: Labels, int64, ``N``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"TensorSplit: {self.x.shape[0]} inputs but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index):
        return self.x[index], self.y[index]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, as :class:`torch.utils.data.TensorDataset` names them."""
        return self.x, self.y


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset ready for training: three splits plus what a report or export needs.

    Attributes:
        name: Canonical dataset name (``"fashion-mnist"``, ...).
        train: Training split (after the validation carve-out and ``train_limit``).
        val: Validation split, carved from the official training set.
        test: The official test split (first ``test_limit`` samples if given).
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        input_shape: ``(C, H, W)`` of one input.
        mean: Per-channel mean of the training split, in units of
            ``raw / pixel_scale``.
        std: Per-channel standard deviation, same units.
        class_names: One name per label value.
        pixel_scale: Raw values are divided by this before normalization
            (255 for uint8 images), so a new raw input ``r`` is fed to the
            model as ``(r / pixel_scale - mean) / std`` per channel.
        source: Where the data came from (a directory, or a description).
    """

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    pixel_scale: float
    source: str


@dataclasses.dataclass(frozen=True, eq=False)
class RawDataset:
    """A dataset as stored, before splitting and normalization.

    Attributes:
        name: Dataset name.
        x_train: Training inputs, ``N x C x H x W``, any real dtype.
        y_train: Training labels, ``N``, integers in ``0 .. num_classes - 1``.
        x_test: Test inputs, same ``C x H x W`` as ``x_train``.
        y_test: Test labels.
        class_names: One name per label value; its length is the class count.
        pixel_scale: Divisor that maps raw values to about ``[0, 1]``
            (255 for uint8 pixels, 1 for data that is already float).
        source: Where the data came from, for reports and error messages.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    pixel_scale: float = 1.0
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted.

    Example:
        >>> list_datasets()
        ['digits', 'fashion-mnist', 'mnist', 'synthetic']
    """
    return sorted([*IDX_SOURCES, "digits", "synthetic"])


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_size: int | float = 0.1,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> DatasetSplits:
    """Load a built-in dataset as normalized in-memory train/val/test tensors.

    ``fashion-mnist`` and ``mnist`` are read from IDX files found by
    :func:`~torchslim.data.resolve_dataset_dir` (explicit ``root``,
    ``$TORCHSLIM_DATA``, the cache, the Debian package directory, then a
    verified download). ``digits`` is scikit-learn's bundled 8x8 digits
    (1797 images, a fixed stratified 1/5 test split) and needs no files.
    ``synthetic`` is :func:`make_synthetic` with its defaults; call that and
    :func:`make_splits` yourself to change its size or shape.

    Args:
        name: One of :func:`list_datasets` (``fmnist`` and underscores are
            accepted too).
        root: Directory to look in first for IDX files (ignored by
            ``digits`` and ``synthetic``).
        val_size: Validation samples taken from the training set: an int is
            a count, a float in ``[0, 1)`` a fraction of the training set.
        train_limit: Keep at most this many training samples (the first of
            the shuffled remainder), for quick runs.
        test_limit: Keep at most the first this-many test samples.
        seed: Seeds the train/val permutation; same seed, same split.
        download: Allow downloading an IDX dataset that is nowhere local.

    Returns:
        A :class:`DatasetSplits`.

    Raises:
        DataError: Unknown name, an argument out of range (the message names
            it), or dataset files missing, corrupt or inconsistent.

    Example:
        >>> splits = load_dataset("digits", val_size=0.1, seed=0)
        >>> splits.input_shape, splits.num_classes, len(splits.test)
        ((1, 8, 8), 10, 359)
    """
    key = _canonical(name)
    if key in IDX_SOURCES:
        raw = _load_idx_dataset(IDX_SOURCES[key], root, download=download)
    elif key == "digits":
        raw = _load_digits()
    else:  # "synthetic"
        raw = make_synthetic()
    return make_splits(
        raw, val_size=val_size, train_limit=train_limit, test_limit=test_limit, seed=seed
    )


def make_splits(
    raw: RawDataset,
    *,
    val_size: int | float = 0.1,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """Split a :class:`RawDataset` into train/val/test and normalize it.

    The validation set is the first ``val_size`` indices of a permutation of
    the training set drawn from ``numpy.random.default_rng(seed)``; the
    training split is the rest, in that shuffled order, cut to
    ``train_limit``. Mean and std per channel are computed on that final
    training split and applied to all three splits.

    Args:
        raw: The dataset as stored.
        val_size: Int count, or float fraction in ``[0, 1)``, of the
            training set to hold out for validation.
        train_limit: At most this many training samples (>= 1), or None.
        test_limit: At most the first this-many test samples (>= 1), or None.
        seed: Seed of the permutation, >= 0.

    Returns:
        A :class:`DatasetSplits`.

    Raises:
        DataError: An argument is out of range (the message names it), or
            ``raw`` is inconsistent (shapes, label count, label range).
    """
    _check_raw(raw)
    n = raw.x_train.shape[0]
    n_val = _val_count(val_size, n)
    train_limit = _limit("train_limit", train_limit)
    test_limit = _limit("test_limit", test_limit)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")

    order = np.random.default_rng(int(seed)).permutation(n)
    val_idx = order[:n_val]
    train_idx = order[n_val:][:train_limit]
    test_idx = slice(0, test_limit)

    # Fancy indexing copies only the selected uint8 rows; the float
    # conversion then runs once per split on exactly what is kept.
    x_train = _as_float_tensor(raw.x_train[train_idx])
    # Population statistics per channel over the training split only, so no
    # information from val or test leaks into the preprocessing.
    var, mean = torch.var_mean(x_train, dim=(0, 2, 3), correction=0)
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel stays finite

    def finish(x: torch.Tensor, y: np.ndarray) -> TensorSplit:
        # (x - mean) / std as one scale and one shift, in place.
        x.mul_((1.0 / std).view(1, -1, 1, 1)).add_((-mean / std).view(1, -1, 1, 1))
        return TensorSplit(x, torch.from_numpy(np.array(y, dtype=np.int64)))  # own copy

    train = finish(x_train, raw.y_train[train_idx])
    val = finish(_as_float_tensor(raw.x_train[val_idx]), raw.y_train[val_idx])
    test = finish(_as_float_tensor(raw.x_test[test_idx]), raw.y_test[test_idx])

    scale = float(raw.pixel_scale)
    return DatasetSplits(
        name=raw.name,
        train=train,
        val=val,
        test=test,
        num_classes=raw.num_classes,
        input_shape=tuple(int(d) for d in raw.x_train.shape[1:]),
        mean=tuple(float(m) / scale for m in mean.tolist()),
        std=tuple(float(s) / scale for s in std.tolist()),
        class_names=tuple(raw.class_names),
        pixel_scale=scale,
        source=raw.source,
    )


def make_synthetic(
    *,
    num_train: int = 2000,
    num_test: int = 500,
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 28, 28),
    noise: float = 0.5,
    seed: int = 0,
) -> RawDataset:
    """Seeded, learnable toy data: one Gaussian blob per class plus pixel noise.

    Class ``k`` is a bright blob centred on a circle around the image centre
    at angle ``2*pi*k/num_classes`` (the same in every channel); each sample
    adds independent Gaussian noise of std ``noise`` (the blob peaks at 1).
    A small CNN or MLP separates the classes quickly, which makes this the
    dataset for fast tests. Classes are balanced.

    Args:
        num_train: Training samples, >= 1.
        num_test: Test samples, >= 1.
        num_classes: Classes, >= 2.
        input_shape: ``(C, H, W)``, each >= 1.
        noise: Standard deviation of the per-pixel noise, >= 0.
        seed: Seed of everything random here, >= 0.

    Returns:
        A :class:`RawDataset` of float32 arrays; pass it to :func:`make_splits`.

    Raises:
        DataError: An argument is out of range (the message names it).

    Example:
        >>> splits = make_splits(make_synthetic(num_train=200, input_shape=(3, 8, 8)))
        >>> splits.train.x.shape
        torch.Size([180, 3, 8, 8])
    """
    for arg, value, low in (("num_train", num_train, 1), ("num_test", num_test, 1),
                            ("num_classes", num_classes, 2), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise DataError(f"make_synthetic: {arg} must be an integer >= {low}, got {value!r}")
    shape = tuple(input_shape)
    if len(shape) != 3 or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in shape
    ):
        raise DataError(
            f"make_synthetic: input_shape must be (C, H, W) of ints >= 1, got {input_shape!r}"
        )
    if not (isinstance(noise, numbers.Real) and 0 <= noise < float("inf")):
        raise DataError(f"make_synthetic: noise must be a finite number >= 0, got {noise!r}")

    c, h, w = (int(d) for d in shape)
    rng = np.random.default_rng(int(seed))
    angles = 2 * np.pi * np.arange(num_classes) / num_classes
    radius = 0.3 * min(h, w)
    cy, cx = (h - 1) / 2 + radius * np.sin(angles), (w - 1) / 2 + radius * np.cos(angles)
    sigma = max(min(h, w) / 8, 0.5)
    yy, xx = np.mgrid[0:h, 0:w]
    # templates[k] is class k's noise-free image, shape (K, C, H, W).
    squared_distance = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2
    blobs = np.exp(-squared_distance / (2 * sigma**2))
    templates = np.repeat(blobs[:, None], c, axis=1).astype(np.float32)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(count) % num_classes)
        pixel_noise = rng.standard_normal((count, c, h, w), dtype=np.float32)
        x = templates[labels] + np.float32(noise) * pixel_noise
        return x, labels.astype(np.int64)

    x_train, y_train = draw(int(num_train))
    x_test, y_test = draw(int(num_test))
    return RawDataset(
        name="synthetic",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=tuple(f"class_{k}" for k in range(num_classes)),
        pixel_scale=1.0,
        source=f"make_synthetic(num_train={num_train}, num_test={num_test}, "
        f"num_classes={num_classes}, input_shape={shape}, noise={noise}, seed={seed})",
    )


# --- raw loaders -------------------------------------------------------------


def _load_idx_dataset(src: IdxSource, root, *, download: bool) -> RawDataset:
    directory = resolve_dataset_dir(src, root, download=download)
    files = find_idx_files(directory)
    if files is None:  # removed between resolving and reading
        raise DataError(f"{directory}: the {src.name} files disappeared while loading")
    arrays = {role: _read_idx_cached(path) for role, path in files.items()}

    for split in ("train", "test"):
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{images_path}: expected uint8 images N x H x W, found {images.dtype} "
                f"with shape {images.shape}. Is this an images file of {src.name}?"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{labels_path}: expected integer labels of shape N, found {labels.dtype} "
                f"with shape {labels.shape}. Is this a labels file of {src.name}?"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                f"{labels.shape[0]} labels; the files belong to different datasets or one is "
                "damaged. Delete both and download them again."
            )
        _check_label_range(labels, src.num_classes, f"{labels_path} (labels of {images_path})")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(
            f"{files['train_images']} has images of {arrays['train_images'].shape[1:]} but "
            f"{files['test_images']} has {arrays['test_images'].shape[1:]}; they must match."
        )

    return RawDataset(
        name=src.name,
        # A channel axis as a view: N x H x W -> N x 1 x H x W, no copy.
        x_train=arrays["train_images"][:, None],
        y_train=arrays["train_labels"],
        x_test=arrays["test_images"][:, None],
        y_test=arrays["test_labels"],
        class_names=src.class_names,
        pixel_scale=255.0,
        source=str(directory),
    )


def _read_idx_cached(path: Path) -> np.ndarray:
    """:func:`read_idx`, remembered per process while the file is unchanged.

    A pipeline loads the same dataset in several stages (teacher, student,
    fine-tuning, evaluation); decompressing Fashion-MNIST once saves a few
    tenths of a second each time. The result is read-only because it is shared.
    """
    stat = path.stat()
    return _read_idx_by_key(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx_by_key(path: str, mtime_ns: int, size: int) -> np.ndarray:
    array = read_idx(path)
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=1)
def _load_digits() -> RawDataset:
    """scikit-learn's digits with a fixed stratified test split; built once per process."""
    try:
        from sklearn.datasets import load_digits  # slow import, only when asked for
    except ImportError as exc:
        raise DataError(
            "dataset 'digits' needs scikit-learn (it ships the data): pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)  # integer intensities 0..16 stored as float64
    labels = bunch.target.astype(np.int64)

    # Stratified: each class gives the same fraction to the test split, so the
    # small test set keeps the class balance of the whole.
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test_parts = []
    for k in range(10):
        members = rng.permutation(np.flatnonzero(labels == k))
        test_parts.append(members[: int(round(DIGITS_TEST_FRACTION * members.size))])
    is_test = np.zeros(labels.size, dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    arrays = [images[~is_test][:, None], labels[~is_test], images[is_test][:, None], labels[is_test]]
    for array in arrays:
        array.flags.writeable = False  # shared by every caller through the cache
    x_train, y_train, x_test, y_test = arrays

    return RawDataset(
        name="digits",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=tuple(str(d) for d in range(10)),
        pixel_scale=16.0,
        source="sklearn.datasets.load_digits",
    )


# --- argument and consistency checks -----------------------------------------


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in list_datasets():
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    return key


def _check_raw(raw: RawDataset) -> None:
    where = raw.source or raw.name
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if x.ndim != 4:
            raise DataError(f"{where}: {split} inputs must be N x C x H x W, got shape {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"{where}: {x.shape[0]} {split} inputs but labels of shape {y.shape}"
            )
        if x.shape[0] == 0:
            raise DataError(f"{where}: the {split} split is empty")
        _check_label_range(y, raw.num_classes, f"{where} ({split} labels)")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise DataError(
            f"{where}: train inputs are {raw.x_train.shape[1:]} but test inputs {raw.x_test.shape[1:]}"
        )
    if not (raw.pixel_scale > 0):
        raise DataError(f"{where}: pixel_scale must be > 0, got {raw.pixel_scale!r}")


def _check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])[:5].tolist()
        raise DataError(
            f"{where}: labels must be in 0..{num_classes - 1}, found {bad}"
            f"{' ...' if bad and len(bad) == 5 else ''}. The file is damaged or belongs to "
            "another dataset: delete it and download it again."
        )


def _val_count(val_size: int | float, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
        raise DataError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, numbers.Integral):
        count = int(val_size)
        if not 0 <= count < n:
            raise DataError(
                f"val_size={count} must be >= 0 and leave at least one of the {n} training samples"
            )
        return count
    if not 0.0 <= val_size < 1.0:
        raise DataError(f"val_size={val_size!r}: a fraction must be in [0, 1)")
    count = int(round(float(val_size) * n))
    return min(count, n - 1)  # always leave one training sample


def _limit(arg: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DataError(f"{arg} must be None or an integer >= 1, got {value!r}")
    return int(value)


def _as_float_tensor(array: np.ndarray) -> torch.Tensor:
    # One vectorized pass into a fresh, writable, C-contiguous float32 array
    # (torch.from_numpy warns on the read-only cached arrays).
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))

