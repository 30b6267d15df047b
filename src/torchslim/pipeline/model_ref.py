"""A recipe's reference to a model (a preset or a user factory, optional weights), and building it.

A user factory is code: it is imported only when the user trusts it. A recipe
the user runs is trusted (they wrote or chose it); a run folder received from
elsewhere is not, and ``--resume`` imports its factories only when named with
``--factory`` (as loading a ``.slim`` file that names one does).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path
from typing import Any, Iterator

import torch.nn as nn
from pydantic import Field, model_validator

from torchslim import export as ts_export
from torchslim import models as ts_models
from torchslim.config import Config
from torchslim.errors import ConfigError, ModelError


class ModelRef(Config):
    """Which model: a zoo preset or a user factory, its arguments, and optional weights.

    Attributes:
        preset: a name from ``torchslim models``.
        factory: ``"package.module:function"`` returning an ``nn.Module`` (user code).
        args: keyword arguments of the preset or factory.
        weights: a ``.slim`` file (or a plain ``.safetensors`` state dict) to load;
            relative paths are resolved against the recipe's folder.
        path: a folder put on the import path while the factory is imported (default:
            the recipe's folder, so ``mynet.py`` beside the recipe is found).
        label: the model's row in the report's table (default: its name).
    """

    preset: str | None = None
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    args: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    path: str | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelRef":
        if (self.preset is None) == (self.factory is None):
            raise ValueError("set exactly one of 'preset' and 'factory'")
        if self.preset is not None:
            known = [p.name for p in ts_models.list_presets()]
            if self.preset not in known:
                raise ValueError(f"unknown model preset {self.preset!r}; known: {', '.join(sorted(known))}")
            params = inspect.signature(ts_models.registry.get_preset(self.preset).builder).parameters
            unknown = sorted(set(self.args) - set(params))
            if unknown:  # caught when the recipe is read, not when the model is built
                raise ValueError(f"preset {self.preset!r} has no argument(s) {unknown}; its arguments: "
                                 f"{', '.join(params)}")
        return self

    @property
    def name(self) -> str:
        return self.preset or self.factory or "?"


@contextlib.contextmanager
def _import_path(folder: str | None) -> Iterator[None]:
    if folder is None:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def check_trusted(ref: ModelRef, trusted: set[str] | None) -> None:
    """Refuse to import a factory the user did not trust (``trusted`` None trusts every factory)."""
    if ref.factory is not None and trusted is not None and ref.factory not in trusted:
        raise ConfigError(f"the recipe names user code {ref.factory!r} as a model factory, which is not imported "
                          f"unless you trust it: pass --factory {ref.factory} (library: trusted_factories=)")


def build_model(ref: ModelRef, splits: Any, trusted: set[str] | None = None) -> nn.Module:
    """Build (and load the weights of) a model reference, filling sizes from the data."""
    check_trusted(ref, trusted)
    if ref.weights is not None:
        return _load_weights(ref, splits)
    if ref.preset is not None:
        params = inspect.signature(ts_models.registry.get_preset(ref.preset).builder).parameters
        sizes = {"in_channels": splits.input_shape[0], "num_classes": splits.num_classes,
                 "input_size": splits.input_shape[-1]}
        return ts_models.create(ref.preset, **{**{k: v for k, v in sizes.items() if k in params}, **ref.args})
    with _import_path(ref.path):
        try:
            return ts_models.create_from_factory(ref.factory, **ref.args)
        except TypeError as exc:  # arguments that do not fit the factory
            raise ModelError(f"model factory {ref.factory!r} does not take arguments {ref.args}: {exc}") from None


def _load_weights(ref: ModelRef, splits: Any) -> nn.Module:
    path = Path(ref.weights)
    if path.is_dir():
        raise ConfigError(f"model weights {path} is a directory; give the .slim or .safetensors file")
    if not path.is_file():
        raise ConfigError(f"model weights file {path} does not exist")
    if path.suffix == ".slim":
        with _import_path(ref.path):
            # Weights may be stored in float16 to halve the file; the pipeline computes in float32.
            model = ts_export.load(path, factory=ref.factory).float()
        spec = ts_models.get_spec(model) or {}
        held = spec.get("preset", spec.get("factory"))
        if held != ref.name:
            raise ModelError(f"{path} holds a {held!r} model, but the recipe names {ref.name!r}")
        stored = spec.get("args", {})
        differ = {k: (v, stored.get(k)) for k, v in ref.args.items() if stored.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: recipe {a!r}, file {b!r}" for k, (a, b) in differ.items())
            raise ModelError(f"{path} was built with other arguments than the recipe's model.args ({detail}); "
                             "make model.args match the file, or leave them out")
        return model
    from safetensors.torch import load_file  # noqa: PLC0415

    from torchslim.export.slim import _sniff  # noqa: PLC0415 (one check of "is this safetensors at all")

    _sniff(path)  # a .pt file is "not a safetensors file", not "header too large"
    model = build_model(ref.model_copy(update={"weights": None}), splits)  # trust was checked by the caller
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as exc:  # a damaged or foreign file: say which and why, in one line
        raise ModelError(f"{path} does not fit model {ref.name}: {exc}") from None
    return model
