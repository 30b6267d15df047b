"""Iterative pruning: prune -> retrain rounds (Han et al., 2015), with optional weight rewinding.

Each round raises the sparsity along a ramp, prunes with the given config
(any criterion, scope or override), optionally rewinds the surviving weights
to an early checkpoint (lottery-ticket style, Frankle & Carbin 2019; "late
rewinding", Frankle et al. 2020), and retrains with :func:`torchslim.train.fit`.
Masks are updated in place, and a removed weight never comes back: not through
the optimizer (its gradient is zero and ``weight = weight_orig * mask``), not
in a later round (selection keeps previous zeros), not by rewinding (rewound
values are masked again).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn as nn
from pydantic import Field

from torchslim.config import Config
from torchslim.errors import ConfigError
from torchslim.prune.api import prune_
from torchslim.prune.magnitude import MagnitudePruning
from torchslim.prune.masks import apply_mask_, global_sparsity, is_masked, masked_layers
from torchslim.prune.schedule import at_sparsity
from torchslim.prune.unstructured import UnstructuredPruning


class IterativeSchedule(Config):
    """How many prune -> retrain rounds, and how the sparsity rises between them.

    Attributes:
        rounds: number of rounds; each prunes once, then retrains for the training
            config's ``epochs``.
        ramp: sparsity after round ``k`` of ``R`` for a final sparsity ``s``:
            ``geometric``: ``1 - (1 - s) ** (k / R)`` (each round removes the same
            fraction of what is left, as in the lottery-ticket papers); ``linear``:
            ``s * k / R``; ``cubic``: ``s * (1 - (1 - k / R) ** 3)`` (AGP's shape, over rounds).
            A config set by threshold, Han's rule or N:M is applied as is every round.
        rewind_epoch: when set (and no explicit ``rewind_to`` is passed), the weights
            after this many epochs of the first round's retraining are kept and every
            later round starts from them ("late rewinding"); 0 rewinds to the weights
            right after the first pruning.

    Example:
        >>> s = IterativeSchedule(rounds=3, ramp="geometric")
        >>> [round(s.sparsity_after(k, 0.875), 3) for k in (1, 2, 3)]
        [0.5, 0.75, 0.875]
    """

    rounds: int = Field(3, ge=1)
    ramp: Literal["geometric", "linear", "cubic"] = "geometric"
    rewind_epoch: int | None = Field(None, ge=0)

    def sparsity_after(self, round_index: int, final: float) -> float:
        """Target sparsity after round ``round_index`` (1-based) for a final sparsity ``final``."""
        f = min(max(round_index / self.rounds, 0.0), 1.0)
        if self.ramp == "geometric":
            return 1.0 - (1.0 - final) ** f
        if self.ramp == "linear":
            return final * f
        return final * (1.0 - (1.0 - f) ** 3)


def snapshot_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, keyed as in an unpruned model's ``state_dict``.

    Masked weights are stored under their plain name (``fc.weight``, not
    ``fc.weight_orig``) and masks are left out, so a snapshot taken before or
    after pruning rewinds either.
    """
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("_mask"):
            continue
        out[key.removesuffix("_orig") if key.endswith("_orig") else key] = value.detach().clone()
    return out


class WeightSnapshot:
    """A ``fit(on_epoch_end=...)`` callback that keeps the weights after epoch ``epoch``.

    Example:
        >>> import torchslim as ts
        >>> model = ts.models.create("lenet300_100")
        >>> snap = WeightSnapshot(model, epoch=1)
        >>> snap({"epoch": 1}); sorted(snap.state)[:2]
        ['classifier.0.bias', 'classifier.0.weight']
    """

    def __init__(self, model: nn.Module, epoch: int,
                 on_snapshot: Callable[[dict[str, torch.Tensor]], None] | None = None):
        self.model, self.epoch, self.on_snapshot = model, epoch, on_snapshot
        self.state: dict[str, torch.Tensor] | None = None

    def __call__(self, record: dict[str, Any]) -> None:
        if record.get("epoch") == self.epoch:
            self.state = snapshot_weights(self.model)
            if self.on_snapshot is not None:
                self.on_snapshot(self.state)


def rewind_(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state``'s weights into ``model`` and keep every mask: pruned weights stay zero.

    ``state`` is a :func:`snapshot_weights` or a plain ``state_dict`` of the
    model (before or after pruning); parameters and buffers are copied in
    place (optimizers keep their references), masks are left as they are.

    Raises:
        ConfigError: a parameter or buffer of ``model`` is missing from ``state``
            or has another shape.
    """
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if name.endswith("_mask") and is_masked(module, name[:-5]):
                continue
            plain = name[:-5] if name.endswith("_orig") and is_masked(module, name[:-5]) else name
            key = prefix + plain
            source = state.get(key, state.get(prefix + name))
            if source is None or source.shape != tensor.shape:
                raise ConfigError(f"cannot rewind {key!r}: missing from the snapshot or of another shape")
            with torch.no_grad():
                tensor.copy_(source)
    for _, module in masked_layers(model):
        apply_mask_(module, module.weight_mask)


def prune_iteratively(
    model: nn.Module,
    pruning: UnstructuredPruning | MagnitudePruning,
    train: Any,
    train_config: Any,
    schedule: IterativeSchedule | None = None,
    *,
    val: Any = None,
    data: Any = None,
    rewind_to: Mapping[str, torch.Tensor] | None = None,
    objective: Any = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_round_end: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = False,
    fit_round: Callable[..., list[dict[str, Any]]] | None = None,
    on_snapshot: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> list[dict[str, Any]]:
    """Prune ``model`` in ``schedule.rounds`` prune -> retrain rounds (in place).

    Round ``k`` prunes to ``schedule.sparsity_after(k, pruning.sparsity)`` with
    ``pruning``'s criterion and selection, rewinds if asked, then trains with
    ``fit(model, train, train_config, ...)``. The total training is
    ``rounds * train_config.epochs`` epochs.

    Args:
        model: the (usually trained) model; pruned and retrained in place.
        pruning: the final target and how to select; a config set by threshold,
            Han's rule or N:M is applied unchanged each round.
        train: training split (``x``, ``y``).
        train_config: a :class:`~torchslim.train.TrainConfig` for *each* round's retraining.
        schedule: rounds and ramp (default :class:`IterativeSchedule`).
        val: split evaluated after every epoch (optional).
        data: split for gradient criteria (default: ``train``).
        rewind_to: weights to rewind to after every pruning (a :func:`snapshot_weights`
            or a ``state_dict``); wins over ``schedule.rewind_epoch``.
        objective: training loss (default cross-entropy), also used by gradient criteria.
        seed: round ``k`` trains with ``seed + k``.
        device: where training runs.
        on_round_end: called with ``{"round", "target_sparsity", "sparsity", "val_accuracy"?}``.
        progress: progress bars, as in ``fit``.
        fit_round: trains one round instead of ``fit``:
            ``fit_round(model, k, train_config, seed, on_epoch_end) -> records`` (the
            pipeline uses it to checkpoint each round and distill from a teacher).
        on_snapshot: called with the rewinding snapshot when it is taken (the pipeline
            writes it to disk, so that a run resumed after that epoch still rewinds).

    Returns:
        Every epoch record from every round, each with ``round`` and ``target_sparsity`` added.

    Example:
        >>> import torch, torchslim as ts
        >>> from types import SimpleNamespace
        >>> from torchslim.prune import IterativeSchedule, UnstructuredPruning, prune_iteratively
        >>> model = ts.models.create("lenet300_100", input_size=8, hidden1=16, hidden2=8)
        >>> split = SimpleNamespace(x=torch.randn(64, 1, 8, 8), y=torch.arange(64) % 10)
        >>> history = prune_iteratively(model, UnstructuredPruning(sparsity=0.8), split,
        ...                             ts.TrainConfig(epochs=1, batch_size=32), IterativeSchedule(rounds=2))
        >>> [r["round"] for r in history], round(ts.prune.global_sparsity(model), 2)
        ([1, 2], 0.8)
    """
    from torchslim.train.loop import fit

    schedule = schedule or IterativeSchedule()
    data = train if data is None else data
    by_sparsity = isinstance(pruning, MagnitudePruning) and pruning.sparsity is not None or (
        isinstance(pruning, UnstructuredPruning) and pruning.target == "sparsity")
    rewind_state = dict(rewind_to) if rewind_to is not None else None
    history: list[dict[str, Any]] = []
    for k in range(1, schedule.rounds + 1):
        if by_sparsity:
            target = schedule.sparsity_after(k, pruning.sparsity)
            step = at_sparsity(pruning, target, pruning.sparsity)
        else:
            target, step = None, pruning
        prune_(model, step, data, objective=objective)
        if rewind_state is not None:
            rewind_(model, rewind_state)
        snap = None
        if rewind_state is None and schedule.rewind_epoch is not None and k == 1:
            if schedule.rewind_epoch == 0:
                rewind_state = snapshot_weights(model)
                if on_snapshot is not None:
                    on_snapshot(rewind_state)
            else:
                if schedule.rewind_epoch > train_config.epochs:
                    raise ConfigError(f"rewind_epoch={schedule.rewind_epoch} is past the round's "
                                      f"{train_config.epochs} epochs")
                snap = WeightSnapshot(model, schedule.rewind_epoch, on_snapshot)
        if fit_round is not None:
            records = fit_round(model, k, train_config, seed + k, snap)
        else:
            records = fit(model, train, train_config, val=val, objective=objective, seed=seed + k, device=device,
                          stage=f"prune round {k}", on_epoch_end=snap, progress=progress)
        if snap is not None:
            rewind_state = snap.state
            if rewind_state is None:
                raise ConfigError(f"round 1 finished without passing epoch {schedule.rewind_epoch}, the epoch to "
                                  "rewind to (it was resumed past it): pass rewind_to= with the saved weights")
        for r in records:
            history.append({**r, "round": k, "target_sparsity": target})
        summary = {"round": k, "target_sparsity": target, "sparsity": global_sparsity(model, masked_layers(model))}
        if records and "val_accuracy" in records[-1]:
            summary["val_accuracy"] = records[-1]["val_accuracy"]
        if on_round_end is not None:
            on_round_end(summary)
    return history
