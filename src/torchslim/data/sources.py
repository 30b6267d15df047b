"""Where the IDX datasets come from: known files, mirrors, checksums, and the search order.

:func:`resolve_dataset_dir` finds a directory holding all four IDX files of
a dataset, looking in this order (first complete directory wins):

1. the explicit ``root`` argument (``root/<name>/`` or ``root/`` itself);
2. ``$TORCHSLIM_DATA/<name>/`` or ``$TORCHSLIM_DATA/`` itself;
3. the user cache, ``$XDG_CACHE_HOME/torchslim/<name>`` (default
   ``~/.cache/torchslim/<name>``);
4. the system directory of the Debian package
   (``/usr/share/datasets/fashion-mnist``);
5. a download from the dataset's mirrors into the cache, each file checked
   against its SHA-256.

When all fail, the :class:`~torchslim.errors.DataError` lists every place
tried and why it did not count.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from torchslim.data.download import download_file
from torchslim.errors import DataError

__all__ = [
    "ENV_VAR",
    "IDX_FILES",
    "IDX_SOURCES",
    "IdxSource",
    "default_cache_dir",
    "find_idx_files",
    "resolve_dataset_dir",
]

#: Environment variable naming a directory of datasets.
ENV_VAR = "TORCHSLIM_DATA"

#: The four files of an MNIST-style dataset, by role. Fashion-MNIST uses the
#: same names as MNIST.
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclasses.dataclass(frozen=True)
class IdxSource:
    """Everything needed to find or fetch one IDX dataset.

    Attributes:
        name: Dataset name, also the subdirectory looked for under each base.
        class_names: One name per label value, in label order.
        sha256: File name (from :data:`IDX_FILES`) -> expected SHA-256 of the
            ``.gz`` file. Every downloaded file is checked against it.
        mirrors: Base URLs tried in order; a file's URL is base + file name.
        system_dirs: Directories a system package installs the files into.
        apt_package: Debian package shipping the files, suggested in errors.
    """

    name: str
    class_names: tuple[str, ...]
    sha256: Mapping[str, str]
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()
    apt_package: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# SHA-256 of the official Fashion-MNIST files; the Debian package
# dataset-fashion-mnist ships byte-identical copies.
_FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}

# SHA-256 of the MNIST files (the ones whose MD5s torchvision checks:
# f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...). These values appear,
# identical, in several independent projects that verify MNIST downloads.
_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

#: The IDX datasets torchslim knows, by name. Tests and users may build
#: their own :class:`IdxSource` (e.g. pointing at a local mirror) and pass it
#: to :func:`resolve_dataset_dir`.
IDX_SOURCES: dict[str, IdxSource] = {
    "fashion-mnist": IdxSource(
        name="fashion-mnist",
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        sha256=_FASHION_MNIST_SHA256,
        # Plain http: this is the address Zalando publishes; the SHA-256
        # check, not the transport, is what makes the download trustworthy.
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        apt_package="dataset-fashion-mnist",
    ),
    "mnist": IdxSource(
        name="mnist",
        class_names=tuple(str(d) for d in range(10)),
        sha256=_MNIST_SHA256,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        system_dirs=("/usr/share/datasets/mnist",),
    ),
}


def default_cache_dir() -> Path:
    """The per-user download cache: ``$XDG_CACHE_HOME/torchslim`` or ``~/.cache/torchslim``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "torchslim"


def find_idx_files(directory: str | os.PathLike) -> dict[str, Path] | None:
    """Return the four IDX files in ``directory`` by role, or None unless all four are there.

    Each file may be gzipped (``train-images-idx3-ubyte.gz``) or already
    unpacked (``train-images-idx3-ubyte``); the gzipped name is preferred.
    """
    found = {}
    for role, gz_name in IDX_FILES.items():
        path = _existing_file(Path(directory), gz_name)
        if path is None:
            return None
        found[role] = path
    return found


