"""Preset registry: name -> plain builder function, and building models from a spec.

A *spec* is the small JSON-able dict that says how to rebuild a model's
architecture: ``{"preset": "lenet5", "args": {...}}`` for a zoo preset, or
``{"factory": "mypkg.nets:build", "args": {...}}`` for a user's own builder.
It is attached to every model torchslim builds (``model.torchslim_spec``) so
that saving never needs pickle: the architecture is rebuilt from the spec and
only tensors are read from disk.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence, overload

import torch.nn as nn

from torchslim.errors import ModelError, TorchSlimError

SPEC_ATTR = "torchslim_spec"


@dataclass(frozen=True)
class PresetInfo:
    """A registered preset: its name, builder, one-line description and width arguments.

    ``width_args`` names the integer arguments that set layer widths (channels, hidden
    units); :func:`torchslim.distill.derive_student` scales them. Empty when the preset
    did not declare any.
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str
    width_args: tuple[str, ...] = ()


_PRESETS: dict[str, PresetInfo] = {}


Builder = Callable[..., nn.Module]


@overload
def register_preset(fn: Builder) -> Builder: ...


@overload
def register_preset(*, width_args: Sequence[str]) -> Callable[[Builder], Builder]: ...


def register_preset(fn: Builder | None = None, *, width_args: Sequence[str] = ()) -> Any:
    """Decorator that registers a builder function as a preset under its own name.

    Use it bare (``@register_preset``) or name the arguments that set layer widths,
    so that :func:`torchslim.distill.derive_student` can build a narrower twin
    (``@register_preset(width_args=("width", "fc"))``).

    Raises:
        ModelError: a width argument is not an argument of the builder.
    """
    def register(builder: Builder) -> Builder:
        params = inspect.signature(builder).parameters
        unknown = [a for a in width_args if a not in params]
        if unknown:
            raise ModelError(f"preset {builder.__name__!r}: width_args {unknown} are not arguments of the builder")
        doc = inspect.getdoc(builder) or ""
        _PRESETS[builder.__name__] = PresetInfo(builder.__name__, builder, doc.splitlines()[0] if doc else "",
                                                tuple(width_args))
        return builder

    return register(fn) if fn is not None else register


def get_preset(name: str) -> PresetInfo:
    """The registered preset ``name`` (a :class:`ModelError` listing the known ones if absent)."""
    if name not in _PRESETS:
        raise ModelError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]


def list_presets() -> list[PresetInfo]:
    """All registered presets, sorted by name."""
    return [_PRESETS[k] for k in sorted(_PRESETS)]


def _bind_args(fn: Callable[..., nn.Module], label: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Resolve every argument of ``fn`` (defaults + overrides), rejecting unknown names."""
    sig = inspect.signature(fn)
    try:
        bound = sig.bind(**overrides)
    except TypeError as exc:
        known = ", ".join(sig.parameters) or "(none)"
        raise ModelError(f"{label}: bad arguments {sorted(overrides)}: {exc}. Known arguments: {known}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def create(name: str, **overrides: Any) -> nn.Module:
    """Build a zoo preset by name.

    Args:
        name: a preset name, see :func:`list_presets` or ``torchslim models``.
        **overrides: arguments of the preset function (``num_classes=``, ``in_channels=``, ...).

    Returns:
        The model, with ``model.torchslim_spec`` recording the preset and all its arguments.

    Example:
        >>> import torchslim as ts
        >>> model = ts.models.create("lenet5", num_classes=10)
    """
    fn = get_preset(name).builder
    args = _bind_args(fn, f"preset {name!r}", overrides)
    model = fn(**args)
    setattr(model, SPEC_ATTR, {"preset": name, "args": args})
    return model


def import_factory(target: str) -> Callable[..., nn.Module]:
    """Import a user's model builder named ``"package.module:function"``.

    Only called when a recipe or the user names the factory explicitly.
    """
    if ":" not in target:
        raise ModelError(f"model factory {target!r} must look like 'package.module:function'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import error in the user's module is the user's to see
        raise ModelError(f"cannot import module {module_name!r} for model factory {target!r}: {exc}") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ModelError(f"module {module_name!r} has no attribute {attr!r} (model factory {target!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ModelError(f"model factory {target!r} is not callable")
    return fn


def create_from_factory(target: str, **args: Any) -> nn.Module:
    """Build a user's model from ``"package.module:function"`` and keyword arguments.

    Raises:
        ModelError: the factory cannot be imported, does not take ``args``, raises (any
            exception from the user's code, named with the factory so the user knows whose
            code failed), or returns something that is not a module.
    """
    fn = import_factory(target)
    try:
        inspect.signature(fn).bind(**args)
    except ValueError:  # no signature to read (a builtin): let the call say whether it fits
        pass
    except TypeError as exc:
        raise ModelError(f"model factory {target!r} does not take arguments {args}: {exc}") from None
    try:
        model = fn(**args)
    except TorchSlimError:
        raise
    except Exception as exc:  # the user's code: one line naming the factory, the cause chained
        raise ModelError(f"model factory {target!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {target!r} returned {type(model).__name__}, not a torch.nn.Module")
    setattr(model, SPEC_ATTR, {"factory": target, "args": dict(args)})
    return model


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model's architecture from its spec (see module docstring)."""
    if "preset" in spec:
        return create(spec["preset"], **spec.get("args", {}))
    if "factory" in spec:
        return create_from_factory(spec["factory"], **spec.get("args", {}))
    raise ModelError(f"model spec {spec!r} names neither 'preset' nor 'factory'")


def get_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec torchslim attached to ``model``, or None for a model built elsewhere."""
    return getattr(model, SPEC_ATTR, None)
