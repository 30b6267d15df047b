"""Entry points: run a recipe, resume a run folder, analyse sensitivity from a recipe."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from torchslim import data as ts_data
from torchslim.errors import ConfigError
from torchslim.pipeline.context import RunContext, log
from torchslim.pipeline.recipe import Recipe, factories, load_recipe, recipe_to_yaml
from torchslim.pipeline.rundir import RunDir
from torchslim.pipeline.runner import Runner
from torchslim.pipeline.store import Store
from torchslim.train.distributed import barrier, broadcast_object, init_distributed, shutdown


def make_context(recipe: Recipe, run: RunDir, dist: Any, device: torch.device, *, store: str | Path | None = None,
                 progress: bool | None = None) -> RunContext:
    """Load the data and build the :class:`~torchslim.pipeline.context.RunContext` of a run."""
    if recipe.threads:
        torch.set_num_threads(recipe.threads)  # the recipe asks for it: the run is this process's whole job
    d = recipe.data
    splits = ts_data.load_dataset(d.dataset, root=d.root, val_size=d.validation(), train_limit=d.train_limit,
                                  test_limit=d.test_limit, seed=recipe.seed, download=d.download)
    log(f"data: {d.dataset}: {len(splits.train.y)} train, {len(splits.val.y)} val, {len(splits.test.y)} test "
        f"samples, input {tuple(splits.input_shape)}")
    logger = None
    if recipe.loggers and dist.is_main:  # per-step loss parts and epoch records (metrics.jsonl has the epochs)
        from torchslim.train.loggers import make_logger  # noqa: PLC0415 (optional packages)

        logger = make_logger(recipe.loggers, run.root / "logs", recipe.name)
    return RunContext(recipe, run, Store(store if store is not None else run.root / "store"), splits, device, dist,
                      progress=progress, logger=logger)


def _create_run(recipe: Recipe, out: str | Path | None, dist: Any) -> RunDir:
    """A new run folder holding the resolved recipe; under torchrun rank 0 creates it and tells the others."""
    created: str | ConfigError
    made = None
    try:
        made = RunDir.create(out, recipe.name) if dist.is_main else None
        created = str(made.root) if made is not None else ""
    except ConfigError as exc:
        created = exc
    created = broadcast_object(created, dist)
    if isinstance(created, ConfigError):
        raise created
    run = made if made is not None else RunDir(created)
    if dist.is_main:
        run.write_recipe(recipe_to_yaml(recipe))
    return run


@contextlib.contextmanager
def _session(recipe: Recipe, run: RunDir, dist: Any, device: torch.device, store: Any, progress: Any,
             trusted: set[str] | None) -> Iterator[Runner]:
    """The run folder locked for this process (a second process is refused), the runner, and clean-up."""
    lock = run.lock() if dist.is_main else contextlib.nullcontext()
    threads = torch.get_num_threads()  # the recipe's thread count is restored for a library caller
    try:
        with lock:
            ctx = make_context(recipe, run, dist, device, store=store, progress=progress)
            try:
                yield Runner(recipe, run, ctx, trusted)
            finally:
                if ctx.logger is not None:
                    ctx.logger.close()
        barrier(dist)  # finished: every rank leaves the group together (gloo aborts a rank left talking)
    finally:
        torch.set_num_threads(threads)
        shutdown(dist)


def run_recipe(recipe: Recipe | str | Path, out: str | Path | None = None, *, overrides: list[str] | None = None,
               store: str | Path | None = None, progress: bool | None = None) -> Path:
    """Run a recipe (object or YAML path) into a new run folder; returns the folder.

    Every stage is planned (checked against the model it will get) before the
    first one runs. ``store`` shares stage outputs between runs (default: the run
    folder's ``store/``).

    Example:
        >>> import torchslim as ts
        >>> run_dir = ts.run_recipe("recipes/fashion_mnist.yaml", out="runs/demo")  # doctest: +SKIP
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    dist, device = init_distributed(recipe.device)
    run = _create_run(recipe, out, dist)
    if store is not None and dist.is_main:
        run.write_store_path(Path(store))
    started: list[Runner] = []
    try:
        with _session(recipe, run, dist, device, store, progress, factories(recipe)) as runner:
            started.append(runner)
            runner.plan()
            runner.execute()
    except BaseException:
        if dist.is_main and not (started and started[0].started):
            run.discard()  # failed before any stage ran (a bad name, a missing file): a retry is not blocked
        raise
    return run.root


def resume_run(run_dir: str | Path, *, store: str | Path | None = None, progress: bool | None = None,
               trusted_factories: list[str] | None = None, recipe: Recipe | str | Path | None = None) -> Path:
    """Continue a run from its folder: stages whose stored outputs match are loaded, the rest run.

    The folder's ``recipe.yaml`` is used, or ``recipe`` when given (an edited recipe:
    exactly the stages whose inputs changed run again). User factories the folder
    names are imported only when listed in ``trusted_factories`` (a run folder may
    come from elsewhere).
    """
    run = RunDir.open_existing(run_dir)
    if recipe is None:
        recipe = load_recipe(run.recipe_path)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    dist, device = init_distributed(recipe.device)
    if dist.is_main:
        run.write_recipe(recipe_to_yaml(recipe))
    store = store if store is not None else run.store_path()
    with _session(recipe, run, dist, device, store, progress, set(trusted_factories or [])) as runner:
        runner.plan()
        runner.execute()
    return run.root
