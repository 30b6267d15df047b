"""Canonical Huffman coding on the standard library (and numpy), for the packed artifact.

A stream of symbols from an alphabet ``0 .. n-1`` is coded in three steps:

1. :func:`code_lengths`: optimal prefix-code lengths from the symbol counts,
   limited to ``max_length`` bits (Huffman's tree; when it is deeper than the
   limit, the package-merge algorithm gives the optimal length-limited code);
2. :func:`canonical_codes`: the canonical code of those lengths (shorter codes
   first, ties by symbol), so the lengths alone describe the code;
3. :func:`encode` / :func:`decode`: the bit stream, most significant bit first,
   padded with zeros to a whole byte.

:func:`encode_stream` / :func:`decode_stream` add the table (4 bits per symbol
of the alphabet) in front, which is what the packed file stores. A stream of one
distinct symbol costs one bit per symbol (as in DEFLATE); an empty stream costs
only its table.

Example:
    >>> from torchslim.quant.huffman import encode_stream, decode_stream
    >>> data = encode_stream([0, 0, 0, 1, 2, 0], alphabet_size=3)
    >>> decode_stream(data, alphabet_size=3, count=6)
    [0, 0, 0, 1, 2, 0]
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

#: Longest code :func:`encode_stream` allows: lengths fit 4 bits in the table.
MAX_LENGTH = 15


def _huffman_lengths(freqs: Sequence[int]) -> list[int]:
    """Unlimited Huffman code lengths (ties broken by symbol, so the result is deterministic)."""
    lengths = [0] * len(freqs)
    heap = [(f, s, (s,)) for s, f in enumerate(freqs) if f > 0]
    if len(heap) == 1:
        lengths[heap[0][1]] = 1
        return lengths
    heapq.heapify(heap)
    while len(heap) > 1:
        f1, k1, a = heapq.heappop(heap)
        f2, k2, b = heapq.heappop(heap)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, min(k1, k2), a + b))
    return lengths


def _package_merge(freqs: Sequence[int], max_length: int) -> list[int]:
    """Optimal code lengths of at most ``max_length`` bits (Larmore & Hirschberg's package-merge)."""
    used = sorted((f, s) for s, f in enumerate(freqs) if f > 0)
    leaves = [(f, (s,)) for f, s in used]
    current = list(leaves)
    for _ in range(max_length - 1):
        packages = [(current[i][0] + current[i + 1][0], current[i][1] + current[i + 1][1])
                    for i in range(0, len(current) - 1, 2)]
        current = sorted(leaves + packages, key=lambda item: item[0])
    lengths = [0] * len(freqs)
    for _, symbols in current[: 2 * len(used) - 2]:
        for s in symbols:
            lengths[s] += 1
    return lengths


def code_lengths(freqs: Sequence[int], max_length: int | None = MAX_LENGTH) -> list[int]:
    """Prefix-code lengths minimising ``sum(freqs[s] * lengths[s])``.

    Args:
        freqs: count of each symbol of the alphabet (0 for an unused symbol).
        max_length: longest code allowed (None: no limit). Must leave room for
            every used symbol: ``2 ** max_length >= number of used symbols``.

    Returns:
        ``lengths[s]`` per symbol: 0 for unused symbols, 1 for the only symbol of
        a one-symbol stream.

    Raises:
        ValueError: a negative count, or ``max_length`` too short for the alphabet.

    Example:
        >>> code_lengths([5, 1, 1, 2])
        [1, 3, 3, 2]
    """
    if any(f < 0 for f in freqs):
        raise ValueError("symbol counts must be >= 0")
    used = sum(1 for f in freqs if f > 0)
    if used == 0:
        return [0] * len(freqs)
    if max_length is not None and (max_length < 1 or (1 << max_length) < used):
        raise ValueError(f"{used} symbols cannot be coded in at most {max_length} bits")
    lengths = _huffman_lengths(freqs)
    if max_length is not None and max(lengths) > max_length:
        lengths = _package_merge(freqs, max_length)
    return lengths


def canonical_codes(lengths: Sequence[int]) -> list[int]:
    """The canonical code of each symbol (0 where its length is 0), as an integer of ``lengths[s]`` bits.

    Raises:
        ValueError: the lengths break Kraft's inequality (no prefix code has them).
    """
    if sum(2.0 ** -length for length in lengths if length > 0) > 1.0 + 1e-12:
        raise ValueError("code lengths violate Kraft's inequality: not a prefix code")
    codes = [0] * len(lengths)
    code, previous = 0, 0
    for length, symbol in sorted((length, s) for s, length in enumerate(lengths) if length > 0):
        code <<= length - previous
        codes[symbol] = code
        code += 1
        previous = length
    return codes


def encode(symbols: Iterable[int], lengths: Sequence[int]) -> bytes:
    """Huffman-code ``symbols`` with the canonical code of ``lengths``; zero-padded to whole bytes.

    Raises:
        ValueError: a symbol outside the alphabet or without a code (length 0).
    """
    sym = np.fromiter(symbols, dtype=np.int64)
    if sym.size == 0:
        return b""
    lens = np.asarray(lengths, dtype=np.int64)
    if sym.min() < 0 or sym.max() >= len(lens) or (lens[sym] == 0).any():
        raise ValueError("a symbol is outside the alphabet or has no code")
    codes = np.asarray(canonical_codes(lengths), dtype=np.int64)
    width = int(lens.max())
    l = lens[sym]
    aligned = codes[sym] << (width - l)  # left-aligned in `width` bits
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = (aligned[:, None] >> shifts[None, :]) & 1
    valid = np.arange(width)[None, :] < l[:, None]
    return np.packbits(bits[valid].astype(np.uint8)).tobytes()


def decode(data: bytes, lengths: Sequence[int], count: int) -> list[int]:
    """Decode ``count`` symbols from ``data`` coded by :func:`encode` with the same ``lengths``.

    Raises:
        ValueError: the data ends before ``count`` symbols, holds a bit pattern that
            is no code, or ``count`` symbols are asked of an empty code.
    """
    if count == 0:
        return []
    if not any(lengths):
        raise ValueError(f"cannot decode {count} symbols with an empty code")
    width = max(lengths)
    codes = canonical_codes(lengths)
    # Lookup table over every `width`-bit window: the symbol whose code prefixes it.
    table_sym = [-1] * (1 << width)
    table_len = [0] * (1 << width)
    for s, (code, length) in enumerate(zip(codes, lengths)):
        if length:
            lo = code << (width - length)
            for w in range(lo, lo + (1 << (width - length))):
                table_sym[w], table_len[w] = s, length
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint8)]).astype(np.int64)
    n = bits.size
    window = np.zeros(n + 1, dtype=np.int64)
    for j in range(width):  # the `width` bits starting at every position, as one integer
        window = (window << 1) | padded[j:j + n + 1]
    window = window.tolist()
    out = [0] * count
    pos = 0
    for i in range(count):
        if pos >= n:
            raise ValueError(f"Huffman stream ends after {i} of {count} symbols")
        w = window[pos]
        s = table_sym[w]
        if s < 0:
            raise ValueError("Huffman stream holds a bit pattern that is no code")
        out[i] = s
        pos += table_len[w]
    if pos > n:
        raise ValueError(f"Huffman stream ends inside symbol {count}")
    return out


