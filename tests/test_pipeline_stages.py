"""The recipe's prune and distill options, run through the real pipeline on scikit-learn's digits.

Each recipe is tiny (8x8 images, a few epochs, one thread) so a run takes seconds;
what is checked is what the options promise: the schedule reached its target,
N:M holds, channels were physically removed, the loss parts were logged, the
cache was used, the report says so, and an interrupted run replays exactly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import torchslim as ts
from torchslim.pipeline import parse_recipe, resume_run, run_recipe
from torchslim.prune import check_n_m, global_sparsity, masked_layers

pytestmark = pytest.mark.e2e

TRAIN = {"epochs": 2, "lr": 0.003, "batch_size": 64}
BASE = {
    "seed": 0, "threads": 1,
    "data": {"dataset": "digits", "val_size": 0.15},
    "evaluate": {"latency": False},
    "export": {"onnx": False},
}
TEACHER = {"model": {"preset": "fmnist_teacher", "args": {"width": 8, "fc": 32}}, "train": {**TRAIN, "epochs": 3}}
STUDENT = {"model": {"preset": "fmnist_student", "args": {"width": 4, "fc": 16}}}


def _recipe(name: str, **sections) -> dict:
    return {"name": name, **BASE, **sections}


def _run(doc: dict, out: Path) -> tuple[Path, dict]:
    run = run_recipe(parse_recipe(doc), out=out, progress=False)
    return run, json.loads((run / "summary.json").read_text())


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entry(run: Path, stage: str) -> Path:
    """The store folder of a stage's output."""
    (found,) = (run / "store").glob(f"{stage}-*")
    return found


def _forget(run: Path, *stages: str, checkpoints: tuple[str, ...] = ()) -> None:
    """As if killed before ``stages`` finished: their stored results go, and the named checkpoints."""
    for stage in stages:
        (_entry(run, stage) / "result.json").unlink()
    for stage, name in checkpoints:
        (_entry(run, stage) / "work" / name).unlink()


def _report(summary: dict, stage: str) -> dict:
    return summary["stages"][stage]["report"]


# ------------------------------------------------------------------ unstructured
ITERATIVE = _recipe(
    "iterative", teacher=TEACHER,
    prune={"criterion": "taylor", "taylor_batches": 2, "sparsity": 0.8, "exclude_first_last": True,
           "schedule": "iterative", "iterative": {"rounds": 2, "rewind_epoch": 1},
           "sensitivity": {"sparsities": [0.5, 0.9], "max_samples": 100}},
    finetune={"distill_from": "unpruned", "train": {**TRAIN, "epochs": 4}},
)


@pytest.fixture(scope="module")
def iterative_run(tmp_path_factory) -> tuple[Path, dict]:
    return _run(ITERATIVE, tmp_path_factory.mktemp("iter") / "run")


