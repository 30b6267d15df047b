"""What every stage is: a config schema, ``plan`` (checks before anything trains) and ``run``.

A stage kind is one file under ``pipeline/stages/``: a config class (a
torchslim :class:`~torchslim.config.Config` tagged by ``kind``, holding the
library's own configs) and a :class:`Stage` subclass registered for that kind
with :func:`register_stage`. The runner knows no stage by name.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn as nn
from pydantic import Field

from torchslim.config import Config
from torchslim.errors import ConfigError

if TYPE_CHECKING:
    from torchslim.pipeline.context import RunContext

#: kind -> stage class, filled by :func:`register_stage`.
STAGES: dict[str, type["Stage"]] = {}

_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"


class StageConfig(Config):
    """Options every stage has.

    Attributes:
        kind: which stage this is (``train``, ``distill``, ``prune``, ...).
        id: the stage's name in the run folder, the report and the store (default: its
            kind, numbered when a kind appears twice). A later stage names it in ``input``
            or ``teacher``; the stage's seed is derived from it.
        input: the model this stage starts from: a name from ``models`` or an earlier
            stage's ``id`` (default: the previous stage's output, or the first model).
        label: the stage's row in the report's table.
    """

    kind: str
    id: str | None = Field(None, pattern=_ID_PATTERN)
    input: str | None = None
    label: str | None = None

    def references(self) -> list[str]:
        """Names of models or stages this stage reads besides its input (e.g. a teacher)."""
        return []


@dataclasses.dataclass
class StageResult:
    """What a stage produced.

    Attributes:
        model: the output model (the input passed through for stages that only measure
            or write files).
        records: metrics records (one per epoch, and events), in ``metrics.jsonl`` order.
        report: JSON data the stage's report section is rendered from (also in ``summary.json``).
        files: names of files the stage wrote into its ``files/`` folder, placed in the run folder.
        produces_model: False for stages (evaluate, export) whose model is their input.
    """

    model: nn.Module
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)
    produces_model: bool = True


class Stage:
    """Base class of stage kinds.

    Subclasses set ``kind`` and ``Config``, and implement :meth:`run`; :meth:`plan`
    (default: nothing to check) raises a torchslim error for anything that would
    fail later, and returns the model as the next stage will see it.
    """

    kind: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    #: whether the stage trains its input (an untrained start then gets no report row of its own)
    trains: ClassVar[bool] = False
    #: False for stages (evaluate, export) whose output model is their input, unchanged
    produces_model: ClassVar[bool] = True

    def __init__(self, config: StageConfig, stage_id: str, input_name: str):
        self.config = config
        self.id = stage_id
        self.input_name = input_name  # the resolved ``input``: a models entry or an earlier stage id

    def inputs(self, ctx: "RunContext") -> list[str]:
        """Names of every model this stage reads (its input first): their keys enter this stage's key."""
        return [self.input_name, *self.config.references()]

    def plan(self, ctx: "RunContext", model: nn.Module) -> nn.Module:
        """Check this stage against its input model before any stage runs; return the model it will output."""
        return model

    def run(self, ctx: "RunContext", model: nn.Module) -> StageResult:
        """Run on ``model`` (a copy the stage may change) and return its result."""
        raise NotImplementedError

    @classmethod
    def section(cls, report: dict[str, Any], rows: dict[str, dict[str, Any]], stage_id: str,
                records: list[dict[str, Any]]) -> list[str]:
        """Markdown lines of this stage's report section.

        Args:
            report: the data :meth:`run` returned in :attr:`StageResult.report`.
            rows: the evaluated models by name (stage id or ``models`` entry).
            stage_id: this stage's id.
            records: every metrics record of the run.
        """
        return []

    @classmethod
    def plots(cls, report: dict[str, Any], stage_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Matplotlib figures of this stage, by file name (written under ``plots/``)."""
        return {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: register a :class:`Stage` subclass under its ``kind``.

    Raises:
        ConfigError: the kind is taken, or the class's config does not declare it.
    """
    kind = cls.kind
    if kind in STAGES:
        raise ConfigError(f"stage kind {kind!r} is registered twice ({STAGES[kind].__name__} and {cls.__name__})")
    field = cls.Config.model_fields.get("kind")
    if field is None or getattr(field.annotation, "__args__", None) != (kind,):
        raise ConfigError(f"{cls.Config.__name__}.kind must be Literal[{kind!r}]")
    STAGES[kind] = cls
    return cls
