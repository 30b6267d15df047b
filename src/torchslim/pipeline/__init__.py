"""Recipes, stages, the run context and store, the runner, run folders and reports.

A recipe (version 2) is data, named models and an ordered list of stages; each
stage kind is one file in :mod:`torchslim.pipeline.stages`. The runner plans
every stage (checks before anything trains), then runs them in order, storing
each output under a content key so that unchanged stages are never run twice.
"""

from torchslim.pipeline.api import make_context, resume_run, run_recipe
from torchslim.pipeline.recipe import Recipe, apply_overrides, load_recipe, parse_recipe, recipe_to_yaml
from torchslim.pipeline.rundir import RunDir
from torchslim.pipeline.runner import Runner
from torchslim.pipeline.sensitivity import recipe_sensitivity
from torchslim.pipeline.stages import STAGES, Stage, StageConfig, StageResult, register_stage
from torchslim.pipeline.store import Store

__all__ = ["Recipe", "RunDir", "Runner", "STAGES", "Stage", "StageConfig", "StageResult", "Store",
           "apply_overrides", "load_recipe", "make_context", "parse_recipe", "recipe_sensitivity",
           "recipe_to_yaml", "register_stage", "resume_run", "run_recipe"]