def test_iterative_rounds_reach_the_target_with_rewinding_and_sensitivity(iterative_run):
    run, summary = iterative_run
    records = _records(run)
    rounds = [r for r in records if r.get("event") == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["target_sparsity"] < rounds[1]["target_sparsity"] == pytest.approx(0.8)
    # the rounds share the fine-tuning epochs: 4 epochs = 2 rounds x 2
    assert [r["epoch"] for r in records if r.get("stage") == "finetuned_round2" and "epoch" in r] == [1, 2]
    assert (_entry(run, "finetuned") / "work" / "rewind.safetensors").is_file()
    final = ts.load(run / "models" / "finetuned.slim")
    # sensitivity allocated per-layer sparsities whose total is the target
    assert global_sparsity(final, masked_layers(final)) == pytest.approx(0.8, abs=2e-3)
    assert set(_report(summary, "finetuned")["sensitivity"]["allocated"]) == {n for n, _ in masked_layers(final)}
    # first and last layers were excluded, and the report says so
    names = [n for n, m in final.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert names[0] not in dict(masked_layers(final)) and names[-1] not in dict(masked_layers(final))
    report = (run / "report.md").read_text()
    assert "first-order Taylor" in report and "iterative, 2 prune→retrain rounds" in report
    assert f"`{names[0]}`" in report.split("Left unpruned by the selection:")[1].splitlines()[0]
    assert "| round | target sparsity | reached |" in report
    for name in ("sensitivity.md", "sensitivity.json", "plots/sensitivity.png"):
        assert (run / name).is_file(), name


def test_an_iterative_run_interrupted_in_its_last_round_resumes_to_the_same_model(iterative_run, tmp_path):
    run, summary = iterative_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    # As if killed during round 2: its checkpoint and everything after it are gone.
    _forget(copy, "finetuned", "evaluate", "export", checkpoints=(("finetuned", "finetuned_round2.pt"),))
    for name in ("summary.json", "report.md", "model.slim"):
        (copy / name).unlink()
    resume_run(copy, progress=False)
    again = json.loads((copy / "summary.json").read_text())
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in summary["rows"]]
    a = ts.load(run / "models" / "finetuned.slim").state_dict()
    b = ts.load(copy / "models" / "finetuned.slim").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the replayed round 1 is listed once
    assert [r["round"] for r in _records(copy) if r.get("event") == "round"] == [1, 2]


class _Killed(Exception):
    pass


def _kill_in_round1_after_epoch(epoch: int, out: Path, monkeypatch) -> None:
    """Run ITERATIVE into ``out``, dying right after round 1's epoch ``epoch`` (its files all written)."""
    import torchslim.pipeline.context as runner_module

    real_fit = runner_module.fit

    def fit_killed(*args, stage=None, on_epoch_end=None, **kwargs):
        def hook(record):
            on_epoch_end(record)  # checkpoint, metrics and the rewinding snapshot are written first
            if stage == "finetuned_round1" and record["epoch"] == epoch:
                raise _Killed

        return real_fit(*args, stage=stage, on_epoch_end=hook, **kwargs)

    monkeypatch.setattr(runner_module, "fit", fit_killed)
    with pytest.raises(_Killed):
        run_recipe(parse_recipe(ITERATIVE), out=out, progress=False)
    monkeypatch.undo()


@pytest.mark.parametrize("snapshot_written", [True, False])
def test_an_iterative_run_killed_after_its_rewinding_epoch_still_rewinds(iterative_run, tmp_path, monkeypatch,
                                                                          snapshot_written):
    run, summary = iterative_run
    out = tmp_path / "killed"
    _kill_in_round1_after_epoch(1, out, monkeypatch)  # rewind_epoch is 1
    assert (_entry(out, "finetuned") / "work" / "rewind.safetensors").is_file()
    if not snapshot_written:  # killed after the epoch's checkpoint, before the snapshot's file
        (_entry(out, "finetuned") / "work" / "rewind.safetensors").unlink()
    resume_run(out, progress=False)
    a = ts.load(run / "models" / "finetuned.slim").state_dict()
    b = ts.load(out / "models" / "finetuned.slim").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lost_rewinding_snapshot_that_cannot_be_recovered_says_what_to_delete(tmp_path, monkeypatch):
    out = tmp_path / "killed"
    _kill_in_round1_after_epoch(2, out, monkeypatch)
    (_entry(out, "finetuned") / "work" / "rewind.safetensors").unlink()
    with pytest.raises(ts.TrainingError, match=r"delete .*finetuned_round1\.pt and resume"):
        resume_run(out, progress=False)


def test_a_student_pruned_as_given_is_the_reports_reference(tmp_path):
    doc = _recipe("as_given", teacher=TEACHER, student=STUDENT, prune={"sparsity": 0.5},
                  finetune={"distill_from": "teacher", "train": TRAIN})
    run, summary = _run(doc, tmp_path / "run")
    rows = {r["key"]: r for r in summary["rows"]}
    assert _report(summary, "pruned")["input"] == "student" and "student" in rows
    drop = 100 * (rows["finetuned"]["accuracy"] - rows["student"]["accuracy"])
    assert f"after fine-tuning (`finetuned`) {drop:+.2f} points against the unpruned `student`" in \
        (run / "report.md").read_text()


def test_n_m_pruning_from_a_recipe_keeps_at_most_n_of_every_m(tmp_path):
    doc = _recipe("nm", student={"model": {"preset": "lenet300_100", "args": {"hidden1": 32, "hidden2": 16}},
                                 "baseline": TRAIN},
                  prune={"n_m": [2, 4], "exclude_first_last": False},
                  finetune={"distill_from": "none", "train": TRAIN})
    run, summary = _run(doc, tmp_path / "run")
    final = ts.load(run / "models" / "finetuned.slim")
    assert all(check_n_m(final, 2, 4).values()) and len(check_n_m(final, 2, 4)) == 3
    assert _report(summary, "pruned")["global_sparsity"] == pytest.approx(0.5)
    assert "2:4 semi-structured" in (run / "report.md").read_text()


# -------------------------------------------------------------------- structured
STRUCTURED = _recipe("channels", teacher=TEACHER,
                     prune={"structured": True, "target_macs": 0.5, "steps": 2, "importance": "l2",
                            "finetune_epochs_between_steps": 1},
                     finetune={"distill_from": "unpruned", "train": TRAIN},
                     evaluate={"latency": True, "latency_batch_sizes": [1, 64], "latency_budget_s": 0.02})


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory) -> tuple[Path, dict]:
    return _run(STRUCTURED, tmp_path_factory.mktemp("channels") / "run")