def _existing_file(directory: Path, gz_name: str) -> Path | None:
    for candidate in (directory / gz_name, directory / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _why_not(directory: Path) -> str:
    """Why ``directory`` does not hold a complete dataset, for the error message."""
    if not directory.exists():
        return "does not exist"
    if not directory.is_dir():
        return "is not a directory"
    missing = [n for n in IDX_FILES.values() if _existing_file(directory, n) is None]
    return "missing " + ", ".join(missing)


def resolve_dataset_dir(
    source: str | IdxSource,
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    system_dirs: Sequence[str | os.PathLike] | None = None,
    mirrors: Sequence[str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Find (or download) the directory holding an IDX dataset's four files.

    Search order, first complete directory wins: ``root`` → ``$TORCHSLIM_DATA``
    → cache → system package directory → download into the cache. Under
    ``root`` and ``$TORCHSLIM_DATA`` both ``<base>/<name>/`` and ``<base>/``
    itself are tried. A directory counts only when all four files are there.

    Args:
        source: A name from :data:`IDX_SOURCES` (``"fashion-mnist"``,
            ``"mnist"``) or an :class:`IdxSource`.
        root: An explicit directory to look in first.
        download: Whether to download when nothing is found locally.
        cache_dir: Base of the download cache (the dataset goes in
            ``cache_dir/<name>``); defaults to :func:`default_cache_dir`.
        system_dirs: Replaces ``source.system_dirs``.
        mirrors: Replaces ``source.mirrors`` (e.g. a local server in tests).
        timeout: Seconds per network operation of a download.

    Returns:
        The directory; :func:`find_idx_files` on it returns all four files.

    Raises:
        DataError: The name is unknown, or the dataset is nowhere and could
            not be downloaded. The message lists every place tried and what
            to do about it.
    """
    src = IDX_SOURCES[_known(source)] if isinstance(source, str) else source
    cache_base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache_base / src.name
    tried: list[str] = []

    candidates: list[tuple[Path, str]] = []
    if root is not None:
        candidates += [(Path(root) / src.name, "root argument"), (Path(root), "root argument")]
    env = os.environ.get(ENV_VAR)
    if env:
        candidates += [(Path(env) / src.name, f"${ENV_VAR}"), (Path(env), f"${ENV_VAR}")]
    else:
        tried.append(f"${ENV_VAR}: not set")
    candidates.append((cache, "cache"))
    systems = system_dirs if system_dirs is not None else src.system_dirs
    candidates += [(Path(d), "system package") for d in systems]

    for directory, label in candidates:
        if find_idx_files(directory) is not None:
            return directory
        tried.append(f"{directory} ({label}): {_why_not(directory)}")

    use_mirrors = tuple(mirrors) if mirrors is not None else src.mirrors
    if not download:
        tried.append("download: not attempted (download=False)")
    elif not use_mirrors:
        tried.append("download: no mirror known")
    else:
        failure = _download_missing(src, cache, use_mirrors, timeout)
        if failure is None:
            return cache
        tried.append(f"download into {cache}: {failure}")

    raise DataError(_not_found_message(src, tried, download))


def _download_missing(
    src: IdxSource, cache: Path, mirrors: Sequence[str], timeout: float
) -> str | None:
    """Download the files ``cache`` lacks; return None on success, else why it failed."""
    for name in IDX_FILES.values():
        if _existing_file(cache, name) is not None:
            continue  # kept from an earlier run; downloads land only after verification
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            try:
                download_file(url, cache / name, src.sha256[name], timeout=timeout)
                break
            except DataError as exc:
                errors.append(str(exc))
        else:
            return "; ".join(errors)
    return None


def _not_found_message(src: IdxSource, tried: list[str], download: bool) -> str:
    fixes = []
    if src.apt_package:
        fixes.append(f"install it system-wide: `apt-get install {src.apt_package}`")
    fixes.append(
        f"copy the four files ({', '.join(IDX_FILES.values())}) into "
        f"<dir>/{src.name}/ and set {ENV_VAR}=<dir> (or pass root=<dir>)"
    )
    if download:
        fixes.append("check the network or proxy settings, then try again to download")
    else:
        fixes.append("allow the download (download=True)")
    fixes.append("train on a dataset that needs no files: `dataset: digits` (bundled with scikit-learn)")
    return (
        f"dataset {src.name!r} not found. Tried, in order:\n"
        + "".join(f"  - {t}\n" for t in tried)
        + "To fix, do one of:\n"
        + "".join(f"  - {f}\n" for f in fixes)
    ).rstrip("\n")


def _known(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key not in IDX_SOURCES:
        raise DataError(f"unknown IDX dataset {name!r}; known: {', '.join(sorted(IDX_SOURCES))}")
    return key
