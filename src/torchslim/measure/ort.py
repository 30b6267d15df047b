"""Latency in ONNX Runtime, the runtime a quantized model is deployed in.

Mirrors :mod:`torchslim.measure.latency` (warm-up, an adaptive number of timed
passes, median and p90, alternation across models) for ONNX files run by
onnxruntime's CPU execution provider. Sessions are built with the thread
counts pinned (``intra_op_num_threads``, one inter-op thread, no spinning
between runs) so that fp32 and int8 files are timed under the same settings,
and so a measurement does not take more cores than it says it does.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from torchslim.errors import ModelError
from torchslim.measure.latency import DEFAULT_BUDGET_S, MAX_REPEATS, MIN_REPEATS

_INSTALL_HINT = "ONNX Runtime latency needs onnxruntime: pip install torchslim[onnx]"


def ort_session(onnx_model: str | os.PathLike | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with pinned threads.

    Args:
        onnx_model: a ``.onnx`` path or the model's bytes.
        threads: ``intra_op_num_threads``; None uses ``torch.get_num_threads()``, so ONNX
            Runtime and torch latencies in one report use the same number of cores.

    Raises:
        ModelError: onnxruntime is missing, or the file cannot be loaded.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError(_INSTALL_HINT) from exc
    if threads is None:
        import torch  # noqa: PLC0415

        threads = torch.get_num_threads()
    if threads < 1:
        raise ModelError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Spinning threads keep cores busy after a run; on a shared machine that slows the
    # other model of an alternated pair, so it is switched off for fair ratios.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = onnx_model if isinstance(onnx_model, bytes) else os.fspath(onnx_model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        where = "ONNX bytes" if isinstance(onnx_model, bytes) else os.fspath(onnx_model)
        raise ModelError(f"onnxruntime cannot load {where}: {exc}") from exc


def _ort_batch(example: Any, batch_size: int) -> np.ndarray:
    """``batch_size`` float32 samples from a shape or an example array/tensor (rows repeated)."""
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(example, "detach"):  # a torch tensor
        example = example.detach().cpu().numpy()
    if isinstance(example, np.ndarray):
        if example.ndim < 1 or example.shape[0] < 1:
            raise ModelError(f"example must have a non-empty batch dimension first, got shape {example.shape}")
        return np.ascontiguousarray(example[np.arange(batch_size) % example.shape[0]], dtype=np.float32)
    shape = tuple(int(d) for d in example)
    return np.random.default_rng(0).standard_normal((batch_size, *shape)).astype(np.float32)


def _input_name(session: Any) -> str:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"ONNX Runtime latency supports one-input models; this one has {len(inputs)}")
    return inputs[0].name


def ort_latency(
    onnx_model: str | os.PathLike | bytes,
    example_shape_or_array: Any,
    batch_size: int = 1,
    *,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
) -> dict[str, Any]:
    """Latency of one ONNX Runtime run at ``batch_size``, in milliseconds.

    Args:
        onnx_model: a ``.onnx`` path or the model's bytes.
        example_shape_or_array: one sample's shape without the batch dimension
            (``(1, 28, 28)``: seeded standard-normal inputs), or an example array or
            tensor with the batch first (its rows repeated).
        batch_size: samples per run.
        threads: intra-op threads; None: ``torch.get_num_threads()``.
        warmup: untimed runs first (at least one).
        repeats: timed runs; None picks ``budget_s / (fastest warm-up run)``, clamped
            to [5, 500], stopping early (after 5) once twice ``budget_s`` has passed.
        budget_s: target seconds of timed work when ``repeats`` is None.

    Returns:
        ``{"batch_size", "median_ms", "p90_ms", "min_ms", "mean_ms", "repeats", "threads", "runtime": "onnxruntime"}``.

    Raises:
        ModelError: onnxruntime is missing, the model cannot be loaded, or an argument is out of range.

    Example:
        >>> import torch, torchslim as ts
        >>> model = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
        >>> _ = ts.export.export_onnx(model, torch.randn(2, 1, 28, 28), "/tmp/mlp.onnx")
        >>> ts.measure.ort_latency("/tmp/mlp.onnx", (1, 28, 28), batch_size=4, repeats=5)["median_ms"] > 0
        True
    """
    if repeats is not None and repeats < 1:
        raise ModelError(f"repeats must be >= 1, got {repeats}")
    session = ort_session(onnx_model, threads)
    feed = {_input_name(session): _ort_batch(example_shape_or_array, batch_size)}
    fastest = float("inf")
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        session.run(None, feed)
        fastest = min(fastest, time.perf_counter() - start)
    n = repeats if repeats is not None else int(np.clip(budget_s / max(fastest, 1e-6), MIN_REPEATS, MAX_REPEATS))
    times = []
    deadline = time.perf_counter() + 2 * budget_s
    for _ in range(n):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
        if repeats is None and len(times) >= MIN_REPEATS and start > deadline:
            break
    ms = np.asarray(times) * 1e3
    return {
        "batch_size": batch_size,
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "repeats": len(times),
        "threads": int(session.get_session_options().intra_op_num_threads),
        "runtime": "onnxruntime",
    }


def compare_ort_latency(
    models: Mapping[str, str | os.PathLike | bytes],
    example_shape_or_array: Any,
    batch_size: int = 1,
    *,
    threads: int | None = None,
    warmup: int = 2,
    repeats: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    torch_models: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """ONNX Runtime latency of several models, timed run by run in alternation, for fair ratios.

    As :func:`torchslim.measure.compare_latency` does for torch: single runs of each
    model alternate in a rotating order, so a burst of load from other processes
    lands on all of them alike and the ratios between them hold on a busy machine.
    Every session gets the same pinned thread settings. ``torch_models`` join the
    same rotation (torch eager beside ONNX Runtime, on the same inputs and thread count).

    Args:
        models: ``{name: .onnx path or bytes}``.
        example_shape_or_array: as in :func:`ort_latency`.
        batch_size: samples per run.
        threads: intra-op threads of every session; None: ``torch.get_num_threads()``.
        warmup: untimed runs of each model first.
        repeats: timed runs of each model; None picks ``budget_s`` over the slowest
            model's fastest warm-up run, clamped to [5, 500].
        budget_s: target seconds of timed work per model when ``repeats`` is None.
        torch_models: ``{name: nn.Module}`` timed in the same rotation, each as a finalized,
            eval-mode CPU copy under ``torch.inference_mode`` (as :func:`~torchslim.measure.measure_latency`),
            with ``torch.set_num_threads(threads)`` for the measurement; names must differ from ``models``'.

    Returns:
        Per name: ``{"median_ms", "p90_ms", "min_ms", "repeats", "threads", "runtime"}``
        (``runtime``: ``onnxruntime`` or ``torch``).

    Example:
        >>> import torch, torchslim as ts
        >>> model = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
        >>> _ = ts.export.export_onnx(model, torch.randn(2, 1, 28, 28), "/tmp/mlp.onnx")
        >>> t = ts.measure.compare_ort_latency({"a": "/tmp/mlp.onnx", "b": "/tmp/mlp.onnx"}, (1, 28, 28),
        ...                                    batch_size=4, repeats=5)
        >>> sorted(t), t["a"]["repeats"]
        (['a', 'b'], 5)
    """
    torch_models = dict(torch_models or {})
    if not models and not torch_models:
        raise ModelError("compare_ort_latency needs at least one model")
    if repeats is not None and repeats < 1:
        raise ModelError(f"repeats must be >= 1, got {repeats}")
    both = sorted(set(models) & set(torch_models))
    if both:
        raise ModelError(f"names {both} are both ONNX and torch models; give each timed model its own name")
    import torch  # noqa: PLC0415

    from torchslim.measure.counting import finalized_copy  # noqa: PLC0415

    x = _ort_batch(example_shape_or_array, batch_size)
    runs, names, runtimes = [], [], []
    used = threads
    for name, source in models.items():
        session = ort_session(source, threads)
        used = int(session.get_session_options().intra_op_num_threads)
        feed = {_input_name(session): x}
        runs.append(lambda s=session, f=feed: s.run(None, f))
        names.append(name)
        runtimes.append("onnxruntime")
    xt = torch.from_numpy(x)
    for name, module in torch_models.items():
        copy = finalized_copy(module).cpu().eval()
        runs.append(lambda m=copy: m(xt))
        names.append(name)
        runtimes.append("torch")
    used = used if used is not None else torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(used)  # torch runs with the sessions' thread count
    try:
        with torch.inference_mode():
            fastest = []
            for run in runs:
                best = float("inf")
                for _ in range(max(1, warmup)):
                    start = time.perf_counter()
                    run()
                    best = min(best, time.perf_counter() - start)
                fastest.append(best)
            n = repeats if repeats is not None else int(np.clip(budget_s / max(max(fastest), 1e-6), MIN_REPEATS,
                                                                MAX_REPEATS))
            times: list[list[float]] = [[] for _ in names]
            for r in range(n):
                for k in range(len(runs)):
                    i = (k + r) % len(runs)  # rotate, so no model always runs right after another
                    start = time.perf_counter()
                    runs[i]()
                    times[i].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(old_threads)
    return {name: {"median_ms": float(np.median(t) * 1e3), "p90_ms": float(np.percentile(t, 90) * 1e3),
                   "min_ms": float(min(t) * 1e3), "repeats": len(t), "threads": int(used), "runtime": rt}
            for name, t, rt in zip(names, times, runtimes)}


def ort_accuracy(onnx_model: str | os.PathLike | bytes, x: Any, y: Any, *, batch_size: int = 256,
                 threads: int | None = None) -> float:
    """Top-1 accuracy of an ONNX classifier run in ONNX Runtime, in [0, 1].

    Args:
        onnx_model: a ``.onnx`` path or bytes, returning logits ``(N, num_classes)``.
        x: inputs ``(N, ...)`` (tensor or array, already normalized as the model expects).
        y: integer labels ``(N,)``.
        batch_size: samples per run.
        threads: intra-op threads; None: ``torch.get_num_threads()``.
    """
    xs = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    ys = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    if len(xs) != len(ys):
        raise ModelError(f"x has {len(xs)} samples but y has {len(ys)}")
    if len(xs) == 0:
        raise ModelError("cannot evaluate accuracy on an empty set")
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    session = ort_session(onnx_model, threads)
    name = _input_name(session)
    correct = 0
    for start in range(0, len(xs), batch_size):
        logits = session.run(None, {name: np.ascontiguousarray(xs[start:start + batch_size], dtype=np.float32)})[0]
        correct += int((logits.argmax(axis=1) == ys[start:start + batch_size]).sum())
    return correct / len(xs)


__all__: Sequence[str] = ["compare_ort_latency", "ort_accuracy", "ort_latency", "ort_session"]
