"""Numbers as the report prints them (shared by the report and the stages' sections)."""

from __future__ import annotations


def human_count(n: float) -> str:
    """``1.2M``-style counts (MACs, parameters).

    Example:
        >>> human_count(19_900_000), human_count(512)
        ('19.9M', '512')
    """
    for suffix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}" if suffix else f"{n:.0f}"
        n /= 1000
    return f"{n:.3g}P"


def human_bytes(n: int) -> str:
    """``84.9 KiB``-style sizes.

    Example:
        >>> human_bytes(86_938), human_bytes(100)
        ('84.9 KiB', '100 B')
    """
    size = float(n)
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or suffix == "GiB":
            return f"{size:.0f} {suffix}" if suffix == "B" else f"{size:.1f} {suffix}"
        size /= 1024
    return str(n)
