"""Tests of torchslim.data: IDX parsing, dataset resolution, splits, normalization.

Everything runs on tiny generated files in tmp dirs, in milliseconds, except
the one test that loads the real Fashion-MNIST when it is installed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchslim.data import (
    IDX_FILES,
    IDX_SOURCES,
    DatasetSplits,
    IdxSource,
    RawDataset,
    TensorSplit,
    find_idx_files,
    list_datasets,
    load_dataset,
    make_splits,
    make_synthetic,
    read_idx,
    resolve_dataset_dir,
    write_idx,
)
from torchslim.errors import DataError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


pytestmark = pytest.mark.usefixtures("hermetic_data_env")


def write_dataset(directory: Path, n_train=30, n_test=12, hw=(4, 4), seed=0,
                  train_labels=None, gz=True) -> Path:
    """Write a tiny, valid four-file IDX dataset into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8) if train_labels is None
        else np.asarray(train_labels, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for role, name in IDX_FILES.items():
        write_idx(directory / (name if gz else name.removesuffix(".gz")), arrays[role])
    return directory


def toy_source(tmp_path: Path, system_dirs=()) -> IdxSource:
    """An IDX source that can only ever find files under tmp_path (no mirrors)."""
    return IdxSource(
        name="toy",
        class_names=tuple(str(i) for i in range(10)),
        sha256={name: "0" * 64 for name in IDX_FILES.values()},
        mirrors=(),
        system_dirs=tuple(str(d) for d in system_dirs),
        apt_package="dataset-toy",
    )


# --- IDX reader ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_every_dtype(tmp_path, dtype, suffix):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    assert back.shape == (2, 3, 5)
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")


def test_idx_header_layout_is_the_mnist_one(tmp_path):
    path = tmp_path / "labels.idx"
    write_idx(path, np.array([3, 1, 4], dtype=np.uint8))
    # 0x00000801 = uint8, one dimension; then the size as big-endian uint32.
    assert path.read_bytes() == bytes.fromhex("00000801 00000003 030104")


def test_gzip_is_detected_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "x.gz", array)
    (tmp_path / "x.gz").rename(tmp_path / "gzipped-without-suffix")
    write_idx(tmp_path / "raw", array)
    (tmp_path / "raw").rename(tmp_path / "raw-with-suffix.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "gzipped-without-suffix"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-with-suffix.gz"), array)


