"""The precision axis of a search: every measured channel plan also as a static int8 ONNX file.

Why int8 is not a per-group choice in the allocation: on the CPUs this targets, ONNX Runtime's
int8 gain comes from running the graph's convolutions and matrix products as int8 kernels
end to end; a float layer between two int8 ones costs a DequantizeLinear/QuantizeLinear pair
that can eat the gain. So each plan the search measures in fp32 (dense, sweep, uniform) is
quantized once with every Conv/Linear int8 (:func:`torchslim.quant.quantize`: static QDQ,
U8S8, min-max calibration on ``SearchSpace.int8_calibration_samples`` training inputs, the
same seeded subset the pipeline's ``quantize`` stage draws), its accuracy measured by running
that file in ONNX Runtime on the whole validation split, and its latency timed end to end in
ONNX Runtime in alternation with the dense fp32 file. Those points join the front beside the
fp32 ones; the choice may pick either. The chosen int8 plan is fine-tuned as an fp32 one is,
then quantized the way the emitted recipe's ``quantize`` stage does it.

With ``SearchSpace.int8_layers="sweep"`` the precision is per layer: before the points are
measured, :func:`~torchslim.quant.precision.int8_layer_sweep` runs once on the dense model at the
budget's batch (a layer stays float when int8 makes the file slower or less accurate), and every
plan's int8 twin keeps those layers float (a channel cut keeps the layer names). The layers
measured float are then the layers shipped float: the chosen model is quantized with the same
``exclude``, and the recipe's ``quantize.method.exclude`` lists them, so ``torchslim run``
rebuilds that file without timing anything again (the shipped file is exported from the
fine-tuned model with the default exporter, as the ``quantize`` stage does; the measured twin
came from a TorchScript export of the model before the final fine-tune). (One sweep per
plan would cost a quantization per layer per point.)

Optuna trials (``trials > 0``) sample fp32 channel plans (an int8 point is never a seed of the
study, and the study's objectives are the fp32 point's), but each trial's fine-tuned model is
also quantized and measured as its int8 file, and that point joins the front like a sweep
point's twin (``trial_points``; ``trials.jsonl`` lists it under ``twins``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch.nn as nn

from torchslim.errors import ConfigError
from torchslim.search.front import Point

PRECISIONS = ("fp32", "int8")


def int8_available() -> bool:
    """Whether ONNX Runtime's quantization tools (and onnx) can be imported here."""
    try:
        return (importlib.util.find_spec("onnx") is not None
                and importlib.util.find_spec("onnxruntime.quantization") is not None)
    except ModuleNotFoundError:  # find_spec imports the parent package: no onnxruntime at all
        return False


def resolve_precision(space: Any, budget: Any, trials: int = 0) -> tuple[str, ...]:
    """The precisions this search measures: ``space.precision``, or both when int8 is available.

    Raises:
        ConfigError: int8 asked for with ``runtime="torch"`` (int8 runs in ONNX Runtime only),
            without onnxruntime, or int8 alone with Optuna trials (they refine fp32 plans).
    """
    if space.precision is None:
        return PRECISIONS if budget.runtime == "ort" and int8_available() else ("fp32",)
    wanted = tuple(space.precision)
    if "int8" in wanted:
        if budget.runtime != "ort":
            raise ConfigError("precision int8 is measured in ONNX Runtime: use Budget(runtime='ort') (torchslim "
                              "auto --runtime ort), or precision ['fp32'] (--precision fp32) to time torch eager")
        if not int8_available():
            raise ConfigError("precision int8 needs onnx and onnxruntime (pip install 'torchslim[onnx]'), or "
                              "precision ['fp32'] (--precision fp32)")
        if "fp32" not in wanted and trials > 0:
            raise ConfigError("Optuna trials refine fp32 channel plans: with trials > 0 use precision "
                              "['fp32', 'int8'] (--precision both) or ['fp32']")
    return wanted


def int8_config(space: Any) -> Any:
    """The :class:`~torchslim.quant.Int8Config` of every int8 point (and of the recipe's ``quantize`` stage)."""
    from torchslim.quant import Int8Config

    return Int8Config(calibration_samples=space.int8_calibration_samples)


