"""The ``torchslim`` command: thin subcommands that parse, call the library and print."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from torchslim.errors import TorchSlimError, TrainingInterrupted


def shipped_recipe(name: str) -> Path:
    """Path of a recipe shipped with torchslim (inside the wheel, or in a source checkout)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "recipes" / name, here.parent.parent / "recipes" / name):
        if candidate.is_file():
            return candidate
    raise TorchSlimError(f"shipped recipe {name!r} not found next to the torchslim package")


def _print_report(run_dir: Path) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes and prints
        return
    print(f"run folder: {run_dir}")
    print((Path(run_dir) / "report.md").read_text(encoding="utf-8"))


def _cmd_run(args: argparse.Namespace) -> int:
    from torchslim.pipeline import resume_run, run_recipe

    if args.resume:
        if args.set or args.out:
            raise TorchSlimError("--resume continues a run in its own folder; give no --set or --out (to change "
                                 "stages, give the edited RECIPE: only the stages whose inputs changed run again)")
        run_dir = resume_run(args.resume, store=args.store, trusted_factories=args.factory, recipe=args.recipe)
    else:
        if not args.recipe:
            raise TorchSlimError("give a RECIPE file, or --resume RUN_DIR")
        run_dir = run_recipe(args.recipe, out=args.out, overrides=args.set, store=args.store)
    _print_report(run_dir)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from torchslim.pipeline import run_recipe

    recipe = shipped_recipe("fashion_mnist.yaml")
    print(f"running the shipped recipe {recipe}", file=sys.stderr)
    run_dir = run_recipe(recipe, out=args.out, overrides=args.set)
    _print_report(run_dir)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from torchslim.pipeline import load_recipe, recipe_to_yaml

    from torchslim.pipeline.recipe import check_importable

    recipe = load_recipe(args.recipe, args.set)
    check_importable(recipe)
    print(f"{args.recipe}: valid (version 2, stages: {' -> '.join(recipe.stage_ids())})")
    if args.show:
        print(recipe_to_yaml(recipe))
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from torchslim.pipeline import recipe_sensitivity

    if args.run and (args.recipe or args.set):
        raise TorchSlimError("--run analyses a run folder with its own recorded recipe; give no RECIPE or --set")
    if not args.run and not args.recipe:
        raise TorchSlimError("give a RECIPE file, or --run RUN_DIR")
    result, folder = recipe_sensitivity(args.recipe, out=args.out, run_dir=args.run, overrides=args.set,
                                        sparsities=args.sparsities, max_samples=args.max_samples,
                                        trusted_factories=args.factory)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"run folder: {folder}")
    print(result.table())
    print(f"\nwritten: {folder / 'sensitivity_sweep.md'}, {folder / 'sensitivity_sweep.json'}, "
          f"{folder / 'plots/sensitivity_sweep.png'}")
    if args.target is not None:
        allocation = result.layer_sparsities(args.target)
        print(f"\n# per-layer sparsities for {100 * args.target:g}% overall (robust layers pruned more); under "
              "'prune:' use them as\nscope: layer\noverrides:")
        for name, value in allocation.items():
            print(f"  {name}: {value:.4f}")
        print("# or let the recipe do this itself with 'prune: {sensitivity: {}}'")
    return 0


def _sparsity_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sparsities like 0.5,0.9, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a sparsity in [0, 1), got {text!r}")
    return value


MAX_PROFILE_BATCH = 65536


