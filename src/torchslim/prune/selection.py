"""Picking layers by type and by name or regex.

A pattern is either an exact module name (``"classifier.0"``) or a regular
expression prefixed with ``re:`` (``"re:features\\..*"``), matched against the
whole name. Precedence: a layer is selected when its type is one of
``layer_types``, it matches at least one ``include`` pattern (or ``include``
is empty), and it matches no ``exclude`` pattern. Exclusion always wins.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

from torchslim.errors import ConfigError

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}


def name_matches(name: str, pattern: str) -> bool:
    """True when ``name`` equals ``pattern``, or fully matches it for a ``re:`` pattern."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern


def check_pattern(pattern: str) -> str:
    """Validate a pattern (a bad regex is a config error), returning it unchanged."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"bad regular expression in layer pattern {pattern!r}: {exc}") from None
    return pattern


def unmatched_patterns(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The ``patterns`` (names or ``re:`` regexes) that match none of ``names``, in order."""
    names = list(names)
    return [p for p in patterns if not any(name_matches(n, p) for n in names)]


def check_patterns_match(names: Iterable[str], patterns: Iterable[str], field: str, what: str = "layer",
                         hint: str = "", plural: str | None = None) -> None:
    """Raise when a pattern in ``field`` matches none of ``names``: a typo must not silently prune everything.

    Args:
        names: the names the patterns are meant for (the candidate layers, in model order).
        patterns: names or ``re:`` regexes, as written in the config.
        field: the config field they come from, for the message (``"exclude"``, ``"overrides"``).
        what: what a name is, for the message (``"Linear/Conv2d layer"``).
        hint: appended to the message (e.g. why an existing module is not a candidate).
        plural: ``what`` in the plural, when it is not ``what + "s"``.

    Raises:
        ConfigError: naming every pattern that matches nothing, and a few names that exist.
    """
    names = list(names)
    missing = unmatched_patterns(names, patterns)
    if not missing:
        return
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    which = ", ".join(repr(p) for p in missing)
    raise ConfigError(f"{field}: {which} match{'es' if len(missing) == 1 else ''} no {what} of the model; "
                      f"{plural or what + 's'} that exist: {shown or 'none'}.{hint}")


def select_layers(
    model: nn.Module,
    layer_types: Iterable[str] = ("Linear", "Conv2d"),
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs chosen by type, include and exclude patterns, in model order."""
    types = []
    for t in layer_types:
        if t not in LAYER_TYPES:
            raise ConfigError(f"unknown layer type {t!r}; known: {', '.join(LAYER_TYPES)}")
        types.append(LAYER_TYPES[t])
    include, exclude = list(include), list(exclude)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, tuple(types)):
            continue
        if include and not any(name_matches(name, p) for p in include):
            continue
        if any(name_matches(name, p) for p in exclude):
            continue
        chosen.append((name, module))
    return chosen


def first_and_last(model: nn.Module, layer_types: Iterable[str] = ("Linear", "Conv2d")) -> list[str]:
    """Names of the first and last layers of ``layer_types`` in definition order.

    Definition order (``model.named_modules()``) is execution order for every
    torchslim preset and for plain ``nn.Sequential`` stacks; it may differ for a
    model whose ``forward`` calls its submodules out of order.
    """
    names = [n for n, _ in select_layers(model, layer_types)]
    return sorted(set(names[:1] + names[-1:]), key=names.index)


def resolve_override(name: str, overrides: dict[str, float | None]) -> tuple[bool, float | None]:
    """The per-layer override that applies to ``name``: ``(found, value)``.

    Precedence: an exact name wins over every ``re:`` pattern; among patterns, the
    first one (in the mapping's order) that fully matches wins.
    """
    if name in overrides:
        return True, overrides[name]
    for pattern, value in overrides.items():
        if pattern.startswith("re:") and name_matches(name, pattern):
            return True, value
    return False, None
