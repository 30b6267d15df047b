"""Per-layer precision: which layers to keep float, decided by measuring in ONNX Runtime.

:func:`int8_layer_sweep` quantizes the whole model, then the model with one layer
at a time kept float, and measures each file in ONNX Runtime: accuracy on a
validation subset and latency at the given batch sizes (all files of the sweep
timed in alternation). The rule: keep a layer float when keeping it float makes
the model faster at some measured batch size (by more than ``latency_tol``) or
more accurate (by more than ``accuracy_tol``), and slower at none (by more than
``latency_tol``). Its ``exclude`` list goes into
:class:`~torchslim.quant.Int8Config` (or a recipe's ``quantize.method.exclude``).
Cost: one fp32 export (every file is quantized from it, see ``fp32_onnx`` in
:func:`~torchslim.quant.quantize`), one quantization and one evaluation per
layer, plus one for the final choice: the model with every kept-float layer
float together is quantized, evaluated and timed against the fp32 and all-int8
files once more (``final``), since layers that each pay alone need not pay
together (beside the best of those layers alone, when they are several). The
first of the two that is slower than all-int8 at no batch size (or more
accurate) is taken, else all-int8; when it is slower than fp32 at some batch
size where all-int8 is not, all-int8 is taken; when that too is slower than
fp32 somewhere, every layer stays float (int8 does not pay on this model; the
``quantize`` stage then ships the fp32 file); ``slower_at`` names the batch
sizes where the final file is slower than fp32.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch.nn as nn

from torchslim.quant.int8 import Int8Config, QUANTIZABLE, quantize


def int8_layer_sweep(model: nn.Module, config: Int8Config, calib: Any, val: Any, *,
                     batch_sizes: Sequence[int] = (1, 256), max_samples: int = 1000, threads: int | None = None,
                     accuracy_tol: float = 0.001, latency_tol: float = 0.03, budget_s: float = 0.5,
                     verify: bool = True, example: Any = None, normalization: dict[str, Any] | None = None,
                     fp32_onnx: bytes | str | os.PathLike | None = None) -> dict[str, Any]:
    """Measure int8 with each Conv/Linear layer kept float in turn; return the layers to keep float.

    Args:
        model: the float model (unchanged).
        config: the int8 settings (its ``exclude`` is the starting point, kept float throughout).
        calib: the calibration split (``.x``).
        val: the split accuracy is measured on (``.x``, ``.y``; the first ``max_samples``).
        batch_sizes: batch sizes latency is measured at.
        max_samples: validation samples per evaluation.
        threads: ONNX Runtime intra-op threads (None: ``torch.get_num_threads()``).
        accuracy_tol: accuracy gain (fraction) that makes a layer stay float.
        latency_tol: relative latency gain that makes a layer stay float.
        budget_s: seconds of timed runs per batch size.
        verify: quantize with the chosen ``exclude`` and time it against fp32 (``final``, ``slower_at``).
        example: an input for the exports (default: the first calibration inputs).
        normalization: ``{"mean", "std"}``, recorded in the ONNX files' metadata.
        fp32_onnx: the model's fp32 ONNX export if already made (bytes or path; see
            :func:`~torchslim.quant.quantize`); else it is exported once here. Every file of
            the sweep is quantized from that one export.

    Returns:
        ``{"all_int8": {...}, "fp32": {...}, "layers": {name: {"accuracy", "latency_ms", "keep_float", "why"}},
        "exclude": [names], "int8_slower_than_fp32": bool (all-int8 slower at every batch size),
        "final": {"accuracy", "latency_ms", "fp32_latency_ms", "exclude", "fallback", "measured"} | None,
        "slower_at": [batch sizes, as strings], "quantized": the :class:`~torchslim.quant.QuantizedModel`
        with ``final["exclude"]``}``. ``exclude`` is the per-layer rule's list; ``final["exclude"]``
        the list after the combined measurement (use it: it is what ``quantized`` was made with).
    """
    from torchslim.measure.ort import compare_ort_latency, ort_accuracy  # noqa: PLC0415

    sub = type("Subset", (), {"x": val.x[:max_samples], "y": val.y[:max_samples]})
    base = quantize(model, config, calib=calib, example=example, normalization=normalization, fp32_onnx=fp32_onnx)
    names = [n for n in base.layers if n not in base.excluded]
    files = {"fp32": base.fp32_onnx, "all_int8": base.int8_onnx}
    for name in names:
        files[name] = _requantize(model, config, calib, base, tuple(config.exclude) + (name,), example).int8_onnx
    accuracy = {k: ort_accuracy(v, sub.x, sub.y, threads=threads) for k, v in files.items()}
    one_input = val.x[:1]
    latency: dict[str, dict[str, float]] = {k: {} for k in files}
    for b in batch_sizes:
        timed = compare_ort_latency(files, one_input, b, threads=threads, budget_s=budget_s)
        for k in files:
            latency[k][str(b)] = timed[k]["median_ms"]
    layers = {}
    for name in names:
        lat = latency[name]
        keep, why = keep_float(lat, latency["all_int8"], accuracy[name], accuracy["all_int8"], latency_tol,
                               accuracy_tol)
        layers[name] = {"accuracy": accuracy[name], "latency_ms": lat, "keep_float": keep, "why": why}
    exclude = list(config.exclude) + [n for n in names if layers[n]["keep_float"]]
    slower = all(latency["all_int8"][b] > latency["fp32"][b] for b in latency["fp32"])
    final = None
    chosen_model = base
    slower_at = [b for b in latency["fp32"] if latency["all_int8"][b] > latency["fp32"][b]]
    if verify:
        kept = [n for n in names if layers[n]["keep_float"]]
        # The layer whose float form gained most at its worst batch size: tried alone when the
        # kept layers together do not pay (their single gains can be noise, or cancel).
        single = max(kept, key=lambda n: min(latency["all_int8"][b] / latency[n][b] for b in latency[n]),
                     default=None)
        final, chosen_model, slower_at = _verify(model, config, calib, base, exclude, names, sub, one_input,
                                                 batch_sizes, threads, budget_s, example,
                                                 accuracy["all_int8"], accuracy_tol, latency_tol, single)
    return {"final": final, "slower_at": slower_at, "quantized": chosen_model,
            "all_int8": {"accuracy": accuracy["all_int8"], "latency_ms": latency["all_int8"]},
            "fp32": {"accuracy": accuracy["fp32"], "latency_ms": latency["fp32"]},
            "layers": layers, "exclude": exclude, "int8_slower_than_fp32": slower,
            "samples": len(sub.y), "quantizable": [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]}


def keep_float(latency_ms: dict[str, float], all_int8_ms: dict[str, float], accuracy: float, all_int8_accuracy: float,
               latency_tol: float = 0.03, accuracy_tol: float = 0.001) -> tuple[bool, str]:
    """The per-layer rule: should a layer stay float, given the model measured with it float and all int8?

    Float when that is faster at some batch size (by more than ``latency_tol``) or more
    accurate (by more than ``accuracy_tol``), and slower at no batch size (by more than
    ``latency_tol``): a gain at one batch size must not be paid for at another (a float
    first conv can win at b=1 and lose 15% at b=256 to its boundary's QuantizeLinear).

    Args:
        latency_ms: ``{batch size: median ms}`` with the layer float.
        all_int8_ms: the same for the all-int8 file.
        accuracy: accuracy with the layer float; all_int8_accuracy: all int8.

    Returns:
        ``(keep_float, why)``.

    Example:
        >>> keep_float({"1": 0.8, "256": 50.0}, {"1": 1.0, "256": 40.0}, 0.9, 0.9)[0]
        False
    """
    faster = [b for b in latency_ms if latency_ms[b] < (1 - latency_tol) * all_int8_ms[b]]
    slower = [b for b in latency_ms if latency_ms[b] > (1 + latency_tol) * all_int8_ms[b]]
    why = [f"b={b}: {latency_ms[b]:.3f} ms with it float vs {all_int8_ms[b]:.3f} ms all int8" for b in faster]
    if accuracy > all_int8_accuracy + accuracy_tol:
        why.append(f"accuracy {100 * accuracy:.2f}% with it float vs {100 * all_int8_accuracy:.2f}% all int8")
    keep = bool(why) and not slower
    if why and slower:
        why.append("but slower at " + ", ".join(f"b={b}: {latency_ms[b]:.3f} ms vs {all_int8_ms[b]:.3f} ms"
                                                for b in slower) + ": stays int8")
    return keep, "; ".join(why) or "int8 is as fast and as accurate"


def _requantize(model: nn.Module, config: Int8Config, calib: Any, base: Any, exclude: tuple[str, ...],
                example: Any) -> Any:
    """``config`` with ``exclude``, quantized from ``base``'s fp32 file (one export serves the whole sweep)."""
    one = Int8Config(**{**config.model_dump(), "exclude": exclude})
    q = quantize(model, one, calib=calib, example=example, fp32_onnx=base.fp32_onnx)
    return dataclasses.replace(q, export=base.export)  # the parity check of that one export


def _verify(model: nn.Module, config: Int8Config, calib: Any, base: Any, exclude: list[str], names: list[str],
            sub: Any, one_input: Any, batch_sizes: Sequence[int], threads: int | None, budget_s: float,
            example: Any, base_accuracy: float, accuracy_tol: float, latency_tol: float, single: str | None = None
            ) -> tuple[dict[str, Any], Any, list[str]]:
    """Time the chosen file against fp32 and all-int8; fall back when it does not pay.

    Layers that each pay when kept float alone need not pay together (every float/int8
    boundary adds a QuantizeLinear or DequantizeLinear), so the choice is measured once
    more, beside ``single`` (the best layer alone) when the choice has several layers. The
    first of them that is slower than all-int8 at no batch size (or more accurate) is
    taken, else all-int8; when the result is slower than fp32 somewhere, all-int8 is taken
    if it is not, and otherwise every layer stays float: int8 does not pay on this model.
    """
    from torchslim.measure.ort import compare_ort_latency, ort_accuracy  # noqa: PLC0415

    def build(ex: list[str]) -> Any:
        if list(ex) == list(config.exclude):
            return base
        return _requantize(model, config, calib, base, tuple(ex), example)

    candidates: dict[str, list[str]] = {}
    if exclude != list(config.exclude):
        candidates["chosen"] = exclude
        if single is not None and len(exclude) > len(config.exclude) + 1:
            candidates["single"] = list(config.exclude) + [single]
    built = {k: build(ex) for k, ex in candidates.items()}
    files = {"fp32": base.fp32_onnx, "all_int8": base.int8_onnx, **{k: q.int8_onnx for k, q in built.items()}}
    lat: dict[str, dict[str, float]] = {k: {} for k in files}
    for b in batch_sizes:
        timed = compare_ort_latency(files, one_input, b, threads=threads, budget_s=budget_s)
        for k in files:
            lat[k][str(b)] = timed[k]["median_ms"]

    def slower_at(key: str) -> list[str]:
        return [b for b in lat["fp32"] if lat[key][b] > lat["fp32"][b]]

    key, chosen, accuracy, rejected = "all_int8", base, base_accuracy, []
    exclude = list(config.exclude)
    for k, ex in candidates.items():
        acc = ort_accuracy(built[k].int8_onnx, sub.x, sub.y, threads=threads)
        behind = [b for b in lat["fp32"] if lat[k][b] > (1 + latency_tol) * lat["all_int8"][b]]
        if behind and acc <= base_accuracy + accuracy_tol:
            rejected.append(f"{', '.join(ex[len(config.exclude):])} float: slower than all int8 ("
                            + ", ".join(f"b={b}: {lat[k][b]:.3f} ms vs {lat['all_int8'][b]:.3f} ms" for b in behind)
                            + ") and no more accurate")
            continue
        key, chosen, accuracy, exclude = k, built[k], acc, list(ex)
        break
    fallback = None
    if rejected:
        fallback = "; ".join(rejected) + ("" if key == "all_int8" else f"; taken: {', '.join(exclude)} float")
        if key == "all_int8":
            fallback += ": all int8 taken"
    if slower_at(key) and key != "all_int8" and not slower_at("all_int8"):
        exclude, chosen, key, accuracy = list(config.exclude), base, "all_int8", base_accuracy
        fallback = "the chosen float layers were slower than fp32; all int8 is not"
    elif slower_at(key):
        worst = ", ".join(f"b={b}: {lat[key][b]:.3f} ms vs fp32 {lat['fp32'][b]:.3f} ms" for b in slower_at(key))
        exclude = list(dict.fromkeys(list(config.exclude) + names))
        chosen = build(exclude)
        accuracy = ort_accuracy(chosen.int8_onnx, sub.x, sub.y, threads=threads)
        fallback = (f"int8 stays slower than fp32 ({worst}; all int8: "
                    + ", ".join(f"b={b}: {lat['all_int8'][b]:.3f} ms" for b in lat["fp32"])
                    + "): every layer kept float")
    final = {"accuracy": accuracy, "latency_ms": lat[key], "fp32_latency_ms": lat["fp32"], "exclude": exclude,
             "fallback": fallback, "measured": lat}
    # Every layer float: the file is the float model, not slower by construction.
    still = [] if set(exclude) >= set(base.layers) else slower_at(key)
    return final, chosen, still
