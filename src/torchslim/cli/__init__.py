"""Command-line interface (``torchslim``)."""

from torchslim.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
