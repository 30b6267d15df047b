"""Verified, atomic file download with nothing but the standard library.

A download streams into a temporary file beside the destination, is hashed
while it streams, and is renamed into place only when its SHA-256 matches.
So the destination either does not exist or holds the verified file: an
interrupted or tampered download never leaves a partial file where a reader
would find it, and several processes (e.g. DDP ranks) may download the same
file at once without harm.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from torchslim.errors import DataError

__all__ = ["download_file", "sha256_file"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_USER_AGENT = "torchslim-data/1 (+urllib)"


def sha256_file(path: str | os.PathLike) -> str:
    """Return the SHA-256 of a file as 64 lowercase hex digits.

    Args:
        path: The file to hash; read in 1 MiB chunks.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest``, verify its SHA-256, and move it into place.

    The body is streamed to a temporary file in ``dest``'s directory and
    renamed over ``dest`` with :func:`os.replace` only after the hash
    matches; on any failure the temporary file is deleted and an existing
    ``dest`` is left untouched.

    Args:
        url: What to fetch (``http://``, ``https://`` or ``file://``).
        dest: Where the verified file goes; parent directories are created.
        sha256: Expected SHA-256, hex (case does not matter).
        timeout: Seconds to wait for the connection and for each read.
        progress: Called as ``progress(bytes_so_far, total_or_None)`` after
            every chunk, e.g. to drive a progress bar.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: The server could not be reached or answered with an
            error (the message names the URL), the body's hash is not the
            expected one (the message names URL, expected and actual hash),
            or ``dest`` cannot be written.

    Example:
        >>> download_file(
        ...     "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz",
        ...     "t10k-labels-idx1-ubyte.gz",
        ...     "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        ... )  # doctest: +SKIP
    """
    dest = Path(dest)
    expected = sha256.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise DataError(f"download_file: sha256 for {url} must be 64 hex digits, got {sha256!r}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as dest, so os.replace is a rename on one filesystem
        # (atomic) and never a copy.
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        raise DataError(f"cannot write {dest} for the download of {url}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s -> %s", url, dest)
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            response = _open(url, timeout)
            with response:
                total = _content_length(response)
                done = 0
                while chunk := _read(response, url):
                    out.write(chunk)  # an OSError here is a local disk problem, see below
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            out.flush()
            os.fsync(out.fileno())  # the bytes are on disk before the name points at them
        actual = digest.hexdigest()
        if actual != expected:
            raise DataError(
                f"download of {url} failed the SHA-256 check: expected {expected}, "
                f"got {actual} ({done} bytes). The file was deleted; the mirror may be "
                "serving a different or damaged file."
            )
        os.replace(tmp, dest)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        # Writing the temporary file or the rename failed (disk full, permissions).
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {dest} for the download of {url}: {exc}") from exc
    except BaseException:
        # KeyboardInterrupt and the like: still leave nothing behind.
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _open(url: str, timeout: float):
    """Open ``url``, turning every way it can fail into a DataError naming it."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"download of {url} failed: {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # OSError: timeouts, resets; HTTPException: a malformed answer;
        # ValueError: a malformed URL.
        raise DataError(f"download of {url} failed: {type(exc).__name__}: {exc}") from exc


def _read(response, url: str) -> bytes:
    try:
        return response.read(_CHUNK)
    except (OSError, http.client.HTTPException) as exc:
        # IncompleteRead (an HTTPException) is a connection dropped mid-body.
        raise DataError(
            f"download of {url} failed while reading: {type(exc).__name__}: {exc}"
        ) from exc


def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
