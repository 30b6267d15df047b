"""Tests of the verified downloader and of resolution falling through to a download.

A real HTTP server on 127.0.0.1 (port chosen by the OS) serves small
generated IDX files; nothing here touches the internet.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from torchslim.data import (
    IDX_FILES,
    IDX_SOURCES,
    IdxSource,
    download_file,
    find_idx_files,
    read_idx,
    resolve_dataset_dir,
    sha256_file,
    write_idx,
)
from torchslim.errors import DataError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


pytestmark = pytest.mark.usefixtures("hermetic_data_env")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; ``/drop/<file>`` promises more bytes than it sends, then hangs up."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path.startswith("/drop/"):
            body = (Path(self.directory) / self.path.removeprefix("/drop/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def served(tmp_path_factory):
    """(base URL, served directory, list of request paths) of a live local HTTP server."""
    root = tmp_path_factory.mktemp("served")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(root))
    )
    server.requests = []
    # A short poll interval makes shutdown() return in milliseconds.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_dataset(directory: Path, n_train=30, n_test=12) -> dict[str, str]:
    """Write a tiny four-file IDX dataset; return file name -> SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    hashes = {}
    for role, name in IDX_FILES.items():
        write_idx(directory / name, arrays[role])
        hashes[name] = sha256_file(directory / name)
    return hashes


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- download_file --------------------------------------------------------------


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"torchslim" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"torchslim" * 1000).hexdigest()


def test_download_success(served, tmp_path):
    url, root, _ = served
    hashes = write_dataset(root)
    name = IDX_FILES["train_images"]
    seen = []
    dest = download_file(f"{url}/{name}", tmp_path / "out" / name, hashes[name].upper(),
                         timeout=5, progress=lambda done, total: seen.append((done, total)))
    assert dest == tmp_path / "out" / name
    assert dest.read_bytes() == (root / name).read_bytes()
    assert leftovers(tmp_path / "out") == [name]  # no temporary file left beside it
    size = (root / name).stat().st_size
    assert seen[-1] == (size, size)
    assert read_idx(dest).shape == (30, 4, 4)


def test_hash_mismatch_leaves_nothing(served, tmp_path):
    url, root, _ = served
    hashes = write_dataset(root)
    name = IDX_FILES["test_labels"]
    wrong = "ab" * 32
    with pytest.raises(DataError) as info:
        download_file(f"{url}/{name}", tmp_path / "out" / name, wrong, timeout=5)
    message = str(info.value)
    assert f"{url}/{name}" in message and wrong in message and hashes[name] in message
    assert leftovers(tmp_path / "out") == []


def test_failed_download_keeps_an_existing_file(served, tmp_path):
    url, root, _ = served
    write_dataset(root)
    name = IDX_FILES["test_labels"]
    dest = tmp_path / name
    dest.write_bytes(b"previous content")
    with pytest.raises(DataError):
        download_file(f"{url}/{name}", dest, "00" * 32, timeout=5)
    assert dest.read_bytes() == b"previous content"
    assert leftovers(tmp_path) == [name]


def test_http_404(served, tmp_path):
    url, _, _ = served
    with pytest.raises(DataError, match=rf"{url}/missing.gz failed: HTTP 404"):
        download_file(f"{url}/missing.gz", tmp_path / "missing.gz", "00" * 32, timeout=5)
    assert leftovers(tmp_path) == []


def test_connection_dropped_mid_body_leaves_nothing(served, tmp_path):
    url, root, _ = served
    hashes = write_dataset(root)
    name = IDX_FILES["train_images"]
    with pytest.raises(DataError, match=rf"{url}/drop/{name}"):
        download_file(f"{url}/drop/{name}", tmp_path / name, hashes[name], timeout=5)
    assert leftovers(tmp_path) == []


