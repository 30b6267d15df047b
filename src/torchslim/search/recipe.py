"""The v2 recipe a search emits: the chosen plan as pipeline stages that ``torchslim run`` replays."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from torchslim.errors import ConfigError
from torchslim.search.precision import quantize_stage

#: Stage ids of the emitted recipe; the fine-tune seed is derived from ``FINETUNE_ID`` as the pipeline does.
PRUNE_ID, FINETUNE_ID = "pruned", "finetuned"


def _plain(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in ("type", "version")}


def recipe_document(model_ref: dict[str, Any], data: dict[str, Any], method: Any, finetune: Any, *,
                    seed: int = 0, name: str = "auto", kd: Any = None, quantize: Any = None,
                    batch: int = 256, packed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The v2 recipe of a chosen plan: [prune_channels] → [prune] → KD finetune → [share_weights → pack | quantize] →
    evaluate → export.

    ``method`` (a :class:`~torchslim.prune.structured.ChannelPruning`, None: no channel cut) gives the
    prune_channels stage; ``quantize`` (an :class:`~torchslim.quant.Int8Config`) the int8 stage; ``packed``
    (``{"prune": UnstructuredPruning | None, "share": WeightSharing | None, "share_train": TrainConfig | None}``,
    see :mod:`~torchslim.search.packed`) the per-layer pruning before the fine-tune, the weight sharing with its
    centroid fine-tune after it, and the packed file.
    """
    from torchslim.search.packed import PACK_ID, SHARE_ID, SPARSE_ID

    stages: list[dict[str, Any]] = []

    def add(stage: dict[str, Any]) -> None:
        stage.setdefault("input", stages[-1]["id"] if stages else "dense")
        stages.append(stage)

    if method is not None:
        add({"kind": "prune_channels", "id": PRUNE_ID, "label": "channels removed (searched plan)",
             "method": _plain(method)})
    if packed is not None and packed.get("prune") is not None:
        add({"kind": "prune", "id": SPARSE_ID, "label": "weights pruned per layer (searched plan)",
             "method": _plain(packed["prune"])})
    tuned = finetune is not None and finetune.epochs > 0
    if tuned:
        stage = {"kind": "finetune", "id": FINETUNE_ID, "label": "searched plan, KD fine-tuned",
                 "teacher": "dense", "train": _plain(finetune)}
        if kd is not None:
            stage["objective"] = _plain(kd)
        add(stage)
    if packed is not None and packed.get("share") is not None:
        stage = {"kind": "share_weights", "id": SHARE_ID, "label": "weights shared per layer (searched bits)",
                 "method": _plain(packed["share"])}
        if packed.get("share_train") is not None:
            stage.update(train=_plain(packed["share_train"]), teacher="dense")
            if kd is not None:
                stage["objective"] = _plain(kd)
        add(stage)
    if packed is not None:
        add({"kind": "pack", "id": PACK_ID})
    if quantize is not None:
        stages.append(quantize_stage(quantize, stages[-1]["id"] if stages else "dense", batch))
    stages += [{"kind": "evaluate", "latency": True, "latency_batch_sizes": [1, 256]}, {"kind": "export", "onnx": True}]
    return {"version": 2, "name": name, "seed": seed, "data": data, "models": {"dense": model_ref}, "stages": stages}


def _model_ref(model: nn.Module, weights: str) -> dict[str, Any]:
    spec = getattr(model, "torchslim_spec", None) or {}
    if not (spec.get("preset") or spec.get("factory")):
        raise ConfigError("the emitted recipe names the model by preset or factory: this model has no "
                          "torchslim_spec (build it with ts.models.create or pass recipe_model=)")
    ref = {k: spec[k] for k in ("preset", "factory", "args") if spec.get(k) is not None}
    return {**ref, "weights": weights}