def _batch_size(text: str) -> int:
    """A ``--batch-sizes`` entry: profiling allocates a batch of this many inputs, so it is bounded
    (a typo like 100000000 would otherwise ask the allocator for tens of gigabytes)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PROFILE_BATCH:
        raise argparse.ArgumentTypeError(f"expected a batch size from 1 to {MAX_PROFILE_BATCH}, got {text!r}")
    return value


def _cmd_models(args: argparse.Namespace) -> int:
    import torchslim.models as models

    rows = []
    for info in models.list_presets():
        model = models.create(info.name)
        rows.append((info.name, sum(p.numel() for p in model.parameters()), info.description))
    width = max(len(r[0]) for r in rows)
    for name, params, description in rows:
        print(f"{name:<{width}}  {params:>10,} params  {description}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from torchslim.measure import profile_file

    print(profile_file(args.model, batch_sizes=tuple(args.batch_sizes), factory=args.factory))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from torchslim.data import load_dataset
    from torchslim.export import load
    from torchslim.measure import compare_ort_latency, measure_latency
    from torchslim.quant import Int8Config, quantize
    from torchslim.train import evaluate

    config = Int8Config(mode=args.mode, calibration=args.calibration, per_channel=args.per_channel,
                        exclude=tuple(args.exclude), calibration_samples=args.calibration_samples)
    model = load(args.model, factory=args.factory).cpu().eval()
    splits = load_dataset(args.data, root=args.root, val_size=0.1, test_limit=args.test_limit)
    out = Path(args.out) if args.out else Path(args.model).resolve().parent
    stem = Path(args.model).name.removesuffix(".slim")
    q = quantize(model, config, calib=splits.train, example=splits.test.x[:8],
                 normalization={"mean": list(splits.mean), "std": list(splits.std)})
    fp32_path = q.export_onnx(out / f"{stem}.fp32.onnx", precision="fp32")
    int8_path = q.export_onnx(out / f"{stem}.int8.onnx")
    d = q.describe()
    print(f"{int8_path} ({d['int8_bytes']:,} bytes; fp32 {fp32_path}: {d['fp32_bytes']:,} bytes, "
          f"{d['size_ratio']:.2f}x smaller)")
    print(f"{d['mode']} int8, {d['scheme']}{' reduce_range' if d['reduce_range'] else ''}: {d['why']}")
    if d["excluded"]:
        print("kept float: " + ", ".join(d["excluded"]))
    fp32 = q.evaluate(splits.test, precision="fp32")["accuracy"]
    int8 = q.evaluate(splits.test)["accuracy"]
    eager = evaluate(model, splits.test, device=torch.device("cpu"))["accuracy"]
    print(f"accuracy on {len(splits.test.y)} test samples: ONNX Runtime fp32 {100 * fp32:.2f}%, "
          f"int8 {100 * int8:.2f}% ({100 * (int8 - fp32):+.2f} points); torch {100 * eager:.2f}%")
    for b in [] if args.no_latency else args.batch_sizes:
        ort = compare_ort_latency({"fp32": q.fp32_onnx, "int8": q.int8_onnx}, splits.test.x[:1], b)
        torch_ms = measure_latency(model, splits.test.x[:1], b)["median_ms"]
        print(f"latency b={b}: ONNX Runtime fp32 {ort['fp32']['median_ms']:.3f} ms, int8 "
              f"{ort['int8']['median_ms']:.3f} ms ({ort['fp32']['median_ms'] / ort['int8']['median_ms']:.2f}x); "
              f"torch eager {torch_ms:.3f} ms ({torch.get_num_threads()} threads)")
    return 0


def _times(text: str) -> float:
    """``0.25x`` or ``0.25``: a fraction of the dense model's cost, in (0, 1]."""
    try:
        value = float(text.strip().lower().removesuffix("x"))
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction of the dense model like 0.25x, got {text!r}")
    return value


def _size(text: str) -> int:
    """``50KB``, ``1.5MB``, ``20000``: bytes (KB = 1000 bytes, KiB = 1024)."""
    units = {"kib": 1024, "mib": 1024 ** 2, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "b": 1}
    t = text.strip().lower()
    scale = next((v for k, v in units.items() if t.endswith(k)), 1)
    t = next((t[: -len(k)] for k in units if t.endswith(k)), t)
    try:
        value = int(float(t) * scale)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 50KB, got {text!r}")
    return value


