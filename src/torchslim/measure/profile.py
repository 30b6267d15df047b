"""One call that measures everything a report needs: :func:`profile`."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from torchslim.errors import ExportError, ModelError
from torchslim.measure.counting import count_macs, count_nonzero, count_parameters, dense_bytes
from torchslim.measure.latency import measure_latency


def _human(n: float, unit: str, base: int = 1000) -> str:
    """``1234567, "MAC"`` -> ``"1.23 MMAC"``; binary prefixes (KiB, MiB) for base 1024."""
    prefixes = ["", "K", "M", "G", "T"] if base == 1000 else ["", "Ki", "Mi", "Gi", "Ti"]
    i = 0
    while abs(n) >= base and i < len(prefixes) - 1:
        n /= base
        i += 1
    return f"{n:,.0f} {unit}" if i == 0 else f"{n:.2f} {prefixes[i]}{unit}"


@dataclass(frozen=True)
class Profile:
    """What a model costs: size, compute and measured speed.

    Attributes:
        params: parameters, dense (a masked weight counts all its entries).
        nonzero: nonzero entries of the parameters the model computes with.
        sparsity: ``1 - nonzero / params`` (over all parameters, biases included).
        macs: multiply-accumulates of one forward pass on one sample (dense; see
            :func:`torchslim.measure.count_macs`).
        dense_bytes: bytes of parameters and buffers held densely in memory.
        file_bytes: size of the saved ``.slim`` file on disk; None for a model
            without an architecture spec (which cannot be saved).
        latency_ms: median CPU latency per forward pass, by batch size.
    """

    params: int
    nonzero: int
    sparsity: float
    macs: int
    dense_bytes: int
    file_bytes: int | None
    latency_ms: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (``latency_ms`` keys stay ints; ``json`` writes them as strings)."""
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """The table as ``(metric, value)`` text pairs."""
        rows = [
            ("params", f"{self.params:,}"),
            ("nonzero params", f"{self.nonzero:,} ({100 * self.sparsity:.1f}% sparse)"),
            ("MACs / sample", _human(self.macs, "MAC")),
            ("dense bytes", _human(self.dense_bytes, "B", 1024)),
            ("file bytes (.slim)", _human(self.file_bytes, "B", 1024) if self.file_bytes is not None else "n/a (no spec)"),
        ]
        rows += [(f"latency, batch {b}", f"{ms:.3f} ms") for b, ms in sorted(self.latency_ms.items())]
        return rows

    def __str__(self) -> str:
        rows = [("metric", "value")] + self.rows()
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join(lines)

    def __rich__(self):
        """A ``rich`` table, used when a ``rich`` console prints the profile."""
        from rich.table import Table

        table = Table(title="torchslim profile")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in self.rows():
            table.add_row(k, v)
        return table