def test_gzip_output_is_reproducible(tmp_path):
    array = np.arange(100, dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def _write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _expect(path: Path, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert "download it again" in message  # every corruption message says what to do
    return message


def test_bad_magic(tmp_path):
    path = _write(tmp_path / "f", bytes.fromhex("01000801 00000001 07"))
    _expect(path, "not an IDX file", "01000801")


def test_bad_dtype_code(tmp_path):
    path = _write(tmp_path / "f", bytes.fromhex("00000a01 00000001 07"))
    _expect(path, "unknown IDX dtype code 0x0A")


@pytest.mark.parametrize("ndim", [0, 5, 255])
def test_bad_number_of_dimensions(tmp_path, ndim):
    path = _write(tmp_path / "f", bytes([0, 0, 8, ndim]) + bytes(4 * ndim))
    _expect(path, f"{ndim} dimensions")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_data(tmp_path, gz):
    header = bytes.fromhex("00000803 00000003 00000004 00000004")
    path = _write(tmp_path / "images-idx3-ubyte.gz", header + bytes(10), gz=gz)
    _expect(path, "truncated: header says 3x4x4 = 48 bytes of data, file has 10")


def test_truncated_header(tmp_path):
    _expect(_write(tmp_path / "f", b"\x00\x00"), "truncated")
    _expect(_write(tmp_path / "g", bytes.fromhex("00000803 00000003")), "truncated", "needs 16")
    _expect(_write(tmp_path / "h", b""), "truncated")


@pytest.mark.parametrize("gz", [False, True])
def test_trailing_bytes(tmp_path, gz):
    header = bytes.fromhex("00000801 00000002")
    path = _write(tmp_path / "f", header + b"\x01\x02\x03", gz=gz)
    _expect(path, "1 trailing bytes", "header says 2 = 2 bytes of data, file has 3")


@pytest.mark.parametrize("dims", [(0, 2**32 - 1, 2**32 - 1, 2**32 - 1), (2**32 - 1,) * 3 + (0,)])
def test_impossible_shape_with_a_zero_dimension(tmp_path, dims):
    header = bytes([0, 0, 8, 4]) + b"".join(d.to_bytes(4, "big") for d in dims)
    _expect(_write(tmp_path / "f", header), "impossible shape")


def test_empty_array_round_trips(tmp_path):
    write_idx(tmp_path / "e.gz", np.zeros((0, 5), dtype=np.int16))
    assert read_idx(tmp_path / "e.gz").shape == (0, 5)


def test_wide_dtype_size_is_counted_in_bytes(tmp_path):
    # int32 data: 2 values = 8 bytes; 7 bytes is one short.
    path = _write(tmp_path / "f", bytes.fromhex("00000c01 00000002") + bytes(7))
    _expect(path, "header says 2 = 8 bytes of data, file has 7")


def test_corrupt_gzip_stream(tmp_path):
    good = tmp_path / "good.gz"
    write_idx(good, np.arange(4000, dtype=np.int32))
    blob = bytearray(good.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # damage the deflate data
    _expect(_write(tmp_path / "flipped.gz", bytes(blob)), "gzip")
    _expect(_write(tmp_path / "cut.gz", good.read_bytes()[:-20]), "gzip")
    _expect(_write(tmp_path / "badheader.gz", b"\x1f\x8b\x00\x00garbage"), "gzip")


def test_missing_file_and_directory_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope.gz")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path)


def test_write_idx_rejects_what_idx_cannot_hold(tmp_path):
    with pytest.raises(DataError, match="dtype"):
        write_idx(tmp_path / "f", np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="dimensions"):
        write_idx(tmp_path / "f", np.zeros((1,) * 5, dtype=np.uint8))


# Random bytes, and random bytes behind a plausible header (so the checks
# past the magic number are reached too), raw or gzipped: reading either
# succeeds or raises DataError, never anything else.
_plausible = st.builds(
    lambda code, ndim, dims, body: bytes([0, 0, code, ndim]) + b"".join(
        d.to_bytes(4, "big") for d in dims[:ndim]) + body,
    st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x0A]),
    st.integers(0, 6),
    st.lists(st.sampled_from([0, 1, 2, 7, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1),
             min_size=6, max_size=6),
    st.binary(max_size=64),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=96) | _plausible, gz=st.booleans(), cut=st.integers(0, 200))
def test_random_bytes_raise_only_data_error(tmp_path, data, gz, cut):
    blob = gzip.compress(data, mtime=0) if gz else data
    if gz and cut < len(blob):
        blob = blob[:cut] + blob[cut + 1:]  # also feed damaged gzip streams
    path = tmp_path / "random.idx"
    path.write_bytes(blob)
    try:
        array = read_idx(path)
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(array, np.ndarray) and 1 <= array.ndim <= 4


# --- dataset files: consistency checks ----------------------------------------


def test_label_count_mismatch_names_both_files(tmp_path):
    write_dataset(tmp_path / "fashion-mnist", n_train=30, train_labels=np.zeros(29))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", root=tmp_path, download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz holds 30 images" in message
    assert "train-labels-idx1-ubyte.gz holds 29 labels" in message


def test_out_of_range_labels_name_the_file(tmp_path):
    labels = np.arange(30) % 10
    labels[7] = 12
    write_dataset(tmp_path / "fashion-mnist", n_train=30, train_labels=labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz.*0\.\.9, found \[12\]"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)


def test_images_file_with_wrong_dtype_is_rejected(tmp_path):
    directory = write_dataset(tmp_path / "fashion-mnist")
    write_idx(directory / IDX_FILES["test_images"], np.zeros((12, 4, 4), dtype=np.float32))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: expected uint8 images"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)


def test_idx_dataset_loads_from_root(tmp_path):
    write_dataset(tmp_path / "mnist", n_train=30, n_test=12, hw=(5, 3))
    splits = load_dataset("mnist", root=tmp_path, val_size=6, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 12)
    assert splits.input_shape == (1, 5, 3)
    assert splits.pixel_scale == 255.0
    assert splits.source == str(tmp_path / "mnist")
    assert splits.class_names == tuple("0123456789")


# --- resolution order ---------------------------------------------------------


def test_explicit_root_wins_over_everything(tmp_path, monkeypatch):
    src = toy_source(tmp_path, system_dirs=[write_dataset(tmp_path / "sys")])
    write_dataset(tmp_path / "cache" / "toy")
    write_dataset(tmp_path / "env" / "toy")
    monkeypatch.setenv("TORCHSLIM_DATA", str(tmp_path / "env"))
    root = write_dataset(tmp_path / "mine")
    assert resolve_dataset_dir(src, root, cache_dir=tmp_path / "cache", download=False) == root


def test_root_may_hold_a_subdirectory_per_dataset(tmp_path):
    write_dataset(tmp_path / "root" / "toy")
    found = resolve_dataset_dir(toy_source(tmp_path), tmp_path / "root",
                                cache_dir=tmp_path / "cache", download=False)
    assert found == tmp_path / "root" / "toy"


def test_env_var_beats_cache_and_system(tmp_path, monkeypatch):
    src = toy_source(tmp_path, system_dirs=[write_dataset(tmp_path / "sys")])
    write_dataset(tmp_path / "cache" / "toy")
    write_dataset(tmp_path / "env" / "toy")
    monkeypatch.setenv("TORCHSLIM_DATA", str(tmp_path / "env"))
    assert resolve_dataset_dir(src, cache_dir=tmp_path / "cache", download=False) == tmp_path / "env" / "toy"


def test_env_var_may_point_at_the_files_directly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_DATA", str(write_dataset(tmp_path / "flat")))
    found = resolve_dataset_dir(toy_source(tmp_path), cache_dir=tmp_path / "cache", download=False)
    assert found == tmp_path / "flat"


def test_cache_beats_system(tmp_path):
    src = toy_source(tmp_path, system_dirs=[write_dataset(tmp_path / "sys")])
    write_dataset(tmp_path / "cache" / "toy")
    assert resolve_dataset_dir(src, cache_dir=tmp_path / "cache", download=False) == tmp_path / "cache" / "toy"


def test_default_cache_follows_xdg_cache_home(tmp_path):
    write_dataset(tmp_path / "xdg-cache" / "torchslim" / "toy")  # XDG_CACHE_HOME set by the fixture
    found = resolve_dataset_dir(toy_source(tmp_path), download=False)
    assert found == tmp_path / "xdg-cache" / "torchslim" / "toy"


def test_system_dir_is_used_last(tmp_path):
    system = write_dataset(tmp_path / "sys")
    src = toy_source(tmp_path, system_dirs=[tmp_path / "absent", system])
    assert resolve_dataset_dir(src, cache_dir=tmp_path / "cache", download=False) == system


def test_unpacked_files_count(tmp_path):
    root = write_dataset(tmp_path / "plain", gz=False)
    files = find_idx_files(root)
    assert files is not None and files["train_images"].name == "train-images-idx3-ubyte"
    assert resolve_dataset_dir(toy_source(tmp_path), root, cache_dir=tmp_path / "c", download=False) == root


def test_incomplete_dir_does_not_count_and_the_error_lists_every_place(tmp_path, monkeypatch):
    partial = write_dataset(tmp_path / "sys")
    (partial / IDX_FILES["test_labels"]).unlink()
    monkeypatch.setenv("TORCHSLIM_DATA", str(tmp_path / "env"))
    src = toy_source(tmp_path, system_dirs=[partial])
    with pytest.raises(DataError) as info:
        resolve_dataset_dir(src, tmp_path / "root", cache_dir=tmp_path / "cache", download=False)
    message = str(info.value)
    for place in (tmp_path / "root" / "toy", tmp_path / "root", tmp_path / "env" / "toy",
                  tmp_path / "env", tmp_path / "cache" / "toy", partial):
        assert f"{place} (" in message
    assert "missing t10k-labels-idx1-ubyte.gz" in message
    assert "download=False" in message
    assert "apt-get install dataset-toy" in message
    assert "TORCHSLIM_DATA" in message and "dataset: digits" in message


def test_default_sources_point_at_the_debian_package():
    assert IDX_SOURCES["fashion-mnist"].system_dirs == ("/usr/share/datasets/fashion-mnist",)
    assert IDX_SOURCES["mnist"].system_dirs == ("/usr/share/datasets/mnist",)
    for src in IDX_SOURCES.values():
        assert set(src.sha256) == set(IDX_FILES.values())
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in src.sha256.values())
        assert src.mirrors and src.num_classes == 10


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*digits, fashion-mnist, mnist, synthetic"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="unknown IDX dataset"):
        resolve_dataset_dir("digits")


# --- splits and normalization -------------------------------------------------


def indexed_raw(n_train=100, n_test=20) -> RawDataset:
    """Sample i of the training set is the constant image i, so splits can be traced back."""
    x_train = np.broadcast_to(np.arange(n_train, dtype=np.float32)[:, None, None, None],
                              (n_train, 1, 2, 2)).copy()
    x_test = np.broadcast_to(np.arange(n_test, dtype=np.float32)[:, None, None, None],
                             (n_test, 1, 2, 2)).copy()
    return RawDataset(
        name="indexed", x_train=x_train, y_train=np.arange(n_train) % 3,
        x_test=x_test, y_test=np.arange(n_test) % 3, class_names=("a", "b", "c"),
    )


def sample_ids(split: TensorSplit, splits: DatasetSplits) -> np.ndarray:
    """Undo the normalization of an indexed_raw split to get each sample's index."""
    raw = split.x[:, 0, 0, 0].double() * splits.std[0] + splits.mean[0]
    return np.rint(raw.numpy()).astype(int)


def test_val_is_carved_from_train_disjoint_and_complete():
    splits = make_splits(indexed_raw(), val_size=25, seed=3)
    train, val = set(sample_ids(splits.train, splits)), set(sample_ids(splits.val, splits))
    assert len(val) == 25 and len(train) == 75
    assert not train & val
    assert train | val == set(range(100))
    np.testing.assert_array_equal(sample_ids(splits.test, splits), np.arange(20))  # test untouched
    # labels travel with their images
    np.testing.assert_array_equal(splits.train.y.numpy(), sample_ids(splits.train, splits) % 3)


def test_split_is_deterministic_for_a_seed():
    a = make_splits(indexed_raw(), val_size=0.2, seed=7)
    b = make_splits(indexed_raw(), val_size=0.2, seed=7)
    c = make_splits(indexed_raw(), val_size=0.2, seed=8)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert set(sample_ids(a.val, a)) != set(sample_ids(c.val, c))


def test_val_fraction_and_limits():
    splits = make_splits(indexed_raw(), val_size=0.25, train_limit=10, test_limit=5, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 25, 5)
    np.testing.assert_array_equal(sample_ids(splits.test, splits), np.arange(5))
    full = make_splits(indexed_raw(), val_size=0.25, seed=0)
    # train_limit keeps the first samples of the same shuffled remainder
    np.testing.assert_array_equal(sample_ids(splits.train, splits), sample_ids(full.train, full)[:10])
    assert set(sample_ids(splits.val, splits)) == set(sample_ids(full.val, full))
    roomy = make_splits(indexed_raw(), val_size=0, train_limit=10_000, test_limit=10_000)
    assert (len(roomy.train), len(roomy.val), len(roomy.test)) == (100, 0, 20)


@pytest.mark.parametrize("kwargs, argument", [
    ({"val_size": -1}, "val_size"),
    ({"val_size": 100}, "val_size"),
    ({"val_size": 1.0}, "val_size"),
    ({"val_size": -0.1}, "val_size"),
    ({"val_size": "10%"}, "val_size"),
    ({"val_size": True}, "val_size"),
    ({"train_limit": 0}, "train_limit"),
    ({"train_limit": 2.5}, "train_limit"),
    ({"test_limit": -3}, "test_limit"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(DataError, match=argument):
        make_splits(indexed_raw(), **kwargs)


def test_normalization_uses_training_split_statistics():
    raw = make_synthetic(num_train=300, num_test=50, input_shape=(3, 5, 5), seed=1)
    # Make the channels differ so a per-channel bug would show.
    raw.x_train[:, 1] = raw.x_train[:, 1] * 4 + 2
    raw.x_test[:, 1] = raw.x_test[:, 1] * 4 + 2
    splits = make_splits(raw, val_size=60, train_limit=200, seed=2)
    x = splits.train.x.double()
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3), unbiased=False).numpy(), 1, atol=1e-5)

    # The recorded stats are those of exactly the 200 training samples ...
    order = np.random.default_rng(2).permutation(300)
    kept = raw.x_train[order[60:260]].astype(np.float64)
    np.testing.assert_allclose(splits.mean, kept.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(splits.std, kept.std(axis=(0, 2, 3)), rtol=1e-5)
    assert len(splits.mean) == len(splits.std) == 3
    # ... and the test split is normalized with them, not with its own.
    mean = np.array(splits.mean)[None, :, None, None]
    std = np.array(splits.std)[None, :, None, None]
    np.testing.assert_allclose(splits.test.x.numpy(), (raw.x_test - mean) / std, rtol=1e-4, atol=1e-4)


def test_pixel_scale_gives_stats_in_unit_range(tmp_path):
    write_dataset(tmp_path / "fashion-mnist", n_train=40)
    splits = load_dataset("fmnist", root=tmp_path, val_size=0, download=False)
    pixels = np.concatenate([read_idx(tmp_path / "fashion-mnist" / IDX_FILES["train_images"])])
    np.testing.assert_allclose(splits.mean[0], pixels.mean() / 255, rtol=1e-5)
    np.testing.assert_allclose(splits.std[0], pixels.std() / 255, rtol=1e-5)
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64


def test_constant_channel_does_not_divide_by_zero():
    raw = indexed_raw()
    raw = RawDataset(name="flat", x_train=np.zeros_like(raw.x_train), y_train=raw.y_train,
                     x_test=np.ones_like(raw.x_test), y_test=raw.y_test, class_names=raw.class_names)
    splits = make_splits(raw, val_size=0)
    assert splits.std == (1.0,)
    assert torch.isfinite(splits.test.x).all() and torch.all(splits.test.x == 1)


def test_inconsistent_raw_dataset_is_rejected():
    raw = indexed_raw()
    bad_labels = RawDataset(name="bad", x_train=raw.x_train, y_train=raw.y_train + 5,
                            x_test=raw.x_test, y_test=raw.y_test, class_names=raw.class_names)
    with pytest.raises(DataError, match=r"labels must be in 0\.\.2"):
        make_splits(bad_labels)
    short_labels = RawDataset(name="bad", x_train=raw.x_train, y_train=raw.y_train[:-1],
                              x_test=raw.x_test, y_test=raw.y_test, class_names=raw.class_names)
    with pytest.raises(DataError, match="100 train inputs"):
        make_splits(short_labels)


def test_tensor_split_behaves_like_a_tensor_dataset():
    splits = make_splits(make_synthetic(num_train=64, num_test=8, input_shape=(1, 6, 6)))
    x, y = splits.train[3]
    assert torch.equal(x, splits.train.x[3]) and y == splits.train.y[3]
    assert splits.train.tensors[0] is splits.train.x
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=16)))
    assert batch_x.shape == (16, 1, 6, 6) and batch_y.shape == (16,)


