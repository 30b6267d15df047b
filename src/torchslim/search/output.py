"""What a search leaves in its run folder: ``pareto.json``/``.png``, the chosen model's files and its recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

from torchslim.search.finalists import recovery_finetune
from torchslim.search.front import Point, plot_front, size_front, write_json
from torchslim.search.packed import parse_code, pruning_config, share_finetune, sharing_config
from torchslim.search.recipe import _model_ref, recipe_document
from torchslim.search.space import GroupChoice, dense_plan, plan_config


def ylabel(payload: dict[str, Any]) -> str:
    """The front plot's y label: how the points' accuracy was measured."""
    return f"validation accuracy, {payload['accuracy_measured']} (%)"


def plot_search(path: Path, points: list[Point], front: list[Point], chosen: Point | None, budget: Any,
                payload: dict[str, Any]) -> None:
    """``pareto.png``: accuracy against latency, or against bytes under a size bound."""
    if budget.size_bytes is not None:
        plot_front(path, points, size_front(points), chosen, budget.describe(), ylabel(payload), x="bytes")
    else:
        plot_front(path, points, front, chosen, budget.describe(), ylabel(payload))


def chosen_recipe(model: nn.Module, chosen: Point, groups: list[GroupChoice], space: Any, budget: Any, finetune: Any,
                  kd: Any, seed: int, recipe_data: dict[str, Any], recipe_model: Any, quantized: Any) -> dict[str, Any]:
    """The v2 recipe that rebuilds the chosen point from the dense model, as the search finished it."""
    packed = None
    finetune = recovery_finetune(finetune)  # as the search's fine-tunes trained it, every field written
    if chosen.precision == "packed":
        codes = {layer: parse_code(c) for layer, c in chosen.extra["packed"].items()}
        tuned = finetune is not None and finetune.epochs > 0
        packed = {"prune": pruning_config(codes), "share": sharing_config(codes),
                  "share_train": share_finetune(finetune) if tuned else None}
    # A packed point on the dense model has no channel stage: its layer names are the dense model's.
    cut = chosen.precision != "packed" or chosen.plan != dense_plan(groups)
    return recipe_document(recipe_model or _model_ref(model, "dense.slim"), recipe_data,
                           plan_config(groups, chosen.plan, space) if cut else None, finetune, seed=seed, kd=kd,
                           quantize=quantized.config if quantized is not None else None, batch=budget.batch,
                           packed=packed)


def write_outputs(folder: Path, m: Any, model: nn.Module, best: nn.Module, chosen: Point, points: list[Point],
                  front: list[Point], payload: dict[str, Any], metrics: dict[str, Any], budget: Any, space: Any,
                  finetune: Any, kd: Any, seed: int, recipe_data: Any, recipe_model: Any,
                  groups: list[GroupChoice], quantized: Any = None) -> dict[str, Any]:
    """Write the run folder's files; returns their paths (and, under ``_recipe``, the recipe document)."""
    from torchslim.atomic import atomic_path
    from torchslim.export import export_onnx, save

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "pareto.json", {**payload, "chosen": chosen.to_dict(), "final": metrics})
    plot_search(folder / "pareto.png", points, front, chosen, budget, payload)
    save(best, folder / "model.slim")
    files: dict[str, Any] = {k: str(folder / f) for k, f in (("pareto_json", "pareto.json"),
                             ("pareto_png", "pareto.png"), ("model", "model.slim"), ("onnx", "model.onnx"))}
    if quantized is not None:  # model.onnx is the file the search chose: the int8 one
        quantized.export_onnx(folder / "model.onnx")
        quantized.export_onnx(folder / "model.fp32.onnx", precision="fp32")
        files["fp32_onnx"] = str(folder / "model.fp32.onnx")
    else:
        export_onnx(best, m.example, folder / "model.onnx")
    if chosen.precision == "packed":  # the file the size bound counted
        from torchslim.quant.pack import pack

        pack(best, folder / "model.packed.slim", input_shape=list(m.example.shape[1:]))
        files["packed"] = str(folder / "model.packed.slim")
    if recipe_data is not None:
        save(model, folder / "dense.slim")
        doc = chosen_recipe(model, chosen, groups, space, budget, finetune, kd, seed, recipe_data, recipe_model,
                            quantized)
        plan = ", ".join(f"{label} {keep}" for label, keep in chosen.plan.items())
        layers = (f"\n# Per layer, sparsity / weight-sharing bits: "
                  + ", ".join(f"{k} {v}" for k, v in chosen.extra["packed"].items())) if chosen.precision == "packed" \
            else ""
        text = (f"# Found by torchslim auto ({budget.describe()}).\n# Plan, kept channels per group (named by the "
                f"layer writing them): {plan}; precision {chosen.precision}.{layers}\n# Overrides name a layer found "
                "in that group only.\n"
                f"# Reproduce with: torchslim run {folder / 'recipe.yaml'}\n") + yaml.safe_dump(doc, sort_keys=False)
        with atomic_path(folder / "recipe.yaml") as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        files["recipe"] = str(folder / "recipe.yaml")
        files["_recipe"] = doc
    return files
