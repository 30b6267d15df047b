"""Int8 post-training quantization: torchslim.quant vs. ONNX Runtime's own quantize_static defaults.

For each model (``lenet300_100``, ``lenet5``, ``fmnist_student`` trained briefly
here; the shipped trained ``fmnist_teacher`` from
``recipes/weights/fmnist_teacher.slim``), on Fashion-MNIST:

* the fp32 ONNX file: :func:`torchslim.export.export_onnx` (BatchNorm folded,
  parity with PyTorch checked);
* torchslim: :func:`torchslim.quant.quantize` with ``Int8Config()`` (static QDQ,
  min-max, per tensor, U8S8, ``reduce_range`` from the CPU's instruction set,
  after ORT's ``quant_pre_process``), and the same with ``per_channel=True``;
* peer: ``onnxruntime.quantization.quantize_static`` with its defaults
  (QDQ, S8S8, min-max, per tensor, no pre-processing) on the same fp32 ONNX
  file with the same calibration inputs: what a user gets from ONNX Runtime alone.

Beside them, for the models in ``--qat-models`` (default ``fmnist_student``) and
``--precision-models`` (default: every model):

* ``qat_kd``: :func:`torchslim.quant.qat.qat`, quantization-aware training with the
  float model as teacher (Hinton KD), ``--qat-epochs`` epochs (1 in quick mode) at
  Adam 2e-4; its int8 file carries the learned scales, and its top-1 agreement
  with the fake-quant torch model and largest logit difference are reported;
* ``torchslim_per_layer``: :func:`torchslim.quant.precision.int8_layer_sweep` on the
  validation split (each layer kept float in turn, measured in ONNX Runtime, every
  file quantized from the one fp32 export), the layers it keeps float excluded; a
  float layer ending in ``Relu -> MaxPool`` pools before its ReLU in the int8 file
  (:func:`torchslim.quant.int8.pool_before_relu`).

Every int8 file is evaluated by running it in ONNX Runtime (accuracy on the test
split), sized on disk, and timed in ONNX Runtime at batch 1 and 256 with the same
pinned threads, all files of a model and its torch eager form timed run by run in
alternation (:func:`torchslim.measure.compare_ort_latency` with ``torch_models``).

Output: JSON lines on stdout (``config``, one ``result`` per model and method,
``summary`` with the issue's targets). Run from the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/quantization.py            # a few minutes
    PYTHONPATH=src .venv/bin/python benchmarks/quantization.py --quick    # about a minute

Without Fashion-MNIST, sklearn's digits (8x8) is used, without the shipped
teacher (it is trained for 28x28), and the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import torchslim as ts
from torchslim.data import load_dataset
from torchslim.errors import DataError
from torchslim.measure import compare_ort_latency, ort_accuracy
from torchslim.quant import Int8Config, cpu_int8_profile, quantize
from torchslim.quant.precision import int8_layer_sweep
from torchslim.quant.qat import QATConfig, qat, qat_agreement

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "recipes" / "weights" / "fmnist_teacher.slim"
MODELS = ("lenet300_100", "lenet5", "fmnist_student", "fmnist_teacher")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def ort_default_int8(fp32: Path, out: Path, calib: torch.Tensor, batch_size: int = 64) -> None:
    """The peer: ``quantize_static`` with every option at its default, on the same fp32 file and inputs."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([calib[i:i + batch_size].numpy() for i in range(0, len(calib), batch_size)])

        def get_next(self) -> dict | None:
            batch = next(self.it, None)
            return None if batch is None else {"input": batch}

    quantize_static(os.fspath(fp32), os.fspath(out), Reader())


