"""Reading and writing IDX files, the format MNIST and Fashion-MNIST ship in.

An IDX file is a 4-byte magic number, one big-endian uint32 per dimension,
then the data, row-major and big-endian::

    byte 0-1   0x00 0x00
    byte 2     dtype code (0x08 uint8, 0x09 int8, 0x0B int16,
                           0x0C int32, 0x0D float32, 0x0E float64)
    byte 3     number of dimensions
    then       ndim x uint32 sizes, then prod(sizes) x itemsize bytes

Files are often gzip-compressed (``*.gz``); :func:`read_idx` recognizes
gzip by its magic bytes, so a renamed or gunzipped file still reads.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from torchslim.errors import DataError

__all__ = ["IDX_DTYPES", "MAX_NDIM", "read_idx", "write_idx"]

#: IDX dtype code -> numpy dtype as stored in the file (big-endian).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Largest number of dimensions accepted. The format allows 255, but every
#: real IDX dataset has 1 (labels) or 3 (images); a larger count almost
#: always means the header is garbage.
MAX_NDIM = 4

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 4 << 20  # read in 4 MiB pieces so a lying header cannot make us allocate its claim

_HINT = (
    "The file is damaged or incomplete: delete it and download it again, "
    "or reinstall the package that provided it "
    "(e.g. `apt-get install --reinstall dataset-fashion-mnist`)."
)


def _corrupt(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}. {_HINT}")


def _shape_str(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array.

    Every check that can fail on a damaged file is made: the magic number,
    the dtype code, the number of dimensions, and that the data is exactly
    as long as the header says (a truncated file and trailing bytes are
    both errors).

    Args:
        path: The file. Gzip is detected from the content (bytes ``1f 8b``),
            not from the name.

    Returns:
        An array with the header's shape, in native byte order, writable.
        Pixels of MNIST-style image files come back as ``uint8``.

    Raises:
        DataError: The file cannot be read or is not a valid IDX file. The
            message names the path, what is wrong, and what to do. No other
            exception escapes, whatever the file contains.

    Example:
        >>> images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
        >>> images.shape, images.dtype
        ((10000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if is_gzip:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _parse(path, stream, data_bytes_on_disk=None)
            size = os.fstat(raw.fileno()).st_size
            return _parse(path, raw, data_bytes_on_disk=size)
    except DataError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # EOFError: gzip stream ends early; zlib.error: bad deflate data;
        # BadGzipFile: bad header, CRC or length check, or garbage after a member.
        raise _corrupt(path, f"corrupt or truncated gzip stream ({exc})") from exc
    except OSError as exc:
        # Missing file, a directory, no permission, I/O error.
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}).") from exc


def _parse(path: Path, stream, data_bytes_on_disk: int | None) -> np.ndarray:
    """Parse an IDX stream; ``data_bytes_on_disk`` is the file size when not compressed."""
    magic = stream.read(4)
    if len(magic) < 4:
        raise _corrupt(path, f"truncated: {len(magic)} bytes, too short for an IDX header")
    zero, code, ndim = magic[:2], magic[2], magic[3]
    if zero != b"\x00\x00":
        raise _corrupt(
            path,
            f"not an IDX file: magic number {magic.hex()} does not start with 0000",
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise _corrupt(path, f"unknown IDX dtype code 0x{code:02X} (known: {known})")
    if not 1 <= ndim <= MAX_NDIM:
        raise _corrupt(path, f"IDX header says {ndim} dimensions, expected 1 to {MAX_NDIM}")

    header_len = 4 + 4 * ndim
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise _corrupt(
            path,
            f"truncated: header needs {header_len} bytes, file has {4 + len(raw_dims)}",
        )
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    claim = f"header says {_shape_str(dims)} = {expected} bytes of data"
    # numpy refuses shapes whose nonzero sizes multiply past the address
    # space, even with a zero among them: such a header is garbage.
    if math.prod(d for d in dims if d) * dtype.itemsize > np.iinfo(np.intp).max:
        raise _corrupt(path, f"impossible shape: header says {_shape_str(dims)}")

    if data_bytes_on_disk is not None:
        # Uncompressed: the size is known up front, so a wrong length is
        # reported without reading (or allocating) anything.
        have = data_bytes_on_disk - header_len
        if have < expected:
            raise _corrupt(path, f"truncated: {claim}, file has {have}")
        if have > expected:
            raise _corrupt(path, f"{have - expected} trailing bytes: {claim}, file has {have}")

    data = bytearray()
    while len(data) < expected:
        chunk = stream.read(min(_CHUNK, expected - len(data)))
        if not chunk:
            raise _corrupt(path, f"truncated: {claim}, file has {len(data)}")
        data += chunk
    # Reading on to the end also makes gzip verify its CRC and length trailer.
    extra = 0
    while chunk := stream.read(_CHUNK):
        extra += len(chunk)
    if extra:
        raise _corrupt(
            path, f"{extra} trailing bytes: {claim}, file has {expected + extra}"
        )

    array = np.frombuffer(data, dtype=dtype).reshape(dims)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))  # native order for torch
    return array


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file, gzip-compressed when the name ends in ``.gz``.

    Used to build test fixtures and small IDX datasets. The gzip header
    carries no timestamp, so the same array always gives the same bytes
    (and the same SHA-256).

    Args:
        path: Destination file; its parent must exist.
        array: 1 to :data:`MAX_NDIM` dimensions, of a dtype IDX can hold
            (uint8, int8, int16, int32, float32, float64).

    Raises:
        DataError: The array's dtype or number of dimensions cannot be
            stored in IDX, or a dimension is too large for uint32.
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise DataError(
            f"write_idx({path}): dtype {array.dtype} cannot be stored in IDX "
            "(use uint8, int8, int16, int32, float32 or float64)"
        )
    if not 1 <= array.ndim <= MAX_NDIM:
        raise DataError(
            f"write_idx({path}): array has {array.ndim} dimensions, IDX here holds 1 to {MAX_NDIM}"
        )
    if any(d >= 2**32 for d in array.shape):
        raise DataError(f"write_idx({path}): dimension too large for IDX in shape {array.shape}")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        with open(path, "wb") as f, gzip.GzipFile(filename="", fileobj=f, mode="wb", mtime=0) as gz:
            gz.write(payload)
    else:
        path.write_bytes(payload)