# --- built-in datasets ---------------------------------------------------------


def test_list_datasets():
    assert list_datasets() == ["digits", "fashion-mnist", "mnist", "synthetic"]


def test_digits_loads_with_a_fixed_stratified_test_split():
    a = load_dataset("digits", val_size=0.1, seed=0)
    b = load_dataset("digits", val_size=0.1, seed=1)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10 and a.pixel_scale == 16.0
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.test) == 359
    counts = np.bincount(a.test.y.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # about a fifth of each class's ~180
    # The test split does not depend on the seed; the val split does.
    assert torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.val.y, b.val.y)


def test_synthetic_is_seeded_and_learnable():
    raw = make_synthetic(num_train=500, num_test=200, seed=4)
    again = make_synthetic(num_train=500, num_test=200, seed=4)
    assert np.array_equal(raw.x_train, again.x_train) and np.array_equal(raw.y_test, again.y_test)
    assert not np.array_equal(raw.x_train, make_synthetic(num_train=500, num_test=200, seed=5).x_train)
    assert np.bincount(raw.y_train).tolist() == [50] * 10
    # Learnable: the nearest class mean (a linear rule) already scores well.
    splits = make_splits(raw, val_size=0)
    x_train, y_train = splits.train.x.flatten(1), splits.train.y
    means = torch.stack([x_train[y_train == k].mean(0) for k in range(10)])
    predicted = torch.cdist(splits.test.x.flatten(1), means).argmin(1)
    assert (predicted == splits.test.y).float().mean() > 0.9


