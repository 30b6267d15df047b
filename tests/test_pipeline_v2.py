"""Pipeline v2: stages alone (no runner), plan before run, the content store, chains, trust, locks.

Tiny models on scikit-learn's digits (8x8), one thread: every run takes seconds.
"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path

import pytest
import torch
import yaml

import torchslim as ts
from torchslim.data import load_dataset
from torchslim.pipeline import STAGES, RunDir, Store, load_recipe, parse_recipe, recipe_to_yaml, resume_run, run_recipe
from torchslim.pipeline.context import Output, RunContext
from torchslim.pipeline.store import content_key
from torchslim.prune import global_sparsity, masked_layers
from torchslim.train.loop import DistContext

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"epochs": 1, "lr": 0.003, "batch_size": 64}
TEACHER = {"preset": "fmnist_teacher", "args": {"width": 8, "fc": 32}}
STUDENT = {"preset": "fmnist_student", "args": {"width": 4, "fc": 16}}


def _v2(name: str, stages: list[dict], **models) -> dict:
    return {"version": 2, "name": name, "seed": 0, "threads": 1, "data": {"dataset": "digits", "val_fraction": 0.15},
            "models": models or {"teacher": TEACHER}, "stages": stages}


NO_LATENCY = {"kind": "evaluate", "latency": False}
NO_ONNX = {"kind": "export", "onnx": False}


# ----------------------------------------------------------------- stages alone
@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> RunContext:
    """A run context by hand: data, a store, two models; no runner."""
    folder = tmp_path_factory.mktemp("ctx")
    recipe = parse_recipe(_v2("alone", [], teacher=TEACHER, student=STUDENT))
    splits = load_dataset("digits", val_size=0.15, train_limit=256)
    context = RunContext(recipe, RunDir(folder), Store(folder / "store"), splits, torch.device("cpu"), DistContext(),
                         progress=False)
    for name, ref in recipe.models.items():
        torch.manual_seed(0)
        context.outputs[name] = Output(ts.models.create(ref.preset, input_size=8, **ref.args), name, name)
    return context


def _stage(ctx: RunContext, doc: dict, input_name: str = "teacher"):
    config = parse_recipe(_v2("one", [{"input": input_name, **doc}], teacher=TEACHER, student=STUDENT)).stages[0]
    stage = STAGES[config.kind](config, config.id, config.input)
    ctx.entry = ctx.store.entry(stage.id, content_key(config.to_dict(), time.time()))
    model = stage.plan(ctx, ctx.get(input_name).model)
    return stage, model


def test_train_and_distill_stages_alone(ctx):
    stage, model = _stage(ctx, {"kind": "train", "train": TRAIN}, "student")
    before = [p.clone() for p in model.parameters()]
    result = stage.run(ctx, model)
    assert [r["epoch"] for r in result.records] == [1] and result.report["epochs"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, result.model.parameters()))
    stage, model = _stage(ctx, {"kind": "distill", "teacher": "teacher", "train": TRAIN}, "student")
    result = stage.run(ctx, model)
    assert result.report["method"] == "kd" and "train_kd_loss" in ctx.live[-1]


@pytest.mark.parametrize("schedule", [{}, {"gradual": {"end": 0.5, "frequency": 1}},
                                      {"iterative": {"rounds": 2, "rewind_epoch": 0}}])
def test_prune_stage_alone_reaches_its_target_with_each_schedule(ctx, schedule):
    doc = {"kind": "prune", "method": {"sparsity": 0.7}, "schedule": schedule}
    if schedule:
        doc.update(train=TRAIN, teacher="teacher")
    stage, model = _stage(ctx, doc, "student")
    result = stage.run(ctx, model)
    assert global_sparsity(result.model, masked_layers(result.model)) == pytest.approx(0.7, abs=2e-3)
    assert result.report["schedule_name"] == (next(iter(schedule)) if schedule else "oneshot")


def test_prune_channels_and_finetune_and_export_stages_alone(ctx):
    stage, model = _stage(ctx, {"kind": "prune_channels", "method": {"ratio": 0.5, "steps": 2},
                                "between_steps": TRAIN, "teacher": "teacher"})
    result = stage.run(ctx, model)
    assert ts.measure.count_parameters(result.model) < ts.measure.count_parameters(model)
    assert result.report["report"]["params_after"] == ts.measure.count_parameters(result.model)
    stage, model = _stage(ctx, {"kind": "finetune", "train": TRAIN})
    assert stage.run(ctx, model).records[-1]["epoch"] == 1
    stage, model = _stage(ctx, {"kind": "export", "onnx": False})
    result = stage.run(ctx, model)
    assert result.files == ["model.slim"] and (ctx.entry.files / "model.slim").is_file()
    assert not result.produces_model


def test_evaluate_stage_alone_measures_the_named_models(ctx):
    stage, model = _stage(ctx, {"kind": "evaluate", "models": ["teacher", "student"], "latency": False})
    rows = stage.run(ctx, model).report["rows"]
    assert [r["key"] for r in rows] == ["teacher", "student"] and all(0 <= r["accuracy"] <= 1 for r in rows)


# ---------------------------------------------------------------- plan, store
def test_a_bad_name_in_the_last_stage_fails_in_plan_before_any_training(tmp_path):
    doc = _v2("typo", [{"kind": "train", "train": {**TRAIN, "epochs": 50}},
                       {"kind": "prune", "method": {"sparsity": 0.5, "overrides": {"no_such_layer": 0.9}}}])
    started = time.perf_counter()
    with pytest.raises(ts.ConfigError, match="no_such_layer"):
        run_recipe(parse_recipe(doc), out=tmp_path / "run", progress=False)
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "run").exists()  # nothing ran: the folder does not block a retry
    doc["stages"][1]["method"]["overrides"] = {}
    doc["stages"][0]["train"]["epochs"] = 1
    run_recipe(parse_recipe(doc), out=tmp_path / "run", progress=False)


def test_names_that_refer_to_nothing_fail_when_the_recipe_is_read():
    with pytest.raises(ts.ConfigError, match=r"stages\.0 \(distill\): 'techer' names no model"):
        parse_recipe(_v2("x", [{"kind": "distill", "teacher": "techer", "train": TRAIN}], teacher=TEACHER,
                             student=STUDENT))
    with pytest.raises(ts.ConfigError, match="used twice"):
        parse_recipe(_v2("x", [{"kind": "train", "id": "teacher", "train": TRAIN}]))
    with pytest.raises(ts.ConfigError, match="each stage needs 'kind'"):
        parse_recipe(_v2("x", [{"kind": "quantise"}]))


def _entries(run: Path) -> dict[str, float]:
    return {p.name: p.joinpath("result.json").stat().st_mtime_ns for p in (run / "store").iterdir()
            if (p / "result.json").is_file()}


CHAIN = [{"kind": "train", "id": "trained", "train": TRAIN},
         {"kind": "prune", "id": "pruned", "method": {"sparsity": 0.6}},
         {"kind": "finetune", "id": "finetuned", "teacher": "trained", "train": TRAIN}, NO_LATENCY, NO_ONNX]


def test_an_edited_finetune_re_runs_only_what_follows_it(tmp_path):
    run = run_recipe(parse_recipe(_v2("edit", CHAIN)), out=tmp_path / "run", progress=False)
    before = _entries(run)
    edited = yaml.safe_load((run / "recipe.yaml").read_text())
    edited["stages"][2]["train"]["lr"] = 0.01
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    resume_run(run, recipe=tmp_path / "edited.yaml", progress=False)
    after = _entries(run)
    new = {name.split("-")[0] for name in after.keys() - before.keys()}
    assert new == {"finetuned", "evaluate", "export"}
    assert all(after[name] == before[name] for name in before)  # nothing before the edit was written again
    assert load_recipe(run / "recipe.yaml").stages[2].train.lr == 0.01


def test_two_runs_share_a_prefix_through_a_store(tmp_path, capfd):
    store = tmp_path / "shared"
    run_recipe(parse_recipe(_v2("a", CHAIN)), out=tmp_path / "a", store=store, progress=False)
    other = [*CHAIN[:2], {**CHAIN[2], "train": {**TRAIN, "epochs": 2}}, *CHAIN[3:]]
    capfd.readouterr()
    run_recipe(parse_recipe(_v2("b", other)), out=tmp_path / "b", store=store, progress=False)
    err = capfd.readouterr().err
    assert "trained: done before" in err and "pruned: done before" in err and "finetuned: running" in err
    assert not (tmp_path / "b" / "store").exists() and RunDir(tmp_path / "b").store_path() == store.resolve()


def test_chains_channels_then_masks_and_prune_finetune_prune_finetune(tmp_path):
    doc = _v2("chain", [{"kind": "prune_channels", "method": {"ratio": 0.25}},
                        {"kind": "prune", "method": {"sparsity": 0.5}},
                        {"kind": "finetune", "teacher": "teacher", "train": TRAIN},
                        {"kind": "prune", "method": {"sparsity": 0.8}},
                        {"kind": "finetune", "train": TRAIN}, NO_LATENCY, {"kind": "export"}])
    run = run_recipe(parse_recipe(doc), out=tmp_path / "run", progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert [r["key"] for r in summary["rows"]] == ["teacher", "prune_channels", "prune", "finetune", "prune_2",
                                                   "finetune_2"]
    final = ts.load(run / "models" / "finetune_2.slim")
    assert global_sparsity(final, masked_layers(final)) == pytest.approx(0.8, abs=2e-3)
    assert ts.measure.count_parameters(final) < summary["rows"][0]["params"]
    # the exported file replays the channel removal, then holds the finalized zeros
    exported = ts.load(run / "model.slim")
    assert not masked_layers(exported) and ts.measure.count_parameters(exported) == summary["rows"][-1]["params"]


# ------------------------------------------------------------ recipes, migration
@pytest.mark.parametrize("name", ["fashion_mnist.yaml", "fmnist_channels.yaml", "fmnist_teacher.yaml"])
def test_each_former_v1_shipped_recipe_migrates_to_exactly_the_shipped_v2_one(name):
    # tests/data/v1_recipes holds the recipes as shipped in version 1: migrated, they are the same
    # recipe objects as the v2 files, so their runs give the same metrics.
    from torchslim.pipeline.recipe import read_recipe_document

    old = parse_recipe(read_recipe_document(ROOT / "tests/data/v1_recipes" / name), name, ROOT / "recipes")
    assert old == load_recipe(ROOT / "recipes" / name)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_shows_as_v2_and_reads_back(path):
    recipe = load_recipe(path)
    shown = yaml.safe_load(recipe_to_yaml(recipe))
    assert shown["version"] == 2 and [s["id"] for s in shown["stages"]] == recipe.stage_ids()
    assert parse_recipe(shown) == recipe
    assert recipe.stages[-1].kind == "export"


def test_a_written_recipe_reads_back_with_the_same_train_rules():
    # The run folder's recipe.yaml is what --resume reads: a train section must not come back with
    # fields it never gave (the pruned fine-tune would lose its 3x rate and flat_cosine).
    doc = {"version": 2, "models": {"m": {"preset": "lenet5"}},
           "stages": [{"kind": "prune", "id": "p", "input": "m", "method": {"sparsity": 0.5}},
                      {"kind": "finetune", "id": "f", "input": "p", "train": {"epochs": 2, "lr": 0.01}},
                      {"kind": "finetune", "id": "g", "input": "p", "train": {"epochs": 2}}]}
    recipe = parse_recipe(doc)
    shown = yaml.safe_load(recipe_to_yaml(recipe))
    assert shown["stages"][1]["train"] == {"epochs": 2, "lr": 0.01} and shown["stages"][2]["train"] == {"epochs": 2}
    back = parse_recipe(shown)
    assert back == recipe
    assert [s.train.for_pruned_model().lr for s in back.stages[1:]] == [0.01, 3e-3]
    assert back.stages[2].train.for_pruned_model().schedule == "flat_cosine"


def test_a_migrated_v1_train_section_keeps_only_what_it_gave():
    # Fields a v1 recipe left out stay out of its v2 stages, so the "not given" rules hold there
    # too: a fine-tune of pruned weights at 3x lr with flat_cosine, the short-run schedule.
    doc = {"student": {"model": {"preset": "lenet5"}, "baseline": {"epochs": 2}},
           "prune": {"sparsity": 0.5}, "finetune": {"train": {"epochs": 4, "batch_size": 64}}}
    stages = {s.kind: s for s in parse_recipe(doc).stages}
    tune = stages["finetune"].train
    assert tune.model_fields_set == {"epochs", "batch_size"}
    assert (tune.for_pruned_model().lr, tune.for_pruned_model().schedule) == (3 * tune.lr, "flat_cosine")
    assert stages["train"].train.model_fields_set == {"epochs"} and stages["train"].train.schedule == "constant"
    again = parse_recipe({**doc, "finetune": {"train": {"epochs": 4, "lr": 0.002}}})
    given = next(s for s in again.stages if s.kind == "finetune").train
    assert given.for_pruned_model().lr == 0.002


def test_v1_val_size_becomes_a_count_or_a_fraction():
    base = {"student": {"model": {"preset": "lenet5"}}}
    assert parse_recipe({**base, "data": {"val_size": 5000}}).data.val_size == 5000
    assert parse_recipe({**base, "data": {"val_size": 0.2}}).data.val_fraction == 0.2
    with pytest.raises(ts.ConfigError, match="not both"):
        parse_recipe({"version": 2, "models": {"m": {"preset": "lenet5"}}, "data": {"val_size": 10,
                                                                               "val_fraction": 0.1}})


# ------------------------------------------------------------ trust, lock, bounds
def test_resume_imports_a_run_folders_factory_only_when_trusted(tmp_path):
    (tmp_path / "mynet.py").write_text("import torchslim as ts\n"
                                       "def build():\n    return ts.models.create('lenet300_100', input_size=8, "
                                       "hidden1=8, hidden2=4)\n")
    doc = _v2("factory", [{"kind": "train", "train": TRAIN}, NO_LATENCY, NO_ONNX], net={"factory": "mynet:build"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    run = run_recipe(tmp_path / "r.yaml", out=tmp_path / "run", progress=False)  # beside the recipe: importable
    with pytest.raises(ts.ConfigError, match="pass --factory mynet:build"):
        resume_run(run, progress=False)
    resume_run(run, progress=False, trusted_factories=["mynet:build"])


def test_a_second_process_on_a_run_folder_is_refused(tmp_path):
    run = RunDir.create(tmp_path / "run", "x")
    with run.lock(), open(run.root / ".lock", "a+") as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ts.ConfigError, match="another torchslim process"):
            with RunDir(run.root).lock():
                pass


@pytest.mark.parametrize("text, match", [
    ("a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
     "g: [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n", "too large"),
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
])
def test_hostile_yaml_is_refused_quickly(tmp_path, text, match):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    # CPU seconds, not wall time: the bound catches a blow-up (minutes, gigabytes), not a
    # loaded machine; ~1.4 s here, so a machine 3x slower still passes.
    started = time.process_time()
    with pytest.raises(ts.ConfigError, match=match):
        load_recipe(path)
    assert time.process_time() - started < 10


def test_a_recipe_that_is_not_utf8_or_too_big_gets_one_line(tmp_path):
    (tmp_path / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ts.ConfigError, match="not UTF-8"):
        load_recipe(tmp_path / "latin.yaml")
    (tmp_path / "big.yaml").write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ts.ConfigError, match="too large for a recipe"):
        load_recipe(tmp_path / "big.yaml")
    doc = {"version": 2, "models": {"m": {"preset": "lenet5"}}, **{f"k{i}": i for i in range(1000)}}
    with pytest.raises(ts.ConfigError) as err:
        parse_recipe(doc)
    assert len(str(err.value).splitlines()) <= 23 and "more errors" in str(err.value)


def test_recipe_loggers_write_per_step_records_and_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    doc = {**_v2("logs", [{"kind": "train", "id": "trained", "train": {**TRAIN, "epochs": 2}}, NO_LATENCY, NO_ONNX]),
           "loggers": ["jsonl", "tensorboard"]}
    run = run_recipe(parse_recipe(doc), out=tmp_path / "run", progress=False)
    steps = [json.loads(line) for line in (run / "logs" / "log.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in steps} == {"step", "epoch"} and all(r["stage"] == "trained" for r in steps)
    (events,) = (run / "logs" / "tensorboard").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent)).Reload()
    assert any(t.startswith("trained/step/") for t in acc.Tags()["scalars"])
    logged = [e.value for e in acc.Scalars("trained/epoch/val_accuracy")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [r["val_accuracy"] for r in records if r.get("stage") == "trained" and "epoch" in r]
    assert logged == pytest.approx(expected, abs=1e-6) and len(logged) == 2


def test_validate_catches_preset_arguments_that_do_not_exist():
    with pytest.raises(ts.ConfigError, match=r"preset 'lenet300_100' has no argument\(s\) \['hidden9'\]"):
        parse_recipe({"version": 2, "models": {"m": {"preset": "lenet300_100", "args": {"hidden9": 3}}}})
