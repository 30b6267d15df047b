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
                    batch: int = 256) -> dict[str, Any]:
    """The v2 recipe of a chosen plan: prune_channels (the plan's overrides) → KD finetune → [quantize] →
    evaluate → export; ``quantize`` (an :class:`~torchslim.quant.Int8Config`) adds the int8 stage."""
    stages: list[dict[str, Any]] = [{"kind": "prune_channels", "id": PRUNE_ID, "input": "dense",
                                     "label": "channels removed (searched plan)", "method": _plain(method)}]
    if finetune is not None and finetune.epochs > 0:
        stage = {"kind": "finetune", "id": FINETUNE_ID, "input": PRUNE_ID, "label": "searched plan, KD fine-tuned",
                 "teacher": "dense", "train": _plain(finetune)}
        if kd is not None:
            stage["objective"] = _plain(kd)
        stages.append(stage)
    if quantize is not None:
        stages.append(quantize_stage(quantize, stages[-1]["id"], batch))
    stages += [{"kind": "evaluate", "latency": True, "latency_batch_sizes": [1, 256]}, {"kind": "export", "onnx": True}]
    return {"version": 2, "name": name, "seed": seed, "data": data, "models": {"dense": model_ref}, "stages": stages}


def _model_ref(model: nn.Module, weights: str) -> dict[str, Any]:
    spec = getattr(model, "torchslim_spec", None) or {}
    if not (spec.get("preset") or spec.get("factory")):
        raise ConfigError("the emitted recipe names the model by preset or factory: this model has no "
                          "torchslim_spec (build it with ts.models.create or pass recipe_model=)")
    ref = {k: spec[k] for k in ("preset", "factory", "args") if spec.get(k) is not None}
    return {**ref, "weights": weights}
