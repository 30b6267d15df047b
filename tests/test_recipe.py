from pathlib import Path

import pytest
import yaml

from torchslim.config import Config, config_from_dict, registered_config_types
from torchslim.errors import ConfigError
from torchslim.pipeline import apply_overrides, load_recipe, parse_recipe, recipe_to_yaml

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"student": {"model": {"preset": "lenet5"}}}  # a version-1 recipe (migrated when read)
V2 = {"version": 2, "models": {"student": {"preset": "lenet5"}}}


def _instance(cls: type[Config]) -> Config:
    """A valid instance of each config type, for the round-trip test."""
    required = {
        "MagnitudePruning": {"sparsity": 0.5},
        "ModelRef": {"preset": "lenet5"},
        "TeacherSectionV1": {"model": {"preset": "lenet5", "weights": "w.slim"}},
        "StudentSectionV1": {"model": {"preset": "lenet5"}},
        "DistillSectionV1": {"train": {"epochs": 2}},
        "FinetuneSectionV1": {"train": {"epochs": 1}},
        "StructuredPruneSectionV1": {"structured": True, "target_macs": 0.5},
        "RecipeV1": MINIMAL,
        "Recipe": {**V2, "stages": [{"kind": "train", "train": {"epochs": 1}}]},
        "TrainStage": {"train": {"epochs": 1}},
        "StageConfig": {"kind": "any"},
        "DistillStage": {"teacher": "teacher", "train": {"epochs": 2}},
        "FinetuneStage": {"train": {"epochs": 1}},
        "AGPSchedule": {"final_sparsity": 0.9, "end_step": 100},
        "Budget": {"max_drop": 0.5},
    }
    return cls.model_validate(required.get(cls.__name__, {}))


@pytest.mark.parametrize("name", sorted(registered_config_types()))
def test_every_config_round_trips_through_its_dict(name):
    cfg = _instance(registered_config_types()[name])
    data = cfg.to_dict()
    assert data["type"] == name and data["version"] == type(cfg).version
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg


def test_config_types_resolve_only_against_torchslim():
    with pytest.raises(ConfigError, match="unknown config type"):
        config_from_dict({"type": "os.system", "command": "true"})


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert parse_recipe(yaml.safe_load(recipe_to_yaml(recipe))) == recipe


@pytest.mark.parametrize("doc,message", [
    ({**MINIMAL, "bogus": 1}, r"bogus: unknown key"),
    ({"student": {"model": {"preset": "lenet5", "wieghts": "x"}}}, r"student\.model\.wieghts: unknown key"),
    ({**MINIMAL, "seed": "zero"}, r"seed: Input should be a valid integer"),
    ({**MINIMAL, "prune": {"sparsity": 1.2}}, r"prune\.sparsity: Input should be less than 1"),
    ({**MINIMAL, "data": {"dataset": "imagenet"}}, r"data\.dataset: Input should be"),
    ({**MINIMAL, "distill": {"train": {"epochs": 1}}}, r"'distill' needs both"),
    ({**MINIMAL, "prune": {"sparsity": 0.5}, "finetune": {"train": {"epochs": -1}}}, r"finetune\.train\.epochs"),
    ({"student": {"model": {"preset": "a", "factory": "b:c"}}}, r"exactly one of 'preset' and 'factory'"),
    ([1, 2], r"must be a YAML mapping"),
])
def test_recipe_errors_name_the_key(doc, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(doc)


def test_overrides_set_nested_values_and_are_validated():
    doc = apply_overrides(MINIMAL, ["prune.sparsity=0.8", "seed=3", "student.baseline.epochs=2"])
    recipe = parse_recipe(doc)  # a v1 document, overridden with v1 paths, then migrated
    stages = {s.id: s for s in recipe.stages}
    assert stages["pruned"].method.sparsity == 0.8 and recipe.seed == 3
    assert stages["student_alone"].train.epochs == 2
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(MINIMAL, ["seed"])
    with pytest.raises(ConfigError, match="prune.sprasity: unknown key"):
        parse_recipe(apply_overrides(MINIMAL, ["prune.sparsity=0.5", "prune.sprasity=0.5"]))


def test_relative_weights_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"teacher": {"model": {"preset": "lenet5", "weights": "w/t.slim"}}}))
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.models["teacher"].weights == str(tmp_path / "w" / "t.slim")


def test_unreadable_or_malformed_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def _yaml_blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]


@pytest.mark.parametrize("doc", ["README.md", "docs/recipes.md"])
def test_recipe_snippets_in_the_docs_are_valid(doc):
    blocks = _yaml_blocks(ROOT / doc)
    assert blocks, f"{doc} has no yaml blocks"
    for block in blocks:
        snippet = yaml.safe_load(block)
        if isinstance(snippet, list):  # a list of stages: run them on the usual two models
            snippet = {"version": 2, "models": {"teacher": {"preset": "fmnist_teacher", "weights": "t.slim"},
                                                "student": {"preset": "fmnist_student"}}, "stages": snippet}
        parse_recipe(snippet, doc)


def test_docs_key_tables_are_the_generated_ones():
    from torchslim.pipeline.keytables import generated_block

    text = (ROOT / "docs/recipes.md").read_text(encoding="utf-8")
    assert generated_block() in text, "regenerate: python -m torchslim.pipeline.keytables (see docs/recipes.md)"
