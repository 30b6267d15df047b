"""Recipes, the stage runner, run folders and reports."""

from torchslim.pipeline.recipe import Recipe, apply_overrides, load_recipe, parse_recipe, recipe_to_yaml
from torchslim.pipeline.runner import MODEL_ROWS, Runner, recipe_sensitivity, resume_run, run_recipe
from torchslim.pipeline.rundir import RunDir

__all__ = ["MODEL_ROWS", "Recipe", "RunDir", "Runner", "apply_overrides", "load_recipe", "parse_recipe",
           "recipe_sensitivity", "recipe_to_yaml", "resume_run", "run_recipe"]
