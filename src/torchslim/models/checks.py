"""Checks that a model is usable before any training time is spent on it."""

from __future__ import annotations

import torch
import torch.nn as nn

from torchslim.errors import ModelError


def check_finite(model: nn.Module, label: str = "model") -> None:
    """Raise :class:`ModelError` naming the first parameter or buffer holding NaN or Inf."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelError(f"{label}: {name} holds {bad} NaN/Inf value(s); the weights are corrupt "
                             "(retrain, or load a good weights file)")


def check_forward(model: nn.Module, example: torch.Tensor, num_classes: int, label: str = "model") -> None:
    """Run ``model`` on ``example`` and check it returns ``(batch, num_classes)`` logits.

    Raises:
        ModelError: the model rejects the input shape, or its output does not fit the classes.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # whatever the model raises, the user needs the shapes to act on it
        raise ModelError(
            f"{label} rejects inputs of shape {tuple(example.shape)}: {exc}. "
            "Check the model's in_channels/input_size arguments against the dataset."
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape != (example.shape[0], num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{label} returns {shape} for a batch of {example.shape[0]}, expected "
                         f"({example.shape[0]}, {num_classes}) logits: set num_classes={num_classes}")