def measure_int8(m: Any, model: nn.Module, twin: Point, config: Any, calib: Any, val: Any, dense_acc: float,
                 budget: Any) -> Point:
    """``model`` (the fp32 point ``twin``'s model) quantized to int8 and measured as that file.

    The fp32 export is the measurer's (one TorchScript export per plan); calibration on
    ``calib`` (training inputs); accuracy of the int8 file in ONNX Runtime on ``val``; latency
    at the budget's batch, alternated with the dense fp32 file.
    """
    from torchslim.measure.ort import compare_ort_latency, ort_accuracy
    from torchslim.quant import quantize

    q = quantize(model, config, calib=calib, example=m.example, fp32_onnx=m.onnx(model))
    acc = ort_accuracy(q.int8_onnx, val.x, val.y, threads=budget.threads)
    t = compare_ort_latency({"dense": m.dense_file(), "cand": q.int8_onnx}, m.example[:1], budget.batch,
                            threads=budget.threads, budget_s=budget.latency_budget_s)
    m.dense_ms.append(t["dense"]["median_ms"])
    d = q.describe()
    info = {"calibration_samples": q.calibration_samples, "scheme": d["scheme"], "reduce_range": d["reduce_range"],
            "excluded": list(q.excluded), "fp32_bytes": q.fp32_bytes,
            "fp32_twin_latency_ratio": twin.latency_ratio, "fp32_twin_accuracy": twin.accuracy}
    return Point(dict(twin.plan), twin.source, acc, 100 * (dense_acc - acc), t["cand"]["median_ms"],
                 t["cand"]["p90_ms"], t["cand"]["median_ms"] / t["dense"]["median_ms"], q.int8_bytes, twin.macs,
                 None, None, budget.batch, budget.runtime, {**twin.extra, "int8": info}, "int8")


#: An int8 point must beat its fp32 twin's latency by this fraction to be chosen under an accuracy
#: budget: on fmnist_student the dense int8 file measured 0.995x, was chosen, and re-measured 1.08x.
INT8_MIN_GAIN = 0.05


def prefer_fp32_twin(chosen: Point, points: list[Point], budget: Any, min_gain: float = INT8_MIN_GAIN) -> Point:
    """Under ``max_drop``, the fp32 twin of an int8 choice whose measured gain over it is within timing noise.

    Returns ``chosen`` unless it is int8, the budget minimises latency, and the same plan's fp32
    point (same source) also meets the drop and is at most ``1 / (1 - min_gain)`` times slower.
    """
    if chosen.precision != "int8" or budget.max_drop is None:
        return chosen
    twins = [p for p in points if p.precision == "fp32" and p.plan == chosen.plan and p.source == chosen.source
             and p.drop <= budget.max_drop + 1e-9]
    if twins and chosen.latency_ratio > (1 - min_gain) * min(p.latency_ratio for p in twins):
        return min(twins, key=lambda p: p.latency_ratio)
    return chosen


def layer_precision(m: Any, config: Any, train: Any, val: Any, budget: Any, samples: int) -> tuple[Any, dict]:
    """The per-layer sweep on the dense model: ``config`` with the layers to keep float, and why.

    Timed at the budget's batch only (the batch the search minimises), on ``samples`` validation
    inputs, from the measurer's fp32 export of the dense model.
    """
    from torchslim.quant.precision import int8_layer_sweep

    sweep = int8_layer_sweep(m.dense, config, train, val, batch_sizes=(budget.batch,), max_samples=samples,
                             threads=budget.threads, budget_s=budget.latency_budget_s, fp32_onnx=m.dense_file())
    final = sweep["final"]["exclude"] if sweep.get("final") else sweep["exclude"]
    why = {k: v["why"] for k, v in sweep["layers"].items()}
    return config.model_copy(update={"exclude": tuple(final)}), why


def finish_int8(model: nn.Module, config: Any, train: Any, val: Any, test: Any, threads: int,
                dense_acc: float) -> tuple[Any, dict[str, Any]]:
    """The chosen (fine-tuned) model quantized as the recipe's ``quantize`` stage does it, scored in ONNX Runtime.

    Returns:
        The :class:`~torchslim.quant.QuantizedModel` and the metrics of its int8 file
        (``val_accuracy``, ``val_drop``, ``test_accuracy``) beside the float model's
        (``fp32_val_accuracy``, ``fp32_test_accuracy`` in ONNX Runtime).
    """
    from torchslim.quant import quantize

    # No fp32_onnx and no example: the stage exports with the default exporter itself, and the
    # calibration subset comes from the same seeded draw over the training split.
    q = quantize(model, config, calib=train)
    val_acc = q.evaluate(val, threads=threads)["accuracy"]
    out = {"precision": "int8", "val_accuracy": val_acc, "val_drop": 100 * (dense_acc - val_acc),
           "fp32_val_accuracy": q.evaluate(val, precision="fp32", threads=threads)["accuracy"],
           "test_accuracy": q.evaluate(test, threads=threads)["accuracy"] if test is not None else None,
           "fp32_test_accuracy": (q.evaluate(test, precision="fp32", threads=threads)["accuracy"]
                                  if test is not None else None),
           "int8": q.describe(), "kept_float": list(config.exclude)}
    return q, out


def quantize_stage(config: Any, input_id: str, batch: int) -> dict[str, Any]:
    """The recipe's ``quantize`` stage that reproduces the chosen int8 file (``model.int8.onnx``).

    ``fallback_if_slower`` is off: the search already chose int8 by measuring it faster at
    the budget's batch, and the stage must write the file it chose.
    """
    method = {k: v for k, v in config.to_dict().items() if k not in ("type", "version")}
    return {"kind": "quantize", "id": "int8", "input": input_id, "label": "searched plan, static int8",
            "method": method, "latency_batch_sizes": sorted({1, batch}), "fallback_if_slower": False}
