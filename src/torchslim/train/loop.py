"""The one training loop every stage uses, and evaluation.

``fit`` trains a model on in-memory tensors with an *objective* (plain
cross-entropy, or a distillation loss) and returns one record per epoch.
It checkpoints atomically after every epoch and resumes from a checkpoint to
the same result as an uninterrupted run: the batch order of an epoch depends
only on ``(seed, epoch)``, and the RNG state (dropout) is saved with the model,
optimizer and schedule. The same code runs single-process and under
DistributedDataParallel (each rank takes a strided share of every epoch's
permutation; metrics are summed across ranks; only rank 0 writes).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from torchslim.core.masks import has_masks
from torchslim.core.transforms import channels_removed
from torchslim.errors import ConfigError, TrainingError, TrainingInterrupted
from torchslim.train.checkpoint import load_checkpoint, model_signature, save_checkpoint
from torchslim.train.config import FLAT_FRACTION, TrainConfig
from torchslim.train.loggers import MetricLogger


class TensorSplit(Protocol):
    """Anything holding in-memory inputs ``x`` and integer labels ``y``."""

    x: torch.Tensor
    y: torch.Tensor


class Objective(Protocol):
    """Computes a batch's logits and loss parts; ``parts["loss"]`` is what is minimised.

    An objective whose class sets ``uses_index = True`` is also called with
    ``index=``: the batch's row numbers in the training split (a distillation
    objective looks cached teacher outputs up by them). One with a ``begin_step(epochs_done)``
    method is told, before each optimizer step, how many epochs (fractional) training
    will have done after it (DKD's warm-up ramps on it).
    """

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class CrossEntropyObjective:
    """Plain supervised training: cross-entropy against the labels."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(x)
        return logits, {"loss": F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)}


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        """Read torchrun's environment; a plain ``python`` run is rank 0 of 1."""
        if torch_dist.is_available() and torch_dist.is_initialized():
            return cls(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch, a function of ``(seed, epoch)`` only (resume-safe)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def build_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class _FlatCosine:
    """``flat_cosine``'s factor per step: 1 for the first ``FLAT_FRACTION`` of ``total``, then cosine to 0."""

    def __init__(self, total: int):
        self.total = total
        self.flat = int(total * FLAT_FRACTION)

    def __call__(self, step: int) -> float:
        done = min(1.0, (step - self.flat) / max(1, self.total - self.flat))
        return 1.0 if step < self.flat else 0.5 * (1.0 + math.cos(math.pi * done))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step learning-rate schedule over ``config.epochs`` epochs."""
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.schedule == "flat_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _FlatCosine(total))
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_epochs * steps_per_epoch, gamma=config.gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorSplit, *, batch_size: int = 1024, device: str | torch.device = "cpu",
             dist: DistContext | None = None) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``data`` (eval mode, restored afterwards)."""
    dist = dist or DistContext()
    was_training = model.training
    model.eval()
    n = len(data.y)
    idx = torch.arange(dist.rank, n, dist.world_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(idx), batch_size):
        b = idx[start:start + batch_size]
        x, y = data.x[b].to(device, non_blocking=True), data.y[b].to(device, non_blocking=True)
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    totals = torch.stack([loss_sum, correct, torch.tensor(float(len(idx)), dtype=torch.float64, device=device)])
    if dist.world_size > 1:
        torch_dist.all_reduce(totals)
    model.train(was_training)
    count = max(totals[2].item(), 1.0)
    return {"loss": totals[0].item() / count, "accuracy": totals[1].item() / count}


def _check_finite(loss: torch.Tensor, stage: str, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"{stage}: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}. "
            "Lower the learning rate, enable grad_clip, or check the data and model for NaN/Inf values."
        )


def _raise_if_bad(first_bad: torch.Tensor, stage: str, epoch: int) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise TrainingError(
            f"{stage}: loss is NaN or Inf at epoch {epoch + 1}, step {step + 1}. "
            "Lower the learning rate, enable grad_clip, or check the data and model for NaN/Inf values."
        )


def count_steps(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: every full batch, plus the last partial one if each rank gets a sample."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= world_size else 0)


class _StopRequest:
    """Turns Ctrl-C / SIGTERM into a flag the loop reads between steps.

    The loop then writes a checkpoint at a step boundary (never in the middle of
    an optimizer step) and raises :class:`TrainingInterrupted`.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fit(
    model: nn.Module,
    train: TensorSplit,
    config: TrainConfig,
    *,
    val: TensorSplit | None = None,
    objective: Objective | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every_steps: int | None = None,
    stage: str = "train",
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    on_step_end: Callable[[int], None] | None = None,
    progress: bool | None = None,
    dist: DistContext | None = None,
    logger: MetricLogger | None = None,
    log_every_steps: int | None = 10,
) -> list[dict[str, Any]]:
    """Train ``model`` in place and return one metrics record per epoch.

    Args:
        model: the model to train (already on ``device``).
        train: training split (``x``, ``y`` tensors, kept in memory).
        config: optimizer, schedule, epochs and batch size (a pruned model, one carrying pruning
            masks or with channels removed, trains at 3x ``lr`` with ``flat_cosine`` where those
            were not given: see :meth:`TrainConfig.for_pruned_model`).
        val: split evaluated after every epoch (optional).
        objective: computes logits and loss parts; default cross-entropy. One with
            ``uses_index = True`` also gets ``index=`` (the batch's rows in ``train``).
        seed: fixes batch order and dropout; the same seed gives the same result on CPU.
        device: ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 uses a grad scaler).
        checkpoint_path: written atomically after every epoch (and on Ctrl-C/SIGTERM);
            if it exists, training resumes from it, mid-epoch included.
        checkpoint_every_steps: also checkpoint every this many steps within an epoch.
        stage: name used in records, progress bars and error messages.
        on_epoch_end: called with each epoch's record (after the checkpoint is written).
        on_step_end: called with the global step number after each optimizer step
            (gradual pruning uses it to update masks without rebuilding the optimizer).
        progress: show a progress bar (default: only on an interactive terminal).
        dist: rank and world size; default read from ``torch.distributed``. Under
            DistributedDataParallel every step's ``batch_size`` samples are split
            across the ranks and each rank's loss is weighted by its share of them, so
            the gradients are a single process's (for an objective whose loss is a mean
            over the batch) even when the batch does not split evenly. BatchNorm layers
            normalize by each rank's share unless ``config.sync_batchnorm`` (CUDA only);
            a last partial batch with fewer samples than ranks is dropped.
        logger: receives every epoch's record (``log_epoch``) and, every ``log_every_steps``
            optimizer steps, that step's loss parts and learning rate (``log_step``, with the
            global step counted from 1). Only rank 0 logs. ``fit`` never closes it (see
            :mod:`torchslim.train.loggers`).
        log_every_steps: how often per-step values go to ``logger``; None: epoch records
            only. Each logged step reads its losses from the device (one sync).

    Returns:
        One dict per epoch trained in this call *and* before it (when resumed):
        ``epoch``, ``lr``, ``train_loss``, ``train_accuracy``, the objective's other loss
        parts averaged, ``val_loss``/``val_accuracy`` when ``val`` is given, ``seconds``,
        ``samples_per_second``.

    Raises:
        TrainingError: a NaN/Inf loss (naming the epoch and step), a model with no
            trainable parameters, or a checkpoint that is corrupt, empty or written for
            another model (see :func:`~torchslim.train.load_checkpoint`), or no space left
            to write one.
        ConfigError: a bad ``precision`` or ``log_every_steps``, or fewer samples or a
            smaller batch than processes.
        TrainingInterrupted: Ctrl-C or SIGTERM; a checkpoint was written first when
            ``checkpoint_path`` is set.
    """
    dist = dist or DistContext.from_env()
    if has_masks(model) or channels_removed(model):
        config = config.for_pruned_model()  # a fine-tune after pruning: 3x the rate, flat_cosine, unless given
    objective = objective or CrossEntropyObjective(config.label_smoothing)
    pass_index = bool(getattr(objective, "uses_index", False))
    begin_step = getattr(objective, "begin_step", None)  # objectives that change along training (DKD warm-up)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if log_every_steps is not None and (isinstance(log_every_steps, bool) or not isinstance(log_every_steps, int)
                                        or log_every_steps < 1):
        raise ConfigError(f"log_every_steps must be a positive integer or None, got {log_every_steps!r}")
    log_to = logger if dist.is_main else None  # rank 0 alone writes
    device = torch.device(device)
    n = len(train.y)
    if n < dist.world_size:
        raise ConfigError(f"{stage}: the training set has {n} samples, fewer than the {dist.world_size} processes")
    if config.batch_size < dist.world_size:
        raise ConfigError(f"{stage}: batch_size {config.batch_size} is smaller than the {dist.world_size} processes")
    steps_per_epoch = count_steps(n, config.batch_size, dist.world_size)

    sync_bn = config.sync_batchnorm and dist.world_size > 1 and _has_batchnorm(model)
    if sync_bn and device.type != "cuda":
        raise ConfigError(
            f"{stage}: sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU kernel); train on "
            "device: cuda, or set sync_batchnorm: false (each process then normalizes by its share of the batch)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        # torch.optim would say only "optimizer got an empty parameter list".
        raise TrainingError(
            f"{stage}: the model has no trainable parameters (all requires_grad=False?): nothing to train. "
            "Unfreeze the layers to train with model.requires_grad_(True) (a teacher frozen for distillation "
            "is restored when distill() returns)")
    optimizer = build_optimizer(trainable, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    history: list[dict[str, Any]] = []
    start_epoch, start_step, partial = 0, 0, None
    torch.manual_seed(seed)
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        state = load_checkpoint(checkpoint_path, model)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            start_epoch, start_step = int(state["epoch"]), int(state.get("step", 0))
            partial = state.get("partial")
            if partial is not None:  # rebuilt here, so a malformed one fails here and not mid-epoch
                partial = {"sums": {str(k): v.cpu() for k, v in partial["sums"].items()},
                           "correct": partial["correct"].cpu(), "seen": int(partial["seen"]),
                           "elapsed": float(partial["elapsed"])}
            history = list(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            # The checksum matched, so the file is as written, but not by this loop (or by a
            # torchslim whose checkpoint layout differed): name it rather than fail deep in torch.
            raise TrainingError(f"checkpoint {checkpoint_path} does not hold a training state this loop can resume "
                                f"({type(exc).__name__}: {str(exc)[:200]}). Delete it to restart the stage.") from exc

    def save(epoch: int, step: int, totals: dict[str, Any] | None) -> None:
        if checkpoint_path is None or not dist.is_main:
            return
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": torch.get_rng_state(), "epoch": epoch, "step": step, "history": history,
            "signature": model_signature(model),
        }
        if totals is not None:
            state["partial"] = totals
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        save_checkpoint(checkpoint_path, state)

    show = progress if progress is not None else (dist.is_main and sys.stderr.isatty())
    with _StopRequest() as stop, _ddp_model(model, dist, device, sync_bn) as train_model:
        for epoch in range(start_epoch, config.epochs):
            train_model.train()
            order = epoch_permutation(n, seed, epoch)
            sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=device)
            seen, elapsed, first_step = 0, 0.0, 0
            if partial is not None and epoch == start_epoch:
                # Resuming mid-epoch: carry on the epoch's running totals.
                sums = {k: v.to(device) for k, v in partial["sums"].items()}
                correct, seen, elapsed = partial["correct"].to(device), int(partial["seen"]), float(partial["elapsed"])
                first_step = start_step
            first_bad = torch.tensor(-1, device=device)
            started = time.perf_counter() - elapsed
            bar = tqdm(total=steps_per_epoch, initial=first_step, desc=f"{stage} {epoch + 1}/{config.epochs}",
                       leave=False, disable=not show, mininterval=0.5, file=sys.stderr)
            for step in range(first_step, steps_per_epoch):
                batch_idx = order[step * config.batch_size:(step + 1) * config.batch_size]
                idx = batch_idx[dist.rank::dist.world_size]
                # DDP averages the ranks' gradients with equal weights, but a batch that does not
                # split evenly (33 over 2 ranks: 17 and 16) gives the ranks unequal shares. Weighting
                # each rank's mean loss by its share makes the average the full batch's mean, i.e.
                # the single-process gradient.
                share = len(idx) * dist.world_size / len(batch_idx)
                x = train.x[idx].to(device, non_blocking=True)
                y = train.y[idx].to(device, non_blocking=True)
                if begin_step is not None:
                    begin_step(epoch + (step + 1) / steps_per_epoch)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    if pass_index:
                        logits, parts = objective(train_model, x, y, index=idx)
                    else:
                        logits, parts = objective(train_model, x, y)
                loss = parts["loss"]
                if device.type == "cpu":
                    _check_finite(loss, stage, epoch, step)
                else:
                    # On a GPU a per-step check would wait for the device every step; record
                    # the first bad step on the device and look at it every 50 steps instead.
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                            torch.tensor(step, device=device), first_bad)
                    if step % 50 == 49 or step == steps_per_epoch - 1:
                        _raise_if_bad(first_bad, stage, epoch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss * share if dist.world_size > 1 else loss).backward()
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                global_step = epoch * steps_per_epoch + step + 1
                if log_to is not None and log_every_steps is not None and global_step % log_every_steps == 0:
                    # Rank 0's own batch under DDP (no collective just for a log line).
                    log_to.log_step(stage, global_step, {**{k: v.detach().float().item() for k, v in parts.items()},
                                                         "lr": optimizer.param_groups[0]["lr"]})
                scheduler.step()
                if on_step_end is not None:
                    on_step_end(global_step)

                # Sums stay tensors: no host sync per step, only at the end of the epoch. Each
                # batch mean is weighted by its sample count, so under DDP the epoch's metrics are
                # means over samples (not over ranks) once the sums are reduced.
                batch = len(y)
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() * batch
                correct += (logits.detach().argmax(1) == y).sum()
                seen += batch
                if show and step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{correct.item() / seen:.3f}")
                bar.update(1)

                last = step == steps_per_epoch - 1
                # Under DDP every rank must stop at the same step: they agree every 20 steps.
                stopping = _stop_everywhere(stop, dist, step, device)
                if not last and (stopping or (checkpoint_every_steps and (step + 1) % checkpoint_every_steps == 0)):
                    save(epoch, step + 1, {"sums": {k: v.detach().cpu() for k, v in sums.items()},
                                           "correct": correct.detach().cpu(), "seen": seen,
                                           "elapsed": time.perf_counter() - started})
                if stopping and not last:
                    bar.close()
                    raise TrainingInterrupted(
                        f"{stage}: interrupted at epoch {epoch + 1}, step {step + 1}"
                        + ("; a checkpoint was written" if checkpoint_path is not None else ""))
            bar.close()

            totals_t = torch.stack([*(sums[k] for k in sorted(sums)), correct.float(),
                                    torch.tensor(float(seen), device=device)])
            if dist.world_size > 1:
                torch_dist.all_reduce(totals_t)
            count = totals_t[-1].item()
            record: dict[str, Any] = {"stage": stage, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            for i, key in enumerate(sorted(sums)):
                record["train_loss" if key == "loss" else f"train_{key}"] = totals_t[i].item() / count
            record["train_accuracy"] = totals_t[-2].item() / count
            if val is not None:
                metrics = evaluate(model, val, batch_size=config.eval_batch_size, device=device, dist=dist)
                record["val_loss"], record["val_accuracy"] = metrics["loss"], metrics["accuracy"]
            seconds = time.perf_counter() - started
            record["seconds"] = seconds
            record["samples_per_second"] = count / seconds
            history.append(record)
            save(epoch + 1, 0, None)
            if dist.world_size > 1:
                torch_dist.barrier()  # nobody reads a checkpoint rank 0 is still writing
            if log_to is not None:
                log_to.log_epoch(stage, epoch + 1, record)
            if on_epoch_end is not None:
                on_epoch_end(record)
            if not show and dist.is_main and progress is not False:
                val_text = f" val_acc {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
                print(f"[{stage}] epoch {epoch + 1}/{config.epochs} loss {record['train_loss']:.4f} "
                      f"acc {record['train_accuracy']:.4f}{val_text} ({seconds:.1f}s)", file=sys.stderr, flush=True)
            if _stop_everywhere(stop, dist, None, device):
                raise TrainingInterrupted(f"{stage}: interrupted after epoch {epoch + 1}"
                                          + ("; a checkpoint was written" if checkpoint_path is not None else ""))
    return history


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextlib.contextmanager
def _ddp_model(model: nn.Module, dist: DistContext, device: torch.device, sync_batchnorm: bool) -> Iterator[nn.Module]:
    """The module the training steps call: ``model`` itself in a single process, else ``model``
    wrapped in DistributedDataParallel (its BatchNorm layers turned into SyncBatchNorm first
    when ``sync_batchnorm``).

    SyncBatchNorm layers share their parameters and buffers with the layers they replace, so the
    optimizer (built on ``model``'s parameters) and checkpoints see the same tensors; on exit,
    errors included, the original layers go back with the trained values, and the caller's model
    keeps its own classes (save, load and ONNX export know BatchNorm, not SyncBatchNorm).
    """
    if dist.world_size == 1:
        yield model
        return
    replaced: dict[str, nn.Module] = {}
    if sync_batchnorm:
        replaced = {name: m for name, m in model.named_modules()
                    if name and isinstance(m, nn.modules.batchnorm._BatchNorm)}
        for name in replaced:
            # convert_sync_batchnorm swaps children in place but returns a new root for a bare
            # BatchNorm; converting each layer alone and setting it keeps every case the same.
            _set_submodule(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(replaced[name]))
    try:
        yield nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    finally:
        for name, original in replaced.items():
            synced = model.get_submodule(name)
            original.load_state_dict(synced.state_dict())  # the same tensors unless replaced meanwhile
            original.train(synced.training)
            _set_submodule(model, name, original)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _stop_everywhere(stop: _StopRequest, dist: DistContext, step: int | None, device: torch.device) -> bool:
    """Whether to stop now. Under DDP the ranks agree (at every 20th step, and at the end
    of an epoch when ``step`` is None) so that they all stop at the same point."""
    if dist.world_size == 1:
        return stop.requested
    if step is not None and step % 20 != 19:
        return False
    # On the training device: NCCL cannot reduce a CPU tensor (gloo takes either).
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
    torch_dist.all_reduce(flag)
    stop.requested = flag.item() > 0
    return stop.requested
