"""Version-1 recipes (fixed sections) turned into version-2 recipes (a list of stages).

The v1 document is validated with its own schema first (so its errors name
v1 key paths), then each section becomes one or two stages:

====================================  =================================================
v1                                    v2 stages (id: kind)
====================================  =================================================
``teacher.train``                     ``teacher: train`` (from model ``teacher_init``)
``student.baseline``                  ``student_alone: train``
``distill``                           ``distilled: distill`` (same batches as ``student_alone``)
``prune`` (masks)                     ``pruned: prune`` (one-shot, the report's "before fine-tuning" row)
``prune`` + ``finetune``, oneshot     ... then ``finetuned: finetune`` from ``pruned``
``prune`` + ``finetune``, gradual     ... and ``finetuned: prune`` with ``schedule.gradual``
``prune`` + ``finetune``, iterative   ... and ``finetuned: prune`` with ``schedule.iterative``
``prune.structured``                  ``pruned: prune_channels`` (+ ``between_steps``)
``evaluate``, ``export``              ``evaluate``, ``export``
====================================  =================================================

``val_size`` (a count when >= 1, else a fraction) becomes ``val_size`` or ``val_fraction``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchslim.pipeline.recipe_v1 import RecipeV1, StructuredPruneSectionV1

_V1_SECTIONS = {"teacher", "student", "distill", "prune", "finetune", "evaluate", "export"}


def is_v1(doc: dict[str, Any]) -> bool:
    """A document without ``version`` that has v1 sections (or no ``stages``) is a v1 recipe."""
    if "version" in doc:
        if doc["version"] == 1:
            return True
        return False
    return "stages" not in doc and "models" not in doc and bool(_V1_SECTIONS & set(doc) or not doc)


def _validate_v1(doc: dict[str, Any], source: str) -> RecipeV1:
    from torchslim.pipeline.recipe import validate_document  # noqa: PLC0415 (recipe imports this module)

    return validate_document(RecipeV1, {k: v for k, v in doc.items() if k != "version"}, source)


def _train(config: Any) -> dict[str, Any]:
    """A v1 ``train`` section as written: only the fields the recipe gave, so the v2 stage applies the
    same "not given" rules (the short-run schedule, a pruned model's fine-tune rate) as a v2 recipe."""
    return config.model_dump(mode="json", exclude_unset=True)


def _model(ref: Any, base_dir: Path | None) -> dict[str, Any]:
    out = ref.model_dump(mode="json", exclude_none=True)
    if base_dir is not None and out.get("weights") and not Path(out["weights"]).is_absolute():
        out["weights"] = str((base_dir / out["weights"]).resolve())
    if base_dir is not None and out.get("factory"):
        out.setdefault("path", str(base_dir.resolve()))
    return out


def migrate_v1(doc: dict[str, Any], source: str = "recipe", base_dir: Path | None = None) -> dict[str, Any]:
    """The v2 document of a v1 recipe document (see the module docstring)."""
    r = _validate_v1(doc, source)
    d = r.data
    data = d.model_dump(mode="json", exclude={"val_size"})
    data["val_size" if d.val_size >= 1 else "val_fraction"] = int(d.val_size) if d.val_size >= 1 else d.val_size
    out: dict[str, Any] = {"version": 2, "name": r.name, "seed": r.seed, "device": r.device,
                           "precision": r.precision, "threads": r.threads, "data": data, "models": {}}
    stages: list[dict[str, Any]] = []
    teacher = subject = None
    if r.teacher is not None:
        if r.teacher.model.weights is not None:
            out["models"]["teacher"] = _model(r.teacher.model, base_dir)
        else:
            out["models"]["teacher_init"] = {**_model(r.teacher.model, base_dir), "label": "teacher, untrained"}
            stages.append({"kind": "train", "id": "teacher", "input": "teacher_init", "label": "teacher",
                           "train": _train(r.teacher.train)})
        teacher = subject = "teacher"
    if r.student is not None:
        out["models"]["student"] = _model(r.student.model, base_dir)
        subject = "student"
        if r.student.baseline is not None:
            stages.append({"kind": "train", "id": "student_alone", "input": "student",
                           "label": "student, trained alone", "train": _train(r.student.baseline)})
            subject = "student_alone"
        if r.distill is not None:
            stage = {"kind": "distill", "id": "distilled", "input": "student", "teacher": teacher,
                     "label": "student, distilled", "objective": r.distill.distillation().model_dump(mode="json"),
                     "train": _train(r.distill.train)}
            if r.student.baseline is not None:  # the same batches as the baseline: a fair comparison
                stage.update(seed_of="student_alone", baseline="student_alone")
            stages.append(stage)
            subject = "distilled"
    stages += _prune_stages(r, subject, teacher)
    stages.append({"kind": "evaluate", **r.evaluate.model_dump(mode="json")})
    stages.append({"kind": "export", **r.export.model_dump(mode="json")})
    if r.student is not None and subject == "student":
        out["models"]["student"]["label"] = "student, as given"
    out["stages"] = stages
    return out


def _prune_stages(r: RecipeV1, subject: str | None, teacher: str | None) -> list[dict[str, Any]]:
    p, f = r.prune, r.finetune
    if p is None:
        return []
    source = None
    if f is not None and f.distill_from != "none":
        source = subject if f.distill_from == "unpruned" else teacher
    objective = f.distillation().model_dump(mode="json") if f is not None else None
    if isinstance(p, StructuredPruneSectionV1):
        between = p.finetune_epochs_between_steps if f is not None else 0
        stage: dict[str, Any] = {"kind": "prune_channels", "id": "pruned", "input": subject,
                                 "method": p.pruning_config().model_dump(mode="json"),
                                 "label": "channels removed, fine-tuned between steps only" if between
                                 else "channels removed, not fine-tuned"}
        if between:
            stage["between_steps"] = _train(f.train.model_copy(update={"epochs": between}))
            stage.update(teacher=source, objective=objective)
        stages = [stage]
        if f is not None:
            stages.append({"kind": "finetune", "id": "finetuned", "input": "pruned", "teacher": source,
                           "objective": objective, "train": _train(f.train),
                           "label": "channels removed + fine-tuned"})
        return stages
    method = p.pruning_config().model_dump(mode="json")
    sensitivity = None
    if p.sensitivity is not None:
        sensitivity = {"sparsities": p.sensitivity.sparsities, "max_samples": p.sensitivity.max_samples}
    oneshot = {"kind": "prune", "id": "pruned", "input": subject, "method": method,
               "label": "pruned one-shot, not fine-tuned", "sensitivity": sensitivity}
    stages = [oneshot]
    if f is None:
        return stages
    common = {"id": "finetuned", "teacher": source, "objective": objective, "label": "pruned + fine-tuned"}
    if p.schedule == "oneshot":
        stages.append({"kind": "finetune", "input": "pruned", "train": _train(f.train), **common})
    elif p.schedule == "gradual":
        gradual = {"start": p.gradual_start, "end": p.gradual_end, "frequency": p.gradual_frequency}
        stages.append({"kind": "prune", "input": subject, "method": method, "sensitivity": sensitivity,
                       "schedule": {"gradual": gradual}, "train": _train(f.train), **common})
    else:
        rounds = p.iterative.rounds
        per_round = _train(f.train.model_copy(update={"epochs": f.train.epochs // rounds}))
        stages.append({"kind": "prune", "input": subject, "method": method, "sensitivity": sensitivity,
                       "schedule": {"iterative": p.iterative.model_dump(mode="json")}, "train": per_round, **common})
    return stages
