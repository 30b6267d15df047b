"""The search's fine-tunes, kept in the pipeline's content store (:class:`~torchslim.pipeline.store.Store`).

A trial's short KD fine-tune and a finalist's full one are stage outputs like the pipeline's:
each is keyed by what it depends on — the dense model's weights, the training (and validation)
samples, the plan, the space's cut settings, the fine-tune's config, the distillation objective
and the seed — and produced once, under the entry's lock. So:

* a plan that two workers draw at the same time is fine-tuned once (the second waits and loads it);
* a search killed during its finalists (the longest part: full fine-tunes) loads the finished ones
  on resume instead of training them again;
* searches of one model under other budgets, given one store (``search(..., store=DIR)``,
  ``torchslim auto --store DIR``), share every fine-tune they have in common: the budget is not
  part of the key, it only decides which plans get fine-tuned;
* the teacher's outputs on the fine-tune samples are cached in the store's ``cache/`` folder once,
  for every trial of every worker.

A packed finalist (size bounds, :func:`~torchslim.search.packed.finish_packed`) has two entries,
its masked fine-tune and its centroid fine-tune, keyed by the layers' (sparsity, bits) codes too.

An entry holds the fine-tuned weights (``files/weights.safetensors``, of the cut model, which the
plan rebuilds exactly; with masks or codebooks for a packed finalist) and ``result.json`` (the
fine-tune's per-epoch records), written last.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from torchslim.errors import ConfigError
# The .slim writer's digest of named tensors (names, dtypes, shapes, bytes): the same content, the same key.
from torchslim.export.slim_header import _digest
from torchslim.pipeline.store import Store, content_key

#: Part of every key: a change to how the search fine-tunes must not load older entries.
#: 2: fine-tunes of cut models at the pruned-model rate and schedule (``recovery_finetune``).
FORMAT = 2


class FinetuneStore:
    """Fine-tuned models of one dense model and one search space, in a :class:`Store` folder.

    Args:
        root: the store folder (created when missing; may be shared by several searches).
        dense: the dense model every plan is cut from (its weights are part of every key).
        space: the search space (its cut settings are part of every key).
    """

    def __init__(self, root: str | os.PathLike, dense: nn.Module, space: Any):
        self.store = Store(root)
        self._base = content_key("torchslim-search-finetune", FORMAT, _digest(dense.state_dict()),
                                 space.to_dict())
        self._data: dict[int, tuple[Any, str]] = {}
        self.made = 0  # fine-tunes run by this process
        self.loaded = 0  # fine-tunes loaded from the store

    def _split_key(self, split: Any) -> str | None:
        if split is None:
            return None
        held = self._data.get(id(split))
        if held is None or held[0] is not split:
            held = (split, _digest({"x": split.x, "y": split.y}))  # the split is kept: its id stays its own
            self._data[id(split)] = held
        return held[1]

    def key(self, stage: str, plan: dict[str, int], train: Any, val: Any, config: Any, kd: Any, seed: int,
            extra: dict[str, Any] | None = None) -> str:
        """The content key of one fine-tune (``extra``: anything else the model depends on, e.g. packed codes)."""
        parts = [self._base, stage, sorted(plan.items()), self._split_key(train), self._split_key(val),
                 config.to_dict(), kd.to_dict() if kd is not None else None, seed]
        return content_key(*parts, *([extra] if extra is not None else []))

    def get(self, stage: str, plan: dict[str, int], train: Any, val: Any, config: Any, kd: Any, seed: int,
            build: Callable[[], nn.Module], finetune: Callable[[nn.Module, Path], list[dict[str, Any]]],
            extra: dict[str, Any] | None = None) -> nn.Module:
        """The fine-tuned model of ``plan``: loaded from the store, or built, fine-tuned and stored.

        Args:
            stage: names the entry (``trial`` or the recipe's fine-tune stage id).
            plan, train, val, config, kd, seed, extra: what the fine-tune depends on (the key).
            build: makes the model to fine-tune (the same architecture every call).
            finetune: trains a model in place, given the teacher cache folder; returns its records.
        """
        entry = self.store.entry(stage, self.key(stage, plan, train, val, config, kd, seed, extra))
        weights = entry.files / "weights.safetensors"
        with self.store.producing(entry):
            model = build()
            if entry.is_done():
                entry.read_result()  # checks that the entry is whole and belongs to this key
                try:
                    load_model(model, str(weights))
                except (OSError, RuntimeError, SafetensorError) as exc:
                    raise ConfigError(f"stored fine-tune {entry.root} cannot be loaded ({exc}); delete that folder "
                                      "and run the search again to fine-tune the plan anew") from None
                self.loaded += 1
                return model
            records = finetune(model, self.store.cache_dir)
            entry.files.mkdir(parents=True, exist_ok=True)
            partial = weights.with_suffix(".partial")
            save_model(model, str(partial))
            os.replace(partial, weights)  # whole or absent: result.json, written next, marks the entry done
            entry.write_result({"records": records, "plan": dict(plan), "stage": stage})
            self.made += 1
            return model


def open_finetune_store(store: str | os.PathLike | None, folder: Path | None, dense: nn.Module,
                        space: Any) -> FinetuneStore | None:
    """A search's fine-tune store: ``store``, else ``folder/store`` (the run folder's), else None (nothing kept)."""
    root = store if store is not None else (folder / "store" if folder is not None else None)
    return FinetuneStore(root, dense, space) if root is not None else None


def finetuned(run: Any, plan: dict[str, int], stage: str, train: Any, val: Any, config: Any, seed: int,
              kd: Any) -> nn.Module:
    """``plan`` cut from ``run.m``'s dense model and KD fine-tuned, as the recipe's fine-tune stage does.

    Loaded from ``run.finetunes`` (a :class:`FinetuneStore`) when it holds it; a run without one
    (None, or no such attribute: a caller's own namespace) fine-tunes every time.
    """
    return stored_finetune(run, plan, stage, train, val, config, seed, kd,
                           lambda: run.m.build(plan, recalibrate=False))


def stored_finetune(run: Any, plan: dict[str, int], stage: str, train: Any, val: Any, config: Any, seed: int, kd: Any,
                    build: Callable[[], nn.Module], extra: dict[str, Any] | None = None) -> nn.Module:
    """The model ``build`` makes, KD fine-tuned from ``run.m``'s dense model: through ``run.finetunes``
    when the run has one (keyed by ``plan`` and ``extra`` besides the fine-tune's settings).
    ``config`` is resolved by :func:`~torchslim.search.finalists.recovery_finetune` first."""
    from torchslim.search import finalists  # noqa: PLC0415 (finalists imports this module)

    kd = kd if kd is not None else finalists.recovery_kd()  # keyed as what the fine-tune uses
    config = finalists.recovery_finetune(config)
    tune = lambda model, cache_dir: finalists.kd_finetune_(model, run.m.dense, train, val, config,  # noqa: E731
                                                           seed=seed, kd=kd, stage=stage, cache_dir=cache_dir)
    store = getattr(run, "finetunes", None)
    if store is None:
        model = build()
        tune(model, None)
        return model
    return store.get(stage, plan, train, val, config, kd, seed, build, tune, extra)
