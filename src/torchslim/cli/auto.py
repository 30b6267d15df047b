"""``torchslim auto``: a search from the command line, its resume, and its extra worker processes.

The settings of a search are written to ``RUN_DIR/auto.json`` before anything is measured, so

* ``torchslim auto --resume RUN_DIR`` continues it (stage one comes from the run folder's cache,
  finished trials from the study) and finishes it: choice, fine-tune, files;
* ``torchslim auto --resume RUN_DIR --worker`` only helps: it runs trials of that study until
  none is left to start, then exits (start as many as there are cores to spare, on this
  machine or, with ``--storage URL``, on others that can read the same data);
* ``--workers K`` starts K-1 such workers itself once the study exists, and waits for them.

``torchslim auto RECIPE`` (a ``.yaml`` file instead of a ``.slim`` one) runs the recipe first,
into ``RUN_DIR/base`` (once: a resume finds it there), and searches its final model on its data
section; the emitted recipe starts from that model (``dense.slim``) with the same data and seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from torchslim.errors import ConfigError

SETTINGS = "auto.json"
#: Options a resumed search may change: how many trials the study should have, and who runs them.
_RESUMABLE = ("trials", "workers")
_NOT_SAVED = ("func", "command", "resume", "worker")


def run_auto(args: argparse.Namespace) -> int:
    """Run, resume or help a search as ``args`` say (see the module docstring)."""
    args = _resolve(args)
    out = Path(args.out)
    worker = bool(getattr(args, "worker", False))
    kwargs = _search_kwargs(args)
    import torchslim.search as search

    if worker:
        print(f"worker joining the study of {out} ({args.trials} trials in all)", flush=True)
        n = search.search_worker(**{k: v for k, v in kwargs.items() if k in _WORKER_KEYS}, progress=_say)
        print(f"worker done: ran {n} trial(s)")
        return 0
    procs: list[subprocess.Popen] = []

    def start_workers() -> None:
        for i in range(1, args.workers):
            log = open(out / f"worker-{i}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
            procs.append(subprocess.Popen([sys.executable, "-m", "torchslim", "auto", "--resume", str(out),
                                           "--worker"], stdout=log, stderr=subprocess.STDOUT))
            log.close()  # the child holds its own descriptor
        if procs:
            print(f"started {len(procs)} worker process(es): logs in {out}/worker-*.log", flush=True)

    print(f"searching {args.model}: {kwargs['budget'].describe()}; results in {out}", flush=True)
    try:
        result = search.search(**kwargs, on_study_ready=start_workers if args.workers > 1 else None,
                               progress=_say)
    except KeyboardInterrupt:
        print(f"torchslim: interrupted; continue with 'torchslim auto --resume {out}'", file=sys.stderr)
        for p in procs:
            p.terminate()
        return 130
    finally:
        codes = [p.wait() for p in procs]
    if any(codes):
        print(f"warning: worker exit codes {codes} (see {out}/worker-*.log); the study holds every finished trial")
    print(result.summary())
    n_trials = sum(1 for p in result.points if p.source == "trial")
    print(f"{len(result.points)} points measured ({n_trials} by Optuna trials), {len(result.front)} on the front, "
          f"in {result.seconds:.0f}s; reproduce with: torchslim run {out / 'recipe.yaml'}")
    return 0


_PRECISION = {"fp32": ["fp32"], "int8": ["int8"], "both": ["fp32", "int8"]}
_WORKER_KEYS = ("model", "train", "val", "budget", "space", "trials", "out", "study", "seed",
                "trial_finetune", "trial_samples", "store")


def _say(line: str) -> None:
    print(line, flush=True)


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """The search's settings: from the command line (saved to RUN_DIR/auto.json) or, resuming, from that file."""
    if args.resume:
        folder = Path(args.resume)
        path = folder / SETTINGS
        if not path.is_file():
            raise ConfigError(f"{folder} is not a torchslim auto run folder (no {SETTINGS}): give the folder "
                              "a search wrote (its --out)")
        saved = json.loads(path.read_text(encoding="utf-8"))
        given = [k for k in ("model", "data", "max_drop", "latency", "size", "macs", "out", "store")
                 if getattr(args, k, None)]
        if given:
            names = ", ".join(k.upper() if k == "model" else "--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"--resume continues the search with the settings in {path}; only --trials and "
                              f"--workers may change (drop {names})")
        changed = {k: getattr(args, k) for k in _RESUMABLE if getattr(args, k) is not None}
        saved.update(changed)
        _check_counts(saved["trials"], saved["workers"])
        if changed and not args.worker:  # later workers (--resume RUN_DIR --worker) read the new total
            path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        resolved = argparse.Namespace(**saved)
        resolved.out, resolved.worker = str(folder), args.worker
        return resolved
    if args.worker:
        raise ConfigError("--worker joins a running search: give --resume RUN_DIR (the search's folder)")
    from_recipe = args.model is not None and is_recipe(args.model)
    if from_recipe and args.data is not None:
        raise ConfigError(f"{args.model} is a recipe: its data section gives the data; drop --data")
    missing = [name for name, v in (("MODEL", args.model), ("--data", args.data or from_recipe)) if not v]
    if all(getattr(args, k) is None for k in ("max_drop", "latency", "size", "macs")):
        missing.append("a budget (--max-drop, --latency, --size or --macs)")
    if missing:
        raise ConfigError(f"torchslim auto needs {', '.join(missing)} (or --resume RUN_DIR to continue a search)")
    args.trials = args.trials or 0
    args.workers = args.workers or 1
    _check_counts(args.trials, args.workers)
    out = Path(args.out) if args.out else Path("runs") / f"auto-{time.strftime('%Y%m%d-%H%M%S')}"
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in vars(args).items() if k not in _NOT_SAVED}
    (out / SETTINGS).write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    return args