def test_synthetic_via_load_dataset_and_bad_arguments():
    splits = load_dataset("synthetic", val_size=200)
    assert splits.input_shape == (1, 28, 28) and len(splits.val) == 200
    assert splits.name == "synthetic" and "seed=0" in splits.source
    for kwargs, argument in [({"num_classes": 1}, "num_classes"), ({"input_shape": (28, 28)}, "input_shape"),
                             ({"noise": -1.0}, "noise"), ({"num_train": 0}, "num_train")]:
        with pytest.raises(DataError, match=argument):
            make_synthetic(**kwargs)


@pytest.mark.skipif(not (FMNIST_DIR / IDX_FILES["train_images"]).is_file(),
                    reason=f"Fashion-MNIST is not installed in {FMNIST_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_loads():
    splits = load_dataset("fashion-mnist", val_size=5000, seed=0, download=False)
    assert splits.source == str(FMNIST_DIR)
    assert splits.train.x.shape == (55_000, 1, 28, 28)
    assert splits.val.x.shape == (5_000, 1, 28, 28)
    assert splits.test.x.shape == (10_000, 1, 28, 28)
    assert len(splits.train) + len(splits.val) == 60_000
    assert splits.num_classes == 10 and splits.class_names[9] == "Ankle boot"
    # Fashion-MNIST's well-known pixel statistics (mean 0.286, std 0.353).
    assert abs(splits.mean[0] - 0.286) < 0.002 and abs(splits.std[0] - 0.353) < 0.002
    # The official test set is balanced: 1000 per class.
    assert np.bincount(splits.test.y.numpy()).tolist() == [1000] * 10


@pytest.mark.parametrize("module", ["torchslim.data.datasets", "torchslim.data.idx"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    if module.endswith("idx") and not (FMNIST_DIR / IDX_FILES["test_images"]).is_file():
        pytest.skip(f"the read_idx example reads {FMNIST_DIR}, which is not installed")
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
