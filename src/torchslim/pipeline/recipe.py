"""The recipe schema (version 2): data, named models and an ordered list of stages.

Each stage is tagged by its ``kind`` and holds the library's own config
objects unchanged (see :mod:`torchslim.pipeline.stages`). A stage reads the
model named by ``input`` (default: the previous stage's output) and may name
others (``teacher``); names are ``models`` entries or earlier stage ids. An
unknown key, a wrong type, an out-of-range value or a name that refers to
nothing is a :class:`~torchslim.errors.ConfigError` naming the key path.
Version-1 recipes (fixed sections, no ``version`` key) are read and migrated
(:mod:`torchslim.pipeline.migrate`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator

from torchslim.config import _NESTING, Config, format_validation_error, tagged_union
from torchslim.errors import ConfigError
from torchslim.pipeline.model_ref import ModelRef
from torchslim.pipeline.stages import STAGES

#: Largest recipe file read, and most YAML nodes walked (aliases included): a recipe is small.
MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 200_000
MAX_ERROR_LINES = 20


class DataSection(Config):
    """The dataset and its splits.

    Attributes:
        dataset: ``fashion-mnist``, ``mnist``, ``digits`` (offline, from scikit-learn) or ``synthetic``.
        root: a folder holding the IDX files (tried first).
        val_size: validation samples carved from the training set, as a count.
        val_fraction: the same as a fraction of the training set (default 0.1 when
            ``val_size`` is not set); set one of the two.
        train_limit: keep only this many training samples, for quick runs.
        test_limit: keep only this many test samples, for quick runs.
        download: allow downloading from the official mirror when no local copy exists.
    """

    dataset: Literal["fashion-mnist", "mnist", "digits", "synthetic"] = "fashion-mnist"
    root: str | None = None
    val_size: int | None = Field(None, ge=0)
    val_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    download: bool = True

    @model_validator(mode="after")
    def _one_validation_size(self) -> "DataSection":
        if self.val_size is not None and self.val_fraction is not None:
            raise ValueError("set 'val_size' (a count) or 'val_fraction' (a fraction), not both")
        return self

    def validation(self) -> int | float:
        """What :func:`torchslim.data.load_dataset` takes as ``val_size``."""
        return self.val_size if self.val_size is not None else (0.1 if self.val_fraction is None else self.val_fraction)


def _stage_kind(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) else "?"


#: One stage of a recipe: the config class of its ``kind``.
StageSpec = tagged_union({kind: cls.Config for kind, cls in STAGES.items()}, _stage_kind,
                         f"each stage needs 'kind': one of {', '.join(STAGES)}")


class Recipe(Config):
    """A whole compression run.

    Attributes:
        version: the schema version, 2.
        name: used in the run folder's name.
        seed: fixes initialisation, batch order and dropout; each stage's seed is derived
            from it and the stage's id.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for training.
        threads: torch CPU threads (default: torch's own choice).
        data: the dataset.
        models: the models the stages start from, by name (e.g. ``teacher``, ``student``).
        stages: what to do, in order.
        loggers: where training metrics go besides ``metrics.jsonl``: ``tensorboard``, ``mlflow``.
    """

    model_config = ConfigDict(**Config.model_config, populate_by_name=True)
    version: ClassVar[int] = 2
    schema_version: Literal[2] = Field(2, alias="version")
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    threads: int | None = Field(None, ge=1, le=1024)
    data: DataSection = Field(default_factory=DataSection)
    models: dict[str, ModelRef] = Field(..., min_length=1)
    stages: list[StageSpec] = Field(default_factory=list)  # type: ignore[valid-type]
    loggers: list[Literal["jsonl", "tensorboard", "mlflow"]] = Field(default_factory=lambda: ["jsonl"])

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, ModelRef]) -> dict[str, ModelRef]:
        for name in v:
            if not name.isidentifier():
                raise ValueError(f"model name {name!r} must be a plain identifier (letters, digits, _)")
        return v

    @model_validator(mode="after")
    def _resolve_stages(self) -> "Recipe":
        """Give every stage its id and its input, and check that every name refers to something earlier."""
        seen_kinds: dict[str, int] = {}
        models = set(self.models)
        produced: list[str] = []  # models and outputs of earlier model-producing stages, in order
        resolved = []
        for i, stage in enumerate(self.stages):
            n = seen_kinds[stage.kind] = seen_kinds.get(stage.kind, 0) + 1
            stage_id = stage.id or (stage.kind if n == 1 else f"{stage.kind}_{n}")
            where = f"stages.{i} ({stage_id})"
            if stage_id in models or stage_id in [s.id for s in resolved]:
                raise ValueError(f"{where}: id {stage_id!r} is used twice (ids and model names share one namespace)")
            known = [*models, *produced]
            source = stage.input or (produced[-1] if produced else next(iter(self.models)))
            for name in [source, *stage.references()]:
                if name not in known:
                    raise ValueError(f"{where}: {name!r} names no model and no earlier stage; known: "
                                     f"{', '.join(known) or '(none)'}")
            resolved.append(stage.model_copy(update={"id": stage_id, "input": source}))
            if STAGES[stage.kind].produces_model:
                produced.append(stage_id)
        object.__setattr__(self, "stages", resolved)  # frozen config: set once, while validating
        return self

    def stage_ids(self) -> list[str]:
        return [s.id for s in self.stages]


def _count_nodes(node: Any, budget: list[int], path: str, source: str) -> None:
    """Walk the document (aliases are walked again each time): keys must be strings, and size is bounded."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{source}: the recipe is too large (over {MAX_NODES:,} values once YAML aliases are "
                          "expanded); a recipe is a short file")
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                where = f"{path}." if path else ""
                raise ConfigError(f"{source}: invalid recipe:\n{where}{key!r}: keys must be names (strings)")
            _count_nodes(value, budget, f"{path}.{key}" if path else key, source)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _count_nodes(item, budget, f"{path}.{i}", source)