def is_recipe(path: str) -> bool:
    """Whether ``torchslim auto``'s MODEL argument names a recipe (YAML) rather than a ``.slim`` file."""
    return Path(path).suffix.lower() in (".yaml", ".yml")


def recipe_model(path: Path, out: Path) -> tuple[Path, object]:
    """``torchslim auto RECIPE``: run the recipe into ``out/base`` once; its final model and the recipe.

    The recipe's final model (``model.slim``, written by its ``export`` stage; else the model of
    its last stage that made one) is the search's dense model, and its data section the search's
    data. A second call (``--resume``) finds the run finished and reads it; an interrupted one is
    resumed (finished stages are loaded from its store).
    """
    from torchslim.pipeline import load_recipe, resume_run, run_recipe

    recipe = load_recipe(path)  # a bad recipe fails here, before anything runs
    base = out / "base"
    final = _final_model(base, recipe)
    if final is None:
        print(f"running {path} into {base} (its final model is the dense model of the search)", flush=True)
        if (base / "recipe.yaml").is_file():
            resume_run(base, progress=False)
        else:
            run_recipe(recipe, out=base, progress=False)
        final = _final_model(base, recipe)
    if final is None:
        raise ConfigError(f"{path} produced no model file in {base}: give it an export stage (- kind: export)")
    return final, recipe


def _final_model(base: Path, recipe) -> Path | None:
    if (base / "model.slim").is_file() and (base / "summary.json").is_file():
        return base / "model.slim"
    if not (base / "summary.json").is_file():
        return None  # not run, or not finished
    made = [base / "models" / f"{s.id}.slim" for s in recipe.stages if s.id]
    made = [p for p in made if p.is_file()]
    return made[-1] if made else None


def _check_counts(trials: int, workers: int) -> None:
    if trials < 0 or workers < 1:
        raise ConfigError(f"--trials must be >= 0 and --workers >= 1, got {trials} and {workers}")
    if workers > 1 and trials == 0:
        raise ConfigError("--workers K shares Optuna trials between processes: give --trials N (N > 0)")


def _search_kwargs(args: argparse.Namespace) -> dict:
    import torch

    import torchslim.search as search
    from torchslim.data import load_dataset
    from torchslim.export import load
    from torchslim.train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    given = {"max_drop": args.max_drop, "latency": args.latency, "size_bytes": args.size, "macs": args.macs}
    budget = search.Budget(**{k: v for k, v in given.items() if v is not None}, batch=args.batch,
                           runtime=args.runtime, threads=args.threads or 1, latency_budget_s=args.latency_budget)
    # getattr: an auto.json written before the precision axis existed has no "precision" (fp32 then)
    precision = getattr(args, "precision", "fp32")
    space = search.SearchSpace(keep=args.keep, round_to=args.round_to, max_candidates=args.max_candidates,
                               exclude=args.exclude,
                               precision=None if precision is None else _PRECISION[precision],
                               int8_layers=getattr(args, "int8_layers", "all"),
                               # getattr: an auto.json from before the packed axes has none (the defaults then)
                               sparsity=getattr(args, "sparsity", None), share_bits=getattr(args, "share_bits", None),
                               packed_bases=getattr(args, "packed_bases", 2))
    if is_recipe(args.model):
        weights, recipe = recipe_model(Path(args.model), Path(args.out))
        model = load(weights, factory=args.factory).cpu().eval()
        d = recipe.data
        data = d.model_dump(exclude_none=True, exclude={"download"})
        splits = load_dataset(d.dataset, root=d.root, val_size=d.validation(), train_limit=d.train_limit,
                              test_limit=d.test_limit, seed=recipe.seed, download=d.download)
        args.seed = recipe.seed  # the emitted recipe must draw the same splits
    else:
        model = load(args.model, factory=args.factory).cpu().eval()
        val = {"val_size": args.val_size} if args.val_size else {"val_fraction": 0.1}
        data = {"dataset": args.data, **val, **({"root": args.root} if args.root else {}),
                **({"train_limit": args.train_limit} if args.train_limit else {}),
                **({"test_limit": args.test_limit} if args.test_limit else {})}
        splits = load_dataset(args.data, root=args.root, val_size=args.val_size or 0.1,
                              train_limit=args.train_limit, test_limit=args.test_limit, seed=args.seed)
    finetune = TrainConfig(epochs=args.finetune_epochs) if args.finetune_epochs else None
    trial_ft = TrainConfig(epochs=args.trial_epochs) if args.trial_epochs else None
    study = search.StudyConfig(storage=args.storage, **({"study_name": args.study_name} if args.study_name else {}))
    return {"model": model, "train": splits.train, "val": splits.val, "budget": budget, "space": space,
            "finetune": finetune, "test": splits.test, "out": Path(args.out), "recipe_data": data,
            "seed": args.seed, "trials": args.trials, "study": study, "trial_finetune": trial_ft,
            "trial_samples": args.trial_samples, "store": getattr(args, "store", None),  # getattr: an older auto.json
            # getattr: an auto.json written before finalists existed
            "finalists": getattr(args, "finalists", 3) if finetune is not None else 0}
