"""Config objects: one frozen, validated pydantic model per method.

Configs are validated at construction (a bad value fails there, with a message
naming the field), serialize to a dict carrying their type name and version,
and load back equal. Type names resolve only against torchslim's own config
registry, never as arbitrary dotted paths.

Values are strict: a number field takes a number, never a bool or a string
(``epochs: true``, ``sparsity: false`` and ``epochs: "3"`` are errors, not 1, 0.0
and 3); a bool field takes only ``true``/``false``. An int is accepted where a
float is expected, and a list where a tuple is (YAML has no tuples).

The registry holds torchslim's own classes only (those defined in a
``torchslim.*`` module), one per name: a second torchslim class with a name
already taken fails when it is defined. A user's subclass of :class:`Config`
validates like any config but is not resolvable by name in
:func:`config_from_dict` (a recipe cannot make torchslim build a class it does
not own).
"""

from __future__ import annotations

import contextvars
from typing import Annotated, Any, Callable, ClassVar, TypeVar, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Discriminator, GetCoreSchemaHandler, Tag
from pydantic_core import CoreSchema

from torchslim.errors import ConfigError

_NESTING: contextvars.ContextVar[int] = contextvars.ContextVar("torchslim_config_nesting", default=0)
_CONFIG_TYPES: dict[str, type["Config"]] = {}

C = TypeVar("C", bound="Config")


#: Tags of :func:`tagged_union` choices start with this, so error paths can leave them out.
_TAG_MARK = "@"


def tagged_union(choices: dict[str, type], pick: Callable[[Any], str], message: str) -> Any:
    """A pydantic field type that is one of ``choices``, chosen by ``pick(value) -> name``.

    Unlike a plain ``Union`` the error names only the chosen config's problem, and the
    key path stays as the user wrote it (``prune.sparsity``, not ``prune.unstructured.sparsity``).
    ``pick`` gets the raw mapping or an already built config; ``message`` is the error when
    it picks no known name.
    """
    members = tuple(Annotated[cls, Tag(_TAG_MARK + name)] for name, cls in choices.items())
    def tag(value: Any) -> str:
        name = pick(value)
        return _TAG_MARK + name if isinstance(name, str) else _TAG_MARK + "?"  # "?": no such choice

    return Annotated[Union[members], Discriminator(tag,
                                                   custom_error_type="config_choice",
                                                   custom_error_message=message)]


def _strict_hint(value: Any) -> str:
    """Why a value lax Python would take is refused (configs never convert bools and strings)."""
    if isinstance(value, bool):
        return "; true/false is not a number"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return "; a quoted number is a string: drop the quotes"
    return ""


def format_validation_error(exc: pydantic.ValidationError, prefix: str = "") -> str:
    """Turn a pydantic error into lines that each name the offending key path."""
    lines = []
    for err in exc.errors():
        parts = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(_TAG_MARK))]
        loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + parts)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and its section)"
        elif err["type"] in ("int_type", "float_type", "bool_type"):
            msg += _strict_hint(err.get("input"))
        lines.append(f"{loc or '<root>'}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and "input" in err and not isinstance(err["input"], dict) else ""))
    return "\n".join(lines)


#: Core-schema types made strict: pydantic's lax mode turns ``True`` into 1 and ``"3"`` into 3.
_STRICT_TYPES = frozenset({"int", "float", "bool"})


def _strict_numbers(schema: Any) -> None:
    """Mark every int/float/bool schema inside ``schema`` strict, in place.

    Strict only at the leaves, not the whole model: pydantic's strict mode would also
    refuse a list for a tuple and a mapping for a nested config, which recipes need.
    A strict float still accepts an int.
    """
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") in _STRICT_TYPES:
                node["strict"] = True
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _is_torchslim_module(module: str) -> bool:
    return module == "torchslim" or module.startswith("torchslim.")


class Config(BaseModel):
    """Base of every torchslim config: frozen, unknown keys rejected, strict values, validated on construction."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not _is_torchslim_module(cls.__module__):
            return  # a user's config: validated as any, never resolved by name
        known = _CONFIG_TYPES.get(cls.__name__)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"config class name {cls.__name__!r} is taken by {known.__module__}.{known.__qualname__}; "
                            f"{cls.__module__}.{cls.__qualname__} needs another name (recipes and saved configs "
                            "name their type by the bare class name)")
        _CONFIG_TYPES[cls.__name__] = cls  # the same class defined again (a module reload) replaces itself

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        _strict_numbers(schema)
        return schema

    def __init__(self, **data: Any) -> None:
        # Only the outermost construction turns pydantic's error into a ConfigError;
        # nested configs re-raise pydantic's own error so key paths stay whole.
        token = _NESTING.set(_NESTING.get() + 1)
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            if _NESTING.get() > 1:
                raise
            raise ConfigError(f"invalid {type(self).__name__}:\n{format_validation_error(exc)}") from None
        finally:
            _NESTING.reset(token)

    def to_dict(self) -> dict[str, Any]:
        """Serialize with the config's type name and version, for recipes and run folders."""
        return {"type": type(self).__name__, "version": self.version, **self.model_dump(mode="json")}


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from :meth:`Config.to_dict` output; only torchslim's own types resolve."""
    data = dict(data)
    type_name = data.pop("type", None)
    version = data.pop("version", None)
    cls = _CONFIG_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ConfigError(f"unknown config type {type_name!r}; known: {', '.join(sorted(_CONFIG_TYPES))}")
    if version is not None and version != cls.version:
        raise ConfigError(f"{type_name} version {version} is not supported (this torchslim reads version {cls.version})")
    return cls(**data)


def registered_config_types() -> dict[str, type[Config]]:
    """Every config class torchslim itself defines, by name (used by round-trip tests)."""
    return dict(_CONFIG_TYPES)
