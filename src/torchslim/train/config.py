"""The training config every stage shares (teacher, student, distillation, fine-tuning)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from torchslim.config import Config


#: Runs of at most this many epochs get the ``constant`` schedule unless one is given.
SHORT_RUN_EPOCHS = 3

#: A fine-tune of a pruned model (masks, or channels removed) starts at this multiple of ``lr`` unless ``lr`` is given.
PRUNED_LR_FACTOR = 3.0

#: The share of the steps the ``flat_cosine`` schedule holds ``lr`` before its cosine to zero.
FLAT_FRACTION = 0.5


class TrainConfig(Config):
    """How to train: epochs, batches, optimizer and learning-rate schedule.

    Unless ``schedule`` is given, it is ``constant`` for runs of up to
    :data:`SHORT_RUN_EPOCHS` (3) epochs and ``cosine`` for longer ones; the config then
    holds (and serializes) the value chosen. Most short runs are fine-tunes after
    pruning and short distillations, where cosine-to-zero halves the average learning
    rate. In ``benchmarks/robustness.py`` (Fashion-MNIST, 10000 training samples, Adam
    1e-3) constant beat cosine by 0.9-1.8 points after 1 epoch from scratch, tied after
    3, and recovered more after unstructured pruning; after 10 epochs from scratch cosine
    was 1.0-1.5 points better (see ``benchmarks/README.md``).

    A pruned model — one that carries pruning masks, or whose channels
    :func:`~torchslim.prune_channels` removed — is trained by :func:`~torchslim.train.fit` at
    :data:`PRUNED_LR_FACTOR` (3) times ``lr`` when ``lr`` is not given, and with ``flat_cosine``
    at any budget when ``schedule`` is not given (:meth:`for_pruned_model`): a
    pruned model starts damaged and needs to move further than one being trained on, as
    learning-rate rewinding (Renda et al., ICLR 2020) found. In ``benchmarks/robustness.py``
    (Fashion-MNIST, 10000 samples, validation split, user_cnn and fmnist_student, seeds 0-1)
    Adam 3e-3 with cosine beat the earlier default (1e-3, constant) in all 20 runs at 90 % and
    98 % sparsity after 1, 3 and 10 epochs, by 0.2-1.1 points; holding 3e-3 for the first
    half of the steps (``flat_cosine``) then added 1.12 / 0.50 / 0.28 points at 98 % after
    1 / 3 / 10 epochs and moved 90 % by -0.20 to +0.32 (means over the same models and seeds,
    validation split, 90/95/98 %: ahead in 26 of 36; ``benchmarks/README.md``, robustness,
    fifth round). After channel removal (``prune_channels`` to 2x and 4x fewer MACs) the same
    rule beat the earlier default (1e-3, constant up to 3 epochs, cosine above) in 47 of 48
    validation runs (fmnist_student, lenet300_100 and two user models, 1 / 3 / 10 epochs, seeds
    0-1), by 1.1 points on average; a KD fine-tune of the channel-cut fmnist_teacher gained 0.6
    and 0.7 (robustness, seventh round).

    Attributes:
        epochs: passes over the training set (0 skips training).
        batch_size: samples per optimizer step, split across the processes under DDP (so a
            run under torchrun takes the steps a single process would).
        optimizer: ``sgd`` (with ``momentum``/``nesterov``), ``adam`` or ``adamw``.
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: use Nesterov momentum with SGD.
        weight_decay: L2 penalty (decoupled for ``adamw``).
        schedule: ``constant``, ``cosine`` (to zero over all steps), ``flat_cosine`` (``lr``
            for the first half of the steps, then cosine to zero), ``step``
            (multiply by ``gamma`` every ``step_epochs``) or ``onecycle``. Every schedule
            advances per step. Default: ``constant`` up to 3 epochs, ``cosine`` above
            (3x ``lr`` and ``flat_cosine`` for a pruned model unless given, see above).
        step_epochs: epochs between decays for the ``step`` schedule.
        gamma: decay factor for the ``step`` schedule.
        label_smoothing: cross-entropy label smoothing for the task loss.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        eval_batch_size: batch size for evaluation passes.
        sync_batchnorm: under DDP, compute BatchNorm batch statistics over the whole step's
            batch (all ranks) with ``torch.nn.SyncBatchNorm`` instead of each rank's share;
            the model gets its own BatchNorm layers back when training ends. Needs CUDA
            (torch's SyncBatchNorm has no CPU kernel); ignored in a single process.

    Example:
        >>> import torchslim as ts
        >>> ts.TrainConfig(epochs=2, lr=0.01, schedule="cosine").epochs
        2
    """

    epochs: int = Field(1, ge=0)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "cosine", "flat_cosine", "step", "onecycle"] = "cosine"
    step_epochs: int = Field(1, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0)
    eval_batch_size: int = Field(1024, ge=1)
    sync_batchnorm: bool = False

    def for_pruned_model(self) -> "TrainConfig":
        """The config ``fit`` uses on a pruned model (pruning masks, or channels removed).

        ``lr`` times :data:`PRUNED_LR_FACTOR` unless ``lr`` was given, ``flat_cosine`` unless
        ``schedule`` was given; a field that was given is kept as it is.
        """
        update: dict[str, Any] = {}
        if "lr" not in self.model_fields_set:
            update["lr"] = self.lr * PRUNED_LR_FACTOR
        if "schedule" not in self.model_fields_set:
            update["schedule"] = "flat_cosine"
        if not update:
            return self
        fixed = self.model_copy(update=update)
        # Now "given": fitting again with this config, or a copy of it, keeps the rate
        # instead of multiplying it a second time.
        fixed.model_fields_set.update(update)
        return fixed

    @model_validator(mode="after")
    def _schedule_for_the_budget(self) -> "TrainConfig":
        # Not set by hand: pick by the budget. It stays "unset", so a copy with other
        # epochs (``TrainConfig(**c.model_dump(exclude_unset=True), epochs=...)``) picks again.
        if "schedule" not in self.model_fields_set:
            object.__setattr__(self, "schedule", "constant" if self.epochs <= SHORT_RUN_EPOCHS else "cosine")
        return self