def test_connection_refused_names_the_url(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.gz"
    with pytest.raises(DataError, match=rf"download of {url} failed"):
        download_file(url, tmp_path / "x.gz", "00" * 32, timeout=5)
    assert leftovers(tmp_path) == []


def test_malformed_arguments(tmp_path):
    with pytest.raises(DataError, match="64 hex digits"):
        download_file("http://127.0.0.1/x", tmp_path / "x", "not-a-hash")
    with pytest.raises(DataError, match="notaurl"):
        download_file("notaurl", tmp_path / "x", "00" * 32)
    assert leftovers(tmp_path) == []


# --- resolution falling through to a download -----------------------------------------


def local_source(hashes: dict[str, str], mirrors: tuple[str, ...], tmp_path: Path) -> IdxSource:
    return IdxSource(name="toy", class_names=tuple("0123456789"), sha256=hashes,
                     mirrors=mirrors, system_dirs=(str(tmp_path / "no-system-dir"),))


def test_resolution_falls_through_to_a_verified_download(served, tmp_path):
    url, root, requests = served
    hashes = write_dataset(root / "toy-files")
    src = local_source(hashes, (f"{url}/toy-files/",), tmp_path)
    found = resolve_dataset_dir(src, tmp_path / "no-root", cache_dir=tmp_path / "cache", timeout=5)
    assert found == tmp_path / "cache" / "toy"
    files = find_idx_files(found)
    assert files is not None
    for path in files.values():
        assert sha256_file(path) == hashes[path.name]
    assert len(requests) == 4
    # A second resolution finds the cache and downloads nothing.
    assert resolve_dataset_dir(src, cache_dir=tmp_path / "cache", timeout=5) == found
    assert len(requests) == 4


def test_download_fetches_only_missing_files_and_tries_the_next_mirror(served, tmp_path):
    url, root, requests = served
    hashes = write_dataset(root / "good")
    cache = tmp_path / "cache" / "toy"
    cache.mkdir(parents=True)
    kept = IDX_FILES["train_images"]
    (cache / kept).write_bytes((root / "good" / kept).read_bytes())
    src = local_source(hashes, (f"{url}/broken/", f"{url}/good/"), tmp_path)
    assert resolve_dataset_dir(src, cache_dir=tmp_path / "cache", timeout=5) == cache
    assert not any(kept in r for r in requests)
    assert sorted(r.split("/")[1] for r in requests) == ["broken"] * 3 + ["good"] * 3


def test_failed_download_error_lists_every_place_and_the_url(served, tmp_path):
    url, root, _ = served
    hashes = write_dataset(root / "toy-files")
    src = local_source(hashes, (f"{url}/nowhere/",), tmp_path)
    with pytest.raises(DataError) as info:
        resolve_dataset_dir(src, tmp_path / "r", cache_dir=tmp_path / "cache", timeout=5)
    message = str(info.value)
    for place in (tmp_path / "r" / "toy", tmp_path / "r", "$TORCHSLIM_DATA: not set",
                  tmp_path / "cache" / "toy", tmp_path / "no-system-dir"):
        assert str(place) in message
    assert f"{url}/nowhere/train-images-idx3-ubyte.gz failed: HTTP 404" in message
    assert "dataset: digits" in message
    assert leftovers(tmp_path / "cache" / "toy") == []


def test_tampered_mirror_is_refused(served, tmp_path):
    url, root, _ = served
    hashes = write_dataset(root / "toy-files")
    name = IDX_FILES["test_labels"]
    write_idx(root / "toy-files" / name, np.zeros(12, dtype=np.uint8))  # not the published file
    src = local_source(hashes, (f"{url}/toy-files/",), tmp_path)
    with pytest.raises(DataError, match=rf"{name} failed the SHA-256 check: expected {hashes[name]}"):
        resolve_dataset_dir(src, cache_dir=tmp_path / "cache", timeout=5)
    assert not (tmp_path / "cache" / "toy" / name).exists()


@pytest.mark.skipif(not (FMNIST_DIR / IDX_FILES["test_labels"]).is_file(),
                    reason=f"Fashion-MNIST is not installed in {FMNIST_DIR}")
def test_checksum_table_matches_the_installed_fashion_mnist():
    # About 30 MB to hash: a fraction of a second.
    table = IDX_SOURCES["fashion-mnist"].sha256
    for name, expected in table.items():
        assert sha256_file(FMNIST_DIR / name) == expected, name