def test_structured_prune_stage_removes_channels_and_reports_the_cost(structured_run):
    run, summary = structured_run
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows["finetuned"]["macs"] <= 0.5 * rows["teacher"]["macs"]
    assert rows["finetuned"]["params"] < rows["teacher"]["params"]
    assert rows["finetuned"]["file_bytes"] < rows["teacher"]["file_bytes"]
    report = _report(summary, "pruned")["report"]
    assert report["target_met"] and len(report["steps"]) == 2
    # fine-tuned between the two steps, with the unpruned model as teacher
    between = [r for r in _records(run) if r.get("stage") == "pruned_step1"]
    assert [r["epoch"] for r in between if "epoch" in r] == [1] and "train_kd_loss" in between[0]
    # the pruned model is an ordinary smaller model that reloads from its file
    final = ts.load(run / "model.slim")
    assert not masked_layers(final) and ts.measure.count_parameters(final) == rows["finetuned"]["params"]
    text = (run / "report.md").read_text()
    assert "## Structured pruning" in text and "| fastest pass b=64 (ms) |" in text
    assert "channels removed + fine-tuned" in text


# ------------------------------------------------------------------ distillation
def test_distill_objective_from_a_recipe_logs_each_part_and_caches_the_teacher(tmp_path):
    doc = _recipe("dkd", teacher=TEACHER, student={**STUDENT, "baseline": TRAIN},
                  distill={"objective": {"logits": {"method": "dkd", "nckd_weight": 1.0},
                                         "hints": {"layers": {"features": "features"}}},
                           "train": TRAIN})
    run, summary = _run(doc, tmp_path / "run")
    epochs = [r for r in _records(run) if r.get("stage") == "distilled" and "epoch" in r]
    for part in ("train_task_loss", "train_tckd_loss", "train_nckd_loss", "train_hint_loss"):
        assert all(part in r for r in epochs), part
    distilled = _report(summary, "distilled")
    assert distilled["method"] == "dkd+hints" and distilled["teacher_outputs_used"] == "cached"
    assert list((run / "store" / "cache").glob("teacher-outputs-*.safetensors"))
    # the hint adapter was trained with the student and is not part of the result
    keys = ts.load(run / "models" / "distilled.slim").state_dict().keys()
    assert not any("adapter" in k for k in keys)
    text = (run / "report.md").read_text()
    assert "Decoupled KD (DKD) + FitNets hints from `teacher`, T = 1.0" in text and "| tckd_loss |" in text
    assert (run / "plots" / "distilled_loss_parts.png").is_file()


