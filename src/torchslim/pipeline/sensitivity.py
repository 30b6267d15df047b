"""``torchslim sensitivity``: the per-layer sensitivity of the model a recipe's prune stage starts from."""

from __future__ import annotations

from pathlib import Path

from torchslim.pipeline.api import _create_run, _session
from torchslim.pipeline.recipe import Recipe, factories, load_recipe
from torchslim.pipeline.rundir import RunDir
from torchslim.pipeline.stages.prune import write_sensitivity
from torchslim.prune import SensitivityConfig, SensitivityResult, UnstructuredPruning, sensitivity_analysis
from torchslim.train.distributed import init_distributed


def recipe_sensitivity(recipe: Recipe | str | Path | None, out: str | Path | None = None, *,
                       run_dir: str | Path | None = None, overrides: list[str] | None = None,
                       sparsities: list[float] | None = None, max_samples: int | None = None,
                       progress: bool | None = None, trusted_factories: list[str] | None = None
                       ) -> tuple[SensitivityResult, Path]:
    """Sensitivity analysis of the model a recipe's first ``prune`` stage would start from.

    The stages before it run (or are loaded from the store of ``run_dir``, a run
    folder of this recipe); then each prunable layer is pruned alone at every
    sparsity and the validation accuracy measured, with the prune stage's criterion
    and layer selection. Writes ``sensitivity_sweep.json``, ``sensitivity_sweep.md``
    and ``plots/sensitivity_sweep.png`` into the run folder (never a run's own
    ``sensitivity.*``).

    Returns:
        The :class:`~torchslim.prune.SensitivityResult` and the run folder.

    Example:
        >>> result, folder = ts.pipeline.recipe_sensitivity("recipes/fashion_mnist.yaml")  # doctest: +SKIP
        >>> result.layer_sparsities(0.9)  # doctest: +SKIP
    """
    # Check the sweep before any stage runs (they can take a while).
    sweep = SensitivityConfig(**{k: v for k, v in {"sparsities": sparsities, "max_samples": max_samples}.items()
                                 if v is not None})
    if run_dir is not None:
        run = RunDir.open_existing(run_dir)
        recipe = load_recipe(run.recipe_path)
        trusted = set(trusted_factories or [])
        store = run.store_path()
    else:
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
        trusted, store = factories(recipe), None
    dist, device = init_distributed(recipe.device)
    if run_dir is None:
        run = _create_run(recipe, out, dist)
    prune = next((s for s in recipe.stages if s.kind == "prune"), None)
    with _session(recipe, run, dist, device, store, progress, trusted) as runner:
        planned = runner.plan(until=prune.id if prune is not None else None)
        for stage, key in planned:
            runner.run_stage(stage, key)
        subject = runner.ctx.get(prune.input if prune is not None else planned[-1][0].id if planned
                                 else next(iter(recipe.models))).model
        base = prune.method if prune is not None else UnstructuredPruning()
        if base.target != "sparsity":
            base = base.model_copy(update={"sparsity": 0.5, "threshold": None, "han_quality": None, "n_m": None})
        own = prune.sensitivity if prune is not None and prune.sensitivity is not None else None
        sweep = sweep.model_copy(update={
            "sparsities": sparsities or (own.sparsities if own else sweep.sparsities),
            "max_samples": max_samples if max_samples is not None else (own.max_samples if own else 2000),
            "pruning": base.model_copy(update={"overrides": {k: v for k, v in base.overrides.items() if v is None}})})
        ctx = runner.ctx
        result = sensitivity_analysis(subject, ctx.splits.val, sweep,
                                      data=ctx.splits.train if base.needs_data else None, device=ctx.device)
        if dist.is_main:
            write_sensitivity(result, run.root, "sensitivity_sweep")
            (run.root / "sensitivity_sweep.png").replace(run.plot("sensitivity_sweep.png"))
    return result, run.root