def get_model(name: str, splits: Any, epochs: int, seed: int) -> tuple[torch.nn.Module, str]:
    if name == "fmnist_teacher" and splits.input_shape[-1] == 28 and TEACHER.is_file():
        return ts.load(TEACHER).eval(), f"shipped weights {TEACHER.relative_to(ROOT)}"
    torch.manual_seed(seed)
    model = ts.models.create(name, input_size=splits.input_shape[-1], num_classes=splits.num_classes)
    ts.fit(model, splits.train, ts.TrainConfig(epochs=epochs, lr=0.001, batch_size=128, optimizer="adam",
                                               schedule="cosine"), seed=seed, progress=False)
    return model.eval(), f"trained here: {epochs} epoch(s) on {len(splits.train.y)} samples"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, epochs and timed runs")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--calibration-samples", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=None, help="seconds of timed runs per measurement")
    parser.add_argument("--qat-models", nargs="*", default=["fmnist_student"], choices=MODELS)
    parser.add_argument("--qat-epochs", type=int, default=None, help="QAT+KD epochs (default 1 quick, 3 full)")
    parser.add_argument("--precision-models", nargs="*", default=list(MODELS), choices=MODELS,
                        help="models given the per-layer precision sweep (default: every model)")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="test samples evaluated (default 2000 quick, all otherwise; 0: all)")
    args = parser.parse_args(argv)
    quick = args.quick
    train_limit, test_limit, epochs = (6000, 2000, 1) if quick else (None, None, 3)
    if args.test_limit is not None:
        test_limit = args.test_limit or None
    calib_n = args.calibration_samples or (256 if quick else 512)
    budget = args.budget_s or (0.3 if quick else 1.0)
    torch.set_num_threads(args.threads)
    try:
        splits = load_dataset("fashion-mnist", val_size=5000, train_limit=train_limit, test_limit=test_limit,
                              download=False)
    except DataError as exc:
        print(f"# Fashion-MNIST not found ({exc}); using digits", file=sys.stderr)
        splits = load_dataset("digits", val_size=0.1)
    emit({"config": {"dataset": splits.name, "train": len(splits.train.y), "test": len(splits.test.y),
                     "epochs": epochs, "calibration_samples": calib_n, "threads": args.threads,
                     "budget_s": budget, "quick": quick, "cpu": cpu_int8_profile(),
                     "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                     "python": platform.python_version(), "load_avg": os.getloadavg()}})
    summary: dict[str, Any] = {}
    test = splits.test
    for name in args.models:
        if name == "fmnist_teacher" and splits.input_shape[-1] != 28:
            continue
        started = time.perf_counter()
        model, origin = get_model(name, splits, epochs, seed=0)
        torch_acc = ts.evaluate(model, test, device=torch.device("cpu"))["accuracy"]
        with tempfile.TemporaryDirectory() as tmp:
            norm = {"mean": list(splits.mean), "std": list(splits.std)}
            q = quantize(model, Int8Config(calibration_samples=calib_n), calib=splits.train, example=test.x[:8],
                         normalization=norm)
            qc = quantize(model, Int8Config(calibration_samples=calib_n, per_channel=True), calib=splits.train,
                          example=test.x[:8], normalization=norm)
            fp32 = q.export_onnx(Path(tmp) / "fp32.onnx", precision="fp32")
            peer = Path(tmp) / "ort_default.int8.onnx"
            # The same calibration inputs torchslim used (its seeded subset of the training split).
            gen = torch.Generator().manual_seed(0)
            calib = splits.train.x[torch.randperm(len(splits.train.x), generator=gen)[:calib_n]].float()
            ort_default_int8(fp32, peer, calib)
            files = {"fp32": fp32.read_bytes(), "torchslim": q.int8_onnx, "torchslim_per_channel": qc.int8_onnx,
                     "ort_defaults": peer.read_bytes()}
        extra: dict[str, Any] = {}
        if name in args.precision_models:
            t0 = time.perf_counter()
            sweep = int8_layer_sweep(model, Int8Config(calibration_samples=calib_n), splits.train, splits.val,
                                     batch_sizes=(1, 256), max_samples=1000 if quick else 2000, threads=args.threads,
                                     budget_s=budget, example=test.x[:8], normalization=norm,
                                     fp32_onnx=q.fp32_onnx)
            files["torchslim_per_layer"] = sweep["quantized"].int8_onnx
            chosen = sweep["final"]["exclude"]
            every = set(chosen) >= set(sweep["quantized"].layers)
            extra["torchslim_per_layer"] = {
                "kept_float": chosen, "rule_kept_float": sweep["exclude"], "fallback": sweep["final"]["fallback"],
                "all_layers_float": every, "sweep_seconds": time.perf_counter() - t0,
                "why": {n: v["why"] for n, v in sweep["layers"].items()},
                "sweep": {"all_int8_ms": sweep["all_int8"]["latency_ms"], "fp32_ms": sweep["fp32"]["latency_ms"],
                          "layer_float_ms": {n: v["latency_ms"] for n, v in sweep["layers"].items()}}}
        if name in args.qat_models:
            t0 = time.perf_counter()
            qat_epochs = args.qat_epochs or (1 if quick else 3)
            qq = qat(model, splits.train, QATConfig(calibration_samples=calib_n),
                     ts.TrainConfig(epochs=qat_epochs, lr=2e-4, batch_size=128, optimizer="adam", schedule="cosine"),
                     example=test.x[:8], normalization=norm)
            files["qat_kd"] = qq.int8_onnx
            agree = qat_agreement(qq, test, threads=args.threads)
            extra["qat_kd"] = {"epochs": qat_epochs, "train_seconds": time.perf_counter() - t0,
                               "agreement_with_fake_quant": agree["agreement"],
                               "max_logit_diff": agree["max_logit_diff"], "mean_logit_diff": agree["mean_logit_diff"],
                               "fake_quant_torch_accuracy": agree["torch_accuracy"]}
        acc = {k: ort_accuracy(v, test.x, test.y, threads=args.threads) for k, v in files.items()}
        lat: dict[str, dict[str, float]] = {k: {} for k in files}
        for b in (1, 256):
            # torch eager in the same rotation as the ONNX files, so its ratios are alternated too.
            timed = compare_ort_latency(files, test.x[:1], b, threads=args.threads, budget_s=budget,
                                        torch_models={"torch_eager": model})
            for k in files:
                lat[k][str(b)] = timed[k]["median_ms"]
            lat.setdefault("torch_eager", {})[str(b)] = timed["torch_eager"]["median_ms"]
        for method in files:
            rec = {"result": {"model": name, "origin": origin, "method": method, "runtime": "onnxruntime",
                              "accuracy": acc[method], "drop_points": 100 * (acc["fp32"] - acc[method]),
                              "bytes": len(files[method]), "size_ratio": len(files["fp32"]) / len(files[method]),
                              "latency_ms": lat[method],
                              "speedup_vs_ort_fp32": {b: lat["fp32"][b] / lat[method][b] for b in lat[method]},
                              "speedup_vs_torch": {b: lat["torch_eager"][b] / lat[method][b] for b in lat[method]}}}
            rec["result"].update(extra.get(method, {}))
            if method in ("torchslim", "torchslim_per_channel"):
                rec["result"]["settings"] = {k: v for k, v in (q if method == "torchslim" else qc).describe().items()
                                             if k in ("scheme", "reduce_range", "per_channel", "calibration", "isa")}
            emit(rec)
        emit({"result": {"model": name, "method": "torch_eager", "runtime": "torch", "accuracy": torch_acc,
                         "latency_ms": lat["torch_eager"]}})
        summary[name] = {"drop_points": 100 * (acc["fp32"] - acc["torchslim"]),
                         "size_ratio": len(files["fp32"]) / len(files["torchslim"]),
                         "speedup_b256": lat["fp32"]["256"] / lat["torchslim"]["256"],
                         "ort_defaults_speedup_b256": lat["fp32"]["256"] / lat["ort_defaults"]["256"],
                         "seconds": time.perf_counter() - started}
        for method in ("qat_kd", "torchslim_per_layer"):
            if method in files:
                summary[name][f"{method}_drop_points"] = 100 * (acc["fp32"] - acc[method])
                summary[name][f"{method}_slower_at"] = [b for b in lat[method] if lat[method][b] > lat["fp32"][b]]
                if extra.get(method, {}).get("all_layers_float"):
                    # Every layer stayed float: what the quantize stage ships is the fp32 file itself.
                    summary[name][f"{method}_ships"] = "fp32 (every layer kept float)"
                    summary[name][f"{method}_slower_at"] = []
                summary[name][f"{method}_speedup"] = {b: lat["fp32"][b] / lat[method][b] for b in lat[method]}
    targets = {
        "drop <= 0.3 points on every model": all(s["drop_points"] <= 0.3 for s in summary.values()),
        "int8 >= 3.5x smaller than fp32 ONNX": all(s["size_ratio"] >= 3.5 for s in summary.values()),
        "teacher int8 >= 1.6x faster than fp32 at b=256": summary.get("fmnist_teacher", {}).get("speedup_b256", 0)
        >= 1.6,
        "QAT+KD <= 0.1 points below float": all(s["qat_kd_drop_points"] <= 0.1 for s in summary.values()
                                                if "qat_kd_drop_points" in s),
        "per-layer precision: no int8 file slower than fp32 at b=1 or 256": all(
            not s["torchslim_per_layer_slower_at"] for s in summary.values() if "torchslim_per_layer_slower_at" in s),
    }
    # The machine is shared: the load it ran under goes with the figures (ratios come from alternated runs).
    emit({"summary": {"models": summary, "targets": targets, "pass": all(targets.values()),
                      "load_avg_end": os.getloadavg()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