@pytest.mark.parametrize("doc, match", [
    (_recipe("x", teacher=TEACHER, student=STUDENT,
             distill={"kd": {"temperature": 2}, "objective": {"logits": {"method": "dkd"}}, "train": TRAIN}),
     "set 'kd' .* or 'objective'"),
    (_recipe("x", teacher=TEACHER, prune={"sparsity": 0.5, "schedule": "iterative", "iterative": {"rounds": 3}},
             finetune={"train": {**TRAIN, "epochs": 4}}), r"rounds \(3\) must divide finetune.train.epochs \(4\)"),
    (_recipe("x", teacher=TEACHER, prune={"structured": True, "finetune_epochs_between_steps": 1, "steps": 2}),
     "uses the 'finetune' section"),
    (_recipe("x", teacher=TEACHER, prune={"structured": "yes"}), "prune: 'structured' must be true or false"),
    (_recipe("x", teacher=TEACHER, prune={"structured": True, "sparsity": 0.5}), r"prune\.sparsity: unknown key"),
    (_recipe("x", teacher=TEACHER, prune={"criterion": "magnitud"}), r"prune\.criterion: unknown criterion"),
    (_recipe("x", teacher=TEACHER, prune={"threshold": 0.1, "schedule": "gradual"}, finetune={"train": TRAIN}),
     "ramps a target 'sparsity'"),
    (_recipe("x", teacher=TEACHER, prune={"sparsity": 0.5, "sensitivity": {"sparsities": [0.9, 0.5]}}),
     r"prune\.sensitivity\.sparsities: sparsities must be strictly increasing"),
    (_recipe("x", teacher=TEACHER, prune={"structured": True, "finetune_epochs_between_steps": 1},
             finetune={"train": TRAIN}), "set steps >= 2"),
    (_recipe("x", teacher=TEACHER, prune={"schedule": "iterative", "iterative": {"rounds": 2, "rewind_epoch": 3}},
             finetune={"train": {**TRAIN, "epochs": 4}}), r"rewind_epoch \(3\) is past a round's 2 epochs"),
    (_recipe("x", teacher=TEACHER, student=STUDENT,
             distill={"objective": {"logits": {"method": 1}}, "train": TRAIN}), "logits.method must be 'kd' or 'dkd'"),
    (_recipe("x", teacher=TEACHER, evaluate={"latency_batch_sizes": [0]}), r"evaluate\.latency_batch_sizes\.0"),
])
def test_bad_prune_and_distill_sections_name_the_problem(doc, match):
    with pytest.raises(ts.ConfigError, match=match):
        parse_recipe(doc)


# ------------------------------------------------------------------- sensitivity
@pytest.mark.slow  # a subprocess or a long example: CI runs it
def test_sensitivity_cli_analyses_the_model_before_pruning_and_leaves_it_unchanged(tmp_path):
    doc = _recipe("sens", teacher=TEACHER, prune={"sparsity": 0.8})
    recipe = tmp_path / "sens.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "torchslim", "sensitivity", str(recipe), "--out", str(out),
           "--sparsities", "0.5,0.9", "--target", "0.8", "--max-samples", "100"]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| layer | weights | 50% | 90% |" in result.stdout
    allocation = yaml.safe_load(result.stdout.split("'prune:' use them as\n")[1].split("# or")[0])["overrides"]
    teacher_file = out / "models" / "teacher.slim"
    before = _sha(teacher_file)
    model = ts.load(teacher_file)
    assert set(allocation) == {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    data = json.loads((out / "sensitivity_sweep.json").read_text())
    assert data["sparsities"] == [0.5, 0.9]
    # again on the same run folder: the finished teacher is reused, not retrained or rewritten
    again = subprocess.run([sys.executable, "-m", "torchslim", "sensitivity", "--run", str(out),
                            "--sparsities", "0.5,0.9"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "teacher: done before, loading it from the store" in again.stderr and _sha(teacher_file) == before


def test_a_structured_run_interrupted_between_steps_resumes_to_the_same_model(structured_run, tmp_path):
    run, summary = structured_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    # As if killed while fine-tuning after the first step: the cut is redone (it is
    # deterministic), its fine-tuning resumes from its checkpoint, and the rest runs again.
    _forget(copy, "pruned", "finetuned", "evaluate", "export", checkpoints=(("finetuned", "finetuned.pt"),))
    for name in ("summary.json", "report.md", "model.slim"):
        (copy / name).unlink()
    resume_run(copy, progress=False)
    again = json.loads((copy / "summary.json").read_text())
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in summary["rows"]]
    a = ts.load(run / "model.slim").state_dict()
    b = ts.load(copy / "model.slim").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
