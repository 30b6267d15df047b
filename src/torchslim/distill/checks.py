"""Checks a pipeline runs before it trains: do the layers a distillation config names exist?

:func:`check_distill_layers` costs nothing without an example input (a look at
``named_modules()``); with one it also runs each model once, in eval mode and
without gradients, to check the class counts and that every hint pair can be
mapped by an adapter.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn as nn

from torchslim.distill.configs import DistillConfig, DKDConfig, KDConfig, as_distill_config
from torchslim.distill.features import FeatureHooks, make_adapter, match_spatial
from torchslim.distill.frozen import ModuleState
from torchslim.errors import ConfigError, ModelError

__all__ = ["check_distill_layers"]


def _unknown_layer(name: str, role: str, term: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    shown = close or names[:6]
    label = "closest names" if close else "its modules include"
    more = "" if close or len(names) <= 6 else f" and {len(names) - 6} more"
    return ConfigError(f"{term}: the {role} has no layer named {name!r}; {label}: "
                       f"{', '.join(repr(n) for n in shown)}{more} (names as in model.named_modules())")


def check_distill_layers(student: nn.Module, teacher: nn.Module, config: KDConfig | DKDConfig | DistillConfig,
                         example: torch.Tensor | None = None) -> None:
    """Check that every hint/attention layer ``config`` names is a module of its model.

    Args:
        student: the student (its ``named_modules()`` names the left side of each pair).
        teacher: the teacher (the right side).
        config: the distillation config; a bare :class:`KDConfig`/:class:`DKDConfig` has no
            layers and passes.
        example: a few inputs; when given, both models run once on them (eval mode, no
            gradients, modes restored) to check that they predict the same number of
            classes and that each hint pair's features can be mapped by an adapter.

    Raises:
        ConfigError: a name matches no module; the message names it and the closest
            (or the first few) module names of that model.
        ModelError: with ``example``: different class counts, or hint features of shapes no
            adapter maps (e.g. a convolutional layer paired with a linear one).

    Example:
        >>> import torch.nn as nn
        >>> from torchslim.distill import AttentionConfig, DistillConfig, check_distill_layers
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        >>> check_distill_layers(net, net, DistillConfig(attention=AttentionConfig(layers={"0": "0"})))
        >>> check_distill_layers(net, net, DistillConfig(attention=AttentionConfig(layers={"conv": "0"})))
        Traceback (most recent call last):
        ...
        torchslim.errors.ConfigError: attention.layers: the student has no layer named 'conv'; its modules include: '0', '1' (names as in model.named_modules())
    """
    cfg = as_distill_config(config)
    names = {"student": [n for n, _ in student.named_modules() if n],
             "teacher": [n for n, _ in teacher.named_modules() if n]}
    for term_name, term in (("hints", cfg.hints), ("attention", cfg.attention)):
        if term is None:
            continue
        for student_layer, teacher_layer in term.layers.items():
            for role, name in (("student", student_layer), ("teacher", teacher_layer)):
                if name not in names[role]:
                    raise _unknown_layer(name, role, f"{term_name}.layers", names[role])
    if example is not None:
        _check_with_example(student, teacher, cfg, example)


@torch.no_grad()
def _check_with_example(student: nn.Module, teacher: nn.Module, cfg: DistillConfig, example: torch.Tensor) -> None:
    outputs = {}
    features = {}
    for role, model, layers in (("student", student, [s for t in (cfg.hints, cfg.attention) if t for s in t.layers]),
                                ("teacher", teacher, list(cfg.teacher_layers()))):
        state = ModuleState(model)
        model.eval()  # no BatchNorm statistics updated by this probe
        hooks = FeatureHooks(model, (), role)
        try:
            hooks = FeatureHooks(model, layers, role)
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            outputs[role] = model(example.to(device))
            features[role] = {name: hooks.take(name) for name in layers}
        finally:
            hooks.remove()
            state.restore()
    if outputs["teacher"].shape[1:] != outputs["student"].shape[1:]:
        raise ModelError(f"the teacher predicts {tuple(outputs['teacher'].shape[1:])} outputs per sample but the "
                         f"student {tuple(outputs['student'].shape[1:])}: distillation needs both to predict the "
                         "same classes (check num_classes)")
    if cfg.hints is not None:
        for s_name, t_name in cfg.hints.layers.items():
            s, t = match_spatial(features["student"][s_name], features["teacher"][t_name])
            make_adapter(tuple(s.shape[1:]), tuple(t.shape[1:]), f"{s_name} -> {t_name}")
    if cfg.attention is not None:
        for s_name, t_name in cfg.attention.layers.items():
            s, t = features["student"][s_name], features["teacher"][t_name]
            if s.dim() != 4 or t.dim() != 4:
                raise ModelError(f"attention {s_name} -> {t_name}: attention maps need (B, C, H, W) features, got "
                                 f"student {tuple(s.shape)} and teacher {tuple(t.shape)}")