def _numbers(text: str, convert: Any, ok: Any, expected: str, *, off: bool = False) -> list:
    """A comma-separated list of numbers that ``ok`` accepts (``none``: the empty list, when ``off``)."""
    if off and text.strip().lower() == "none":
        return []
    try:
        values = [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(ok(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated {expected}, got {text!r}")
    return values


def _keep_list(text: str) -> list[float]:
    return _numbers(text, float, lambda v: 0.0 < v <= 1.0, "kept fractions in (0, 1]")


def _fraction_list(text: str) -> list[float]:
    return _numbers(text, float, lambda v: 0.0 < v < 1.0, "sparsities in (0, 1), or none", off=True)


def _bits_list(text: str) -> list[int]:
    return _numbers(text, int, lambda v: 1 <= v <= 12, "bits in 1..12, or none", off=True)


def _cmd_auto(args: argparse.Namespace) -> int:
    from torchslim.cli.auto import run_auto

    return run_auto(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchslim", description="Make PyTorch models smaller and faster: "
                                     "knowledge distillation and pruning, measured and exported.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (or --resume an interrupted run)")
    run.add_argument("recipe", nargs="?", help="YAML recipe file")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe value")
    run.add_argument("--out", help="run folder (default runs/<name>-<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (with RECIPE: an edited "
                     "recipe, re-running exactly the stages whose inputs changed)")
    run.add_argument("--store", metavar="DIR", help="keep stage outputs here, shared by every run given the same "
                     "DIR (default RUN_DIR/store)")
    run.add_argument("--factory", action="append", default=[], metavar="MODULE:FUNCTION",
                     help="with --resume: trust this user model factory named by the run folder (imports its code)")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser("demo", help="the full pipeline on Fashion-MNIST (recipes/fashion_mnist.yaml)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe value")
    demo.add_argument("--out", help="run folder (default runs/fashion_mnist-<timestamp>)")
    demo.set_defaults(func=_cmd_demo)

    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    validate.add_argument("--show", action="store_true", help="print the resolved recipe (train sections as given)")
    validate.set_defaults(func=_cmd_validate)

    sens = sub.add_parser("sensitivity", help="prune each layer alone at a sweep of sparsities and measure accuracy")
    sens.add_argument("recipe", nargs="?", help="YAML recipe: its stages before 'prune' make the model analysed")
    sens.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe value")
    sens.add_argument("--out", help="run folder (default runs/<name>-<timestamp>)")
    sens.add_argument("--run", metavar="RUN_DIR", help="analyse in an existing run folder, reusing its finished stages")
    sens.add_argument("--sparsities", type=_sparsity_list, help="comma-separated sweep (default: the recipe's, "
                      "or 0.3,0.5,0.7,0.8,0.9,0.95,0.98)")
    sens.add_argument("--max-samples", type=int, help="validation samples per measurement")
    sens.add_argument("--target", type=_fraction, help="also print per-layer sparsities reaching this overall sparsity")
    sens.add_argument("--factory", action="append", default=[], metavar="MODULE:FUNCTION",
                      help="with --run: trust this user model factory named by the run folder (imports its code)")
    sens.set_defaults(func=_cmd_sensitivity)

    models = sub.add_parser("models", help="list the model presets")
    models.set_defaults(func=_cmd_models)

    prof = sub.add_parser("profile", help="params, nonzero, MACs, bytes and latency of a saved .slim model")
    prof.add_argument("model", help=".slim file")
    prof.add_argument("--batch-sizes", type=_batch_size, nargs="+", default=[1, 256],
                      help=f"batch sizes to time (each 1..{MAX_PROFILE_BATCH}; default 1 256)")
    prof.add_argument("--factory", help="trust the user model factory the file names (module:function)")
    prof.set_defaults(func=_cmd_profile)

    quant = sub.add_parser("quantize", help="int8 ONNX of a saved .slim model, evaluated and timed in ONNX Runtime")
    quant.add_argument("model", help=".slim file")
    quant.add_argument("--data", required=True, choices=["fashion-mnist", "mnist", "digits"],
                       help="calibration (training split) and evaluation (test split) data")
    quant.add_argument("--root", help="folder holding the dataset's IDX files")
    quant.add_argument("--out", help="folder for NAME.int8.onnx and NAME.fp32.onnx (default: beside MODEL)")
    quant.add_argument("--mode", choices=["static", "dynamic"], default="static",
                       help="dynamic: Linear-only models (default static, QDQ)")
    quant.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="minmax")
    quant.add_argument("--calibration-samples", type=int, default=512)
    quant.add_argument("--per-channel", action="store_true", help="one weight scale per output channel")
    quant.add_argument("--exclude", nargs="+", default=[], metavar="NAME",
                       help="layers kept float: torch names or re:REGEX")
    quant.add_argument("--batch-sizes", type=_batch_size, nargs="+", default=[1, 256])
    quant.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    quant.add_argument("--test-limit", type=int, help="evaluate on the first N test samples")
    quant.add_argument("--factory", help="trust the user model factory the file names (module:function)")
    quant.set_defaults(func=_cmd_quantize)

    auto = sub.add_parser("auto", help="search per-layer channel widths under a budget; the measured Pareto front "
                          "(or --resume RUN_DIR [--worker] to continue or help a search)")
    auto.add_argument("model", nargs="?", help=".slim file (the dense, trained model), or a recipe (.yaml): it runs "
                      "first, into RUN_DIR/base, and its final model and data section are the search's")
    auto.add_argument("--data", choices=["fashion-mnist", "mnist", "digits"])
    auto.add_argument("--root", help="folder holding the dataset's IDX files")
    goal = auto.add_mutually_exclusive_group()
    goal.add_argument("--max-drop", type=float, help="largest accuracy drop in points; latency minimised")
    goal.add_argument("--latency", type=_times, help="largest latency, as a fraction of the dense model's (0.25x)")
    goal.add_argument("--size", type=_size, help="largest file that ships (50KB, 1.5MB): the ONNX file (fp32 or "
                      "int8) or, with sparsity / weight sharing, the packed .slim")
    goal.add_argument("--macs", type=_times, help="largest MACs, as a fraction of the dense model's (0.3x)")
    auto.add_argument("--batch", type=_batch_size, default=256, help="batch size latency is measured at (256)")
    auto.add_argument("--runtime", choices=["ort", "torch"], default="ort", help="where latency is measured")
    auto.add_argument("--threads", type=int, help="threads of torch and of every timed run (default 1 when timing)")
    auto.add_argument("--keep", type=_keep_list, default=[1.0, 0.75, 0.5, 0.375, 0.25],
                      help="kept fractions per group (default 1,0.75,0.5,0.375,0.25)")
    auto.add_argument("--round-to", type=int, default=1, help="kept channel counts are multiples of this")
    auto.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="groups never cut (names or re:)")
    auto.add_argument("--max-candidates", type=int, default=12, help="plans of the sweep built and measured")
    auto.add_argument("--precision", choices=["fp32", "int8", "both"],
                      help="precision of the measured points: every plan also as a static int8 ONNX file "
                      "(int8: int8 points only, the dense fp32 model the reference; default both when "
                      "onnxruntime's quantization is installed and --runtime is ort, else fp32)")
    auto.add_argument("--int8-layers", choices=["all", "sweep"], default="all",
                      help="int8 points: every Conv/Linear int8 (all), or each layer of the dense model measured "
                      "first and kept float in every int8 point where int8 does not pay (sweep)")
    auto.add_argument("--sparsity", type=_fraction_list, help="with --size: per-layer sparsities to choose from "
                      "(default 0.5,0.75,0.9,0.95; 'none': off)")
    auto.add_argument("--share-bits", type=_bits_list, help="with --size: per-layer weight-sharing bits to choose "
                      "from (default 8,5,4,3 when --sparsity is not given either; 'none': off)")
    auto.add_argument("--packed-bases", type=int, default=2, help="with --size: channel plans the sparsity and bits "
                      "are searched on (the dense model and the latency front's middle; default 2)")
    auto.add_argument("--latency-budget", type=float, default=0.5, help="seconds of timing per measurement")
    auto.add_argument("--finetune-epochs", type=int, default=1, help="KD fine-tune of the chosen plan (0: none)")
    auto.add_argument("--finalists", type=int, default=3, help="front points given that fine-tune before the choice "
                      "(with --max-drop: a bisection by latency over the points faster than the proxy's choice; "
                      "with a bound: the most accurate feasible ones); 0: the front's proxy accuracy decides")
    auto.add_argument("--trials", type=int, help="Optuna trials refining the front, counted over the whole study "
                      "(default 0: the Lagrangian front alone; needs pip install 'torchslim[search]')")
    auto.add_argument("--trial-epochs", type=int, help="KD fine-tune epochs given to every candidate before it is "
                      "scored (default: 1 with --trials, else none: BatchNorm re-estimation only)")
    auto.add_argument("--trial-samples", type=int, help="training samples of each candidate's fine-tune "
                      "(default 2000 with --trials, else all)")
    auto.add_argument("--workers", type=int, help="processes sharing the trials (default 1; K-1 are started)")
    auto.add_argument("--storage", metavar="URL", help="Optuna storage of the study (default: the journal file "
                      "RUN_DIR/study.journal; e.g. sqlite:///study.db, or a database for workers on other machines)")
    auto.add_argument("--store", metavar="DIR", help="keep every trial and finalist fine-tune here, keyed by content: "
                      "searches of one model given the same DIR share them whatever their budgets (default RUN_DIR/store)")
    auto.add_argument("--study-name", help="the study's name in the storage (default torchslim-auto)")
    auto.add_argument("--resume", metavar="RUN_DIR", help="continue the search in RUN_DIR (its settings, finished "
                      "trials and cached tables); --trials and --workers may be raised")
    auto.add_argument("--worker", action="store_true", help="with --resume: only run trials of that search's "
                      "study until none is left, then exit (the search itself writes the results)")
    auto.add_argument("--val-size", type=int, help="validation samples (default 10%% of the training set)")
    auto.add_argument("--train-limit", type=int, help="keep only this many training samples")
    auto.add_argument("--test-limit", type=int, help="keep only this many test samples")
    auto.add_argument("--seed", type=int, default=0)
    auto.add_argument("--out", help="folder for pareto.json/png, model.slim/onnx, recipe.yaml, the study "
                      "(default runs/auto-*)")
    auto.add_argument("--factory", help="trust the user model factory the file names (module:function)")
    auto.set_defaults(func=_cmd_auto)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchslim`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyboardInterrupt, TrainingInterrupted) as exc:
        print(f"torchslim: {exc or 'interrupted'}; continue with 'torchslim run --resume RUN_DIR'", file=sys.stderr)
        return 130
    except TorchSlimError as exc:
        print(f"torchslim: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder that vanished: say so in one line
        print(f"torchslim: error: {exc}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