def _first_sample(example_inputs: Any) -> Any:
    """The first sample of every input tensor, keeping the batch dimension."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs[:1]
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(_first_sample(t) for t in example_inputs)
    if isinstance(example_inputs, dict):
        return {k: _first_sample(v) for k, v in example_inputs.items()}
    return example_inputs


def _single_tensor(example_inputs: Any) -> torch.Tensor | None:
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1 and isinstance(example_inputs[0], torch.Tensor):
        return example_inputs[0]
    return None


def _saved_size(model: nn.Module, input_shape: list[int] | None) -> int | None:
    from torchslim.export import save
    from torchslim.models import get_spec

    if get_spec(model) is None:
        return None
    with tempfile.TemporaryDirectory(prefix="torchslim-profile-") as tmp:
        path = Path(tmp) / "model.slim"
        save(model, path, input_shape=input_shape)
        return path.stat().st_size


def profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    batch_sizes: Sequence[int] = (1, 256),
    file_bytes: int | None = None,
    latency: bool = True,
    latency_budget_s: float = 1.0,
) -> Profile:
    """Measure a model: params, nonzero, sparsity, MACs, bytes in memory and on disk, latency.

    Args:
        model: the model (dense, masked or finalized); not changed.
        example_inputs: a tensor with the batch dimension first (or a tuple/dict of
            inputs for MACs; latency needs a single tensor). Only its first sample
            is used for MACs.
        batch_sizes: batch sizes to time.
        file_bytes: size of the model's file if already known; otherwise the model
            is saved with :func:`torchslim.export.save` to a temporary directory
            and that file's size is used (None for a model without a spec).
        latency: measure latency.
        latency_budget_s: about this many seconds of timed runs per batch size
            (see :func:`torchslim.measure.measure_latency`).

    Returns:
        A :class:`Profile`; ``print()`` it for a table.

    Example:
        >>> import torch, torchslim as ts
        >>> model = ts.models.create("fmnist_student", width=4, fc=8)
        >>> p = ts.measure.profile(model, torch.randn(1, 1, 28, 28), batch_sizes=(1,))
        >>> p.params == ts.measure.count_parameters(model)
        True
    """
    params = count_parameters(model)
    nonzero = count_nonzero(model)
    single = _single_tensor(example_inputs)
    if file_bytes is None:
        file_bytes = _saved_size(model, list(single.shape[1:]) if single is not None and single.dim() > 1 else None)
    latency_ms: dict[int, float] = {}
    if latency:
        if single is None:
            raise ModelError("latency is measured with a single input tensor; pass one, or latency=False")
        for b in batch_sizes:
            latency_ms[int(b)] = measure_latency(model, single, int(b), budget_s=latency_budget_s)["median_ms"]
    return Profile(
        params=params,
        nonzero=nonzero,
        sparsity=1.0 - nonzero / params if params else 0.0,
        macs=count_macs(model, _first_sample(example_inputs)),
        dense_bytes=dense_bytes(model),
        file_bytes=file_bytes,
        latency_ms=latency_ms,
    )


def profile_file(
    path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 256),
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    latency: bool = True,
    factory_hint: str | None = None,
) -> Profile:
    """Profile a saved ``.slim`` file, as ``torchslim profile model.slim`` does.

    The model is loaded with :func:`torchslim.export.load`, in float32 whatever
    the file stores (float16 is a storage format); the example input is a
    standard-normal float32 sample of the ``input_shape`` stored in the file.
    ``file_bytes`` is the size of ``path`` itself.

    Args:
        path: a ``.slim`` file.
        batch_sizes: batch sizes to time.
        factory: passed to :func:`torchslim.export.load`, for files naming user code.
        latency: measure latency.
        factory_hint: what to tell the user when the file names an untrusted
            factory, with ``{target}`` for its name (see :func:`torchslim.export.load`);
            the default names both ``factory=`` and ``torchslim profile --factory``.

    Raises:
        ExportError: the file cannot be loaded or stores no input shape.

    Example:
        >>> from torchslim.measure import profile_file
        >>> print(profile_file("/tmp/student.slim", batch_sizes=(1,)))  # doctest: +SKIP
    """
    from torchslim.export import load, read_metadata

    input_shape = read_metadata(path).get("input_shape")
    if not input_shape:
        raise ExportError(f"{path}: the file stores no input_shape, so no example input can be built; re-save it with save(..., input_shape=[C, H, W])")
    if factory_hint is None:
        # Called from Python or from `torchslim profile`: name both ways to trust the factory.
        factory_hint = ("pass factory={target!r} to profile_file() "
                        "(on the command line: torchslim profile MODEL --factory {target})")
    model = load(path, factory=factory, dtype=torch.float32, factory_hint=factory_hint)
    example = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as exc:  # the header's input shape does not fit the model: say which, in one line
        raise ModelError(f"{path}: the model rejects its stored input_shape {list(input_shape)}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; re-save it with "
                         "save(..., input_shape=[C, H, W]) matching the model") from None
    return profile(model, example, batch_sizes=batch_sizes, file_bytes=os.path.getsize(path), latency=latency)