def pack_lengths(lengths: Sequence[int]) -> bytes:
    """The code-length table: 4 bits per symbol of the alphabet (lengths 0..15)."""
    if any(not 0 <= length <= MAX_LENGTH for length in lengths):
        raise ValueError(f"code lengths must be in 0..{MAX_LENGTH}")
    padded = list(lengths) + [0] * (len(lengths) % 2)
    return bytes((padded[i] << 4) | padded[i + 1] for i in range(0, len(padded), 2))


def unpack_lengths(data: bytes, alphabet_size: int) -> list[int]:
    """Inverse of :func:`pack_lengths`."""
    out: list[int] = []
    for byte in data:
        out += [byte >> 4, byte & 15]
    return out[:alphabet_size]


def table_size(alphabet_size: int) -> int:
    """Bytes of the code-length table of an alphabet."""
    return (alphabet_size + 1) // 2


def encode_stream(symbols: Sequence[int], alphabet_size: int, max_length: int = MAX_LENGTH) -> bytes:
    """Code-length table followed by the Huffman-coded symbols.

    Args:
        symbols: the stream, each in ``0 .. alphabet_size-1``.
        alphabet_size: size of the alphabet (the table has one entry per symbol).
        max_length: longest code (at most :data:`MAX_LENGTH`).

    Returns:
        ``table_size(alphabet_size)`` bytes of table, then the bit stream.
    """
    freqs = [0] * alphabet_size
    for s, c in Counter(symbols).items():
        if not 0 <= s < alphabet_size:
            raise ValueError(f"symbol {s} is outside the alphabet 0..{alphabet_size - 1}")
        freqs[s] = c
    lengths = code_lengths(freqs, min(max_length, MAX_LENGTH))
    return pack_lengths(lengths) + encode(symbols, lengths)


def decode_stream(data: bytes, alphabet_size: int, count: int) -> list[int]:
    """Inverse of :func:`encode_stream`; ``count`` is the number of symbols coded.

    Raises:
        ValueError: the data is too short or damaged.
    """
    head = table_size(alphabet_size)
    if len(data) < head:
        raise ValueError(f"Huffman stream of {len(data)} bytes is shorter than its {head}-byte table")
    lengths = unpack_lengths(data[:head], alphabet_size)
    return decode(data[head:], lengths, count)


def coded_bits(freqs: Sequence[int], max_length: int = MAX_LENGTH) -> int:
    """Bits of the Huffman-coded stream with these symbol counts (table not included)."""
    lengths = code_lengths(freqs, max_length)
    return sum(f * length for f, length in zip(freqs, lengths))


def entropy_bits(freqs: Sequence[int]) -> float:
    """Shannon's bound: the least bits any code of these symbol counts can take (order 0)."""
    total = sum(freqs)
    return -sum(f * math.log2(f / total) for f in freqs if f > 0) if total else 0.0