def _short(lines: str) -> str:
    parts = lines.splitlines()
    if len(parts) <= MAX_ERROR_LINES:
        return lines
    return "\n".join(parts[:MAX_ERROR_LINES] + [f"... and {len(parts) - MAX_ERROR_LINES} more errors"])


def _absolute(doc: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Weights paths against the recipe's folder; factories import from there too."""
    doc = copy.deepcopy(doc)
    for ref in (doc.get("models") or {}).values():
        if not isinstance(ref, dict):
            continue
        if isinstance(ref.get("weights"), str) and not Path(ref["weights"]).is_absolute():
            ref["weights"] = str((base_dir / ref["weights"]).resolve())
        if ref.get("factory") is not None and ref.get("path") is None:
            ref["path"] = str(base_dir.resolve())
    return doc


def parse_recipe(doc: Any, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe document (a dict from YAML, v1 or v2) into a v2 :class:`Recipe`.

    Relative weight paths are made absolute against ``base_dir`` so the resolved
    recipe written into a run folder stays valid from anywhere.
    """
    from torchslim.pipeline.migrate import is_v1, migrate_v1  # noqa: PLC0415 (migrate imports this module)

    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping of sections, got {type(doc).__name__}")
    try:
        _count_nodes(doc, [MAX_NODES], "", source)
    except RecursionError:
        raise ConfigError(f"{source}: the recipe is nested too deeply to be a recipe") from None
    if is_v1(doc):
        doc = migrate_v1(doc, source, base_dir)
    elif base_dir is not None:
        doc = _absolute(doc, base_dir)
    return validate_document(Recipe, doc, source)


def validate_document(cls: type[Config], doc: dict[str, Any], source: str) -> Any:
    """``cls.model_validate(doc)``, its errors as one :class:`ConfigError` naming every key path (bounded)."""
    token = _NESTING.set(1)  # nested: pydantic's error (with full key paths) reaches us here
    try:
        return cls.model_validate(doc)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{source}: invalid recipe:\n{_short(format_validation_error(exc))}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: invalid recipe: {exc}") from None
    finally:
        _NESTING.reset(token)


def _set_path(doc: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = doc
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {dotted}: '{'.'.join(keys[:i + 1])}' is not an index of the list")
            node = node[int(key)]
            continue
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {dotted}: '{'.'.join(keys[:i + 1])}' is not a section")
        node = child
    if isinstance(node, list):
        last = keys[-1]
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {dotted}: '{last}' is not an index of the list")
        node[int(last)] = value
    else:
        node[keys[-1]] = value


def _stage_alias(doc: dict[str, Any], dotted: str) -> str:
    """``stages.<id>.key`` addresses a stage by id as well as by index."""
    parts = dotted.split(".")
    if len(parts) > 1 and parts[0] == "stages" and not parts[1].isdigit() and isinstance(doc.get("stages"), list):
        ids = [s.get("id") or s.get("kind") for s in doc["stages"] if isinstance(s, dict)]
        if parts[1] in ids:
            parts[1] = str(ids.index(parts[1]))
    return ".".join(parts)


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a recipe document.

    In a v2 recipe a stage is addressed by index or id: ``stages.finetune.train.lr=0.01``.
    """
    doc = copy.deepcopy(doc)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
        _set_path(doc, _stage_alias(doc, key.strip()), value)
    return doc


def read_recipe_document(path: str | Path) -> Any:
    """The YAML document of a recipe file (bounded in size; a clear error for bad bytes or YAML)."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a recipe "
                              f"(at most {MAX_RECIPE_BYTES:,})")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply to be a recipe") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe file (v1 recipes are migrated)."""
    path = Path(path)
    doc = read_recipe_document(path)
    if overrides:
        doc = apply_overrides(doc if isinstance(doc, dict) else {}, overrides)
    return parse_recipe(doc, str(path), path.parent)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every default written out, except in ``train`` sections.

    A ``train`` section (a :class:`~torchslim.train.TrainConfig`) lists only the fields the
    recipe gave: its other fields follow rules that depend on where it is used (the short-run
    schedule, a pruned model's 3x rate with ``flat_cosine``), and a field written out would read
    back as given (a resumed run's pruned fine-tune would train at 1x the rate).
    """
    data = recipe.model_dump(mode="json", by_alias=True)
    _train_as_given(recipe, data)
    return yaml.safe_dump(data, sort_keys=False)


def _train_as_given(model: pydantic.BaseModel, dumped: dict[str, Any]) -> None:
    from torchslim.train import TrainConfig  # noqa: PLC0415

    for name, field in type(model).model_fields.items():
        key, value = field.alias or name, getattr(model, name)
        if key not in dumped:
            continue
        if isinstance(value, TrainConfig):
            dumped[key] = value.model_dump(mode="json", exclude_unset=True)
        elif isinstance(value, pydantic.BaseModel) and isinstance(dumped[key], dict):
            _train_as_given(value, dumped[key])
        elif isinstance(value, (list, tuple)) and isinstance(dumped[key], list):
            for item, out in zip(value, dumped[key]):
                if isinstance(item, pydantic.BaseModel) and isinstance(out, dict):
                    _train_as_given(item, out)


def factories(recipe: Recipe) -> set[str]:
    """Every user factory a recipe names (the code it would import)."""
    return {ref.factory for ref in recipe.models.values() if ref.factory is not None}


def check_importable(recipe: Recipe) -> None:
    """Every factory's module can be found (without importing, so without running it).

    Raises:
        ConfigError: naming the factory and where it was looked for.
    """
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415

    for name, ref in recipe.models.items():
        if ref.factory is None:
            continue
        module = ref.factory.partition(":")[0]
        sys.path.insert(0, ref.path or ".")
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a bad name
            found = False
        finally:
            sys.path.pop(0)
        if not found:
            raise ConfigError(f"models.{name}.factory: module {module!r} is not importable from "
                              f"{ref.path or 'the working directory'} or the installed packages")
