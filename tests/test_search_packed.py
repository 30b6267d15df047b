"""The sparsity and weight-sharing axes of the search (torchslim.search.packed).

The axes' pieces are checked on tiny models in milliseconds (choices, per-layer compression,
the allocation, byte predictions against the packed file); one digits search under a size
budget checks the whole path, and the slow tier replays its recipe with ``torchslim run``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import torchslim as ts
import torchslim.search as search
from torchslim.errors import ConfigError
from torchslim.search import Budget, SearchSpace
from torchslim.search.packed import (PackedTables, allocate_codes, bound_plans, code_choices, code_label, compress_,
                                     compressible_layers, knapsack_codes, packed_size, parse_code, resolve_axes)
from torchslim.quant.pack import packed_tensor_bytes
from torchslim.quant.sharing import WeightSharing, share_weights_
from torchslim.search.sensitivity import accuracy
from conftest import digits_teacher


def test_the_axes_default_on_under_a_size_bound_only_and_are_refused_under_other_budgets():
    assert resolve_axes(SearchSpace(), Budget(size_bytes=10_000)) == ([0.5, 0.75, 0.9, 0.95], [8, 5, 4, 3])
    assert resolve_axes(SearchSpace(), Budget(max_drop=0.5)) == ([], [])
    assert resolve_axes(SearchSpace(sparsity=[], share_bits=[]), Budget(size_bytes=1)) == ([], [])
    # one axis given: the other is off, not its default
    assert resolve_axes(SearchSpace(sparsity=[0.9, 0.5]), Budget(size_bytes=1)) == ([0.5, 0.9], [])
    with pytest.raises(ConfigError, match="size budget"):
        resolve_axes(SearchSpace(share_bits=[4]), Budget(latency=0.5))
    with pytest.raises(ValueError, match="sparsity choices"):
        SearchSpace(sparsity=[0.0])
    with pytest.raises(ValueError, match="share_bits"):
        SearchSpace(share_bits=[13])


def test_choices_start_with_the_untouched_layer_and_labels_round_trip():
    choices = code_choices([0.5], [4])
    assert choices == [(0.0, None), (0.0, 4), (0.5, None), (0.5, 4)]
    assert [code_label(c) for c in choices] == ["0/fp32", "0/4b", "0.5/fp32", "0.5/4b"]
    assert all(parse_code(code_label(c)) == c for c in choices)


def test_compress_prunes_and_shares_each_layer_as_told():
    torch.manual_seed(0)
    model = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
    first, second, last = compressible_layers(model)
    compress_(model, {first: (0.75, 3), second: (0.5, None), last: (0.0, None)})
    w1 = model.classifier[0].weight.detach()
    assert (w1 == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert len(torch.unique(w1[w1 != 0])) <= 8  # 3 bits: at most 8 centroids
    w2 = model.classifier[2].weight.detach()
    assert (w2 == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert len(torch.unique(w2[w2 != 0])) > 8  # float
    assert bool((model.classifier[4].weight != 0).all())


def test_packed_bytes_are_predicted_from_the_per_layer_streams(tmp_path):
    torch.manual_seed(0)
    model = ts.models.create("lenet300_100", hidden1=32, hidden2=16).eval()
    example = torch.zeros(2, 1, 28, 28)
    layers = compressible_layers(model)
    base_bytes, base_rows = packed_size(model, example, tmp_path)
    plan = {layers[0]: (0.9, 4), layers[1]: (0.5, 5), layers[2]: (0.0, None)}
    rows = {}
    for layer, code in plan.items():  # each layer alone, as the tables measure it
        alone = compress_(copy.deepcopy(model), {layer: code})
        rows[layer] = packed_size(alone, example, tmp_path)[1][f"{layer}.weight"]
        assert packed_tensor_bytes(alone, f"{layer}.weight") == rows[layer]  # the tables' shortcut, same bytes
    shared = copy.deepcopy(model)
    share_weights_(shared, WeightSharing(linear_bits=3))  # not finalized: both finalize a copy first
    name = f"{layers[0]}.weight"
    assert packed_tensor_bytes(shared, name) == packed_size(shared, example, tmp_path)[1][name]
    key = {layer: f"{layer}.weight" for layer in layers}
    tables = PackedTables("dense", {}, base_bytes, {g: {"0/fp32": 0.0, code_label(c): 0.0} for g, c in plan.items()},
                          {g: {"0/fp32": base_rows[key[g]], code_label(c): rows[g]} for g, c in plan.items()})
    predicted = tables.predict(plan)[1]
    measured = packed_size(compress_(copy.deepcopy(model), plan), example, tmp_path)[0]
    assert measured < base_bytes / 4
    assert abs(predicted - measured) <= 0.02 * measured  # only the compressed header differs


def test_the_allocation_runs_from_the_most_accurate_plan_to_the_smallest():
    choices = code_choices([0.5], [4])
    labels = [code_label(c) for c in choices]
    # layer a is cheap to compress (little drop), layer b costly: a goes first
    drop = {"a": dict(zip(labels, [0.0, 0.1, 0.2, 0.3])), "b": dict(zip(labels, [0.0, 2.0, 4.0, 8.0]))}
    size = {"a": dict(zip(labels, [1000, 300, 600, 150])), "b": dict(zip(labels, [1000, 300, 600, 150]))}
    tables = PackedTables("dense", {}, 2100, drop, size)
    plans = allocate_codes(tables, choices, 16)
    assert plans[0] == {"a": (0.0, None), "b": (0.0, None)}  # lambda 0: nothing costs accuracy
    assert plans[-1] == {"a": (0.5, 4), "b": (0.5, 4)}  # lambda infinite: the smallest choice everywhere
    sizes = [tables.predict(p)[1] for p in plans]
    assert sizes == sorted(sizes, reverse=True) and len(plans) >= 3
    assert any(p["a"] != (0.0, None) and p["b"] == (0.0, None) for p in plans)


@pytest.fixture(scope="module")
def searched(splits, tmp_path_factory):
    model = digits_teacher(splits.train, epochs=6)
    out = tmp_path_factory.mktemp("packed")
    space = SearchSpace(keep=[1.0, 0.5], bn_batches=1, max_candidates=2, precision=["fp32"], exclude=["features.3"],
                        sparsity=[0.5, 0.8], share_bits=[4], packed_bases=1)
    lines: list[str] = []
    r = search.search(model, splits.train, splits.val, Budget(size_bytes=8000, batch=16, latency_budget_s=0.01),
                      space, finetune=ts.TrainConfig(epochs=1, lr=3e-3), test=splits.test, out=out,
                      progress=lines.append, finalists=2, recipe_data={"dataset": "digits"})
    return r, out, lines


def test_a_size_bound_chooses_a_packed_file_within_it(searched, splits):
    r, out, lines = searched
    payload = json.loads((out / "pareto.json").read_text())
    assert r.chosen.precision == "packed" and r.chosen.bytes <= 8000
    assert r.metrics["bytes"] <= 8000 and r.metrics["fits"]
    # the shipped file is the one counted, and it loads back as the returned model
    assert (out / "model.packed.slim").stat().st_size == r.metrics["bytes"]
    again = ts.load(out / "model.packed.slim").eval()
    assert accuracy(again, splits.test.x, splits.test.y) == pytest.approx(r.metrics["test_accuracy"])
    # every fp32 ONNX file of this model is larger than the bound: only the packed axes reach it
    assert all(p.bytes > 8000 for p in r.points if p.precision == "fp32")
    assert [t["base"] for t in payload["packed_tables"]][0] == "dense" and payload["size_front"]
    assert any(p.source == "uniform" and p.precision == "packed" for p in r.points)
    assert any(line.startswith("packed sensitivity (dense)") for line in lines)
    assert "packed .slim" in r.summary()


def test_a_resumed_search_keeps_the_packed_tables_of_its_first_run(searched, splits):
    # Stage one comes back from the run folder's cache; the packed tables must come with it.
    r, out, _ = searched
    first = json.loads((out / "pareto.json").read_text())["packed_tables"]
    resumed_out = out.parent / "packed_resumed"
    resumed_out.mkdir(exist_ok=True)
    (resumed_out / "search_cache.json").write_text((out / "search_cache.json").read_text())
    model = digits_teacher(splits.train, epochs=6)
    space = SearchSpace(keep=[1.0, 0.5], bn_batches=1, max_candidates=2, precision=["fp32"], exclude=["features.3"],
                        sparsity=[0.5, 0.8], share_bits=[4], packed_bases=1)
    lines: list[str] = []
    search.search(model, splits.train, splits.val, Budget(size_bytes=8000, batch=16, latency_budget_s=0.01), space,
                  finetune=ts.TrainConfig(epochs=1, lr=3e-3), out=resumed_out, progress=lines.append, finalists=1,
                  recipe_data={"dataset": "digits"})
    assert any("reused from the run folder" in line for line in lines)
    assert not any(line.startswith("packed sensitivity") for line in lines)  # not rebuilt
    assert json.loads((resumed_out / "pareto.json").read_text())["packed_tables"] == first


def test_the_emitted_recipe_prunes_fine_tunes_shares_and_packs(searched):
    r, out, _ = searched
    kinds = [s["kind"] for s in r.recipe["stages"]]
    assert kinds[-4:] == ["share_weights", "pack", "evaluate", "export"] and "finetune" in kinds
    shared = next(s for s in r.recipe["stages"] if s["kind"] == "share_weights")
    assert shared["teacher"] == "dense" and shared["train"]["epochs"] == 1
    assert set(shared["method"]["overrides"]) == set(r.chosen.extra["packed"])
    # The recipe writes every field, so it carries what the search trained with: the pruned-model
    # rule (flat_cosine) for the weights' fine-tune and the centroids' alike.
    tuned = next(s for s in r.recipe["stages"] if s["kind"] == "finetune")
    assert (tuned["train"]["lr"], tuned["train"]["schedule"], shared["train"]["schedule"]) == \
        (3e-3, "flat_cosine", "flat_cosine")


def test_every_search_fine_tune_gets_the_pruned_model_rule_written_out():
    from torchslim.search.finalists import recovery_finetune
    from torchslim.train.config import PRUNED_LR_FACTOR

    plain = ts.TrainConfig(epochs=2)
    tuned = recovery_finetune(plain)
    assert (tuned.lr, tuned.schedule) == (plain.lr * PRUNED_LR_FACTOR, "flat_cosine")
    assert {"lr", "schedule"} <= tuned.model_fields_set  # written into the recipe, kept by its replay
    assert recovery_finetune(tuned) is tuned and recovery_finetune(None) is None
    given = ts.TrainConfig(epochs=2, lr=0.01, schedule="cosine")
    assert recovery_finetune(given) is given


def test_a_packed_axis_under_a_latency_budget_is_refused_before_anything_is_measured(splits):
    model = ts.models.create("fmnist_teacher", input_size=8, width=8, fc=32)
    with pytest.raises(ConfigError, match="size budget"):
        search.search(model, splits.train, splits.val, Budget(latency=0.5), SearchSpace(sparsity=[0.5]))


@pytest.mark.slow
def test_the_recipe_reproduces_the_packed_file(searched, splits, tmp_path):
    r, out, _ = searched
    run = ts.run_recipe(out / "recipe.yaml", out=tmp_path / "run", progress=False)
    again = ts.load(run / "model.packed.slim").eval()
    assert abs(100 * accuracy(again, splits.test.x, splits.test.y) - 100 * r.metrics["test_accuracy"]) <= 0.1
    # the run's packed file holds the data's normalization too: a few header bytes more
    assert abs((run / "model.packed.slim").stat().st_size - r.metrics["bytes"]) <= 200


def test_the_knapsack_finds_the_plan_at_the_bound_that_the_sweep_skips():
    choices = code_choices([0.5, 0.9], [])
    labels = [code_label(c) for c in choices]  # 0/fp32, 0.5/fp32, 0.9/fp32
    # 0.5 lies above the hull between 0 and 0.9 (8 points for half the bytes): the sweep jumps past it
    tables = PackedTables("dense", {}, 1100, {"a": dict(zip(labels, [0.0, 8.0, 9.0]))},
                          {"a": dict(zip(labels, [1000, 500, 100]))})
    swept = allocate_codes(tables, choices, 32)
    assert [p["a"] for p in swept] == [(0.0, None), (0.9, None)]
    assert knapsack_codes(tables, choices, 650) == {"a": (0.5, None)}  # 100 fixed + 500 of weights
    assert knapsack_codes(tables, choices, 1100) == {"a": (0.0, None)}
    assert knapsack_codes(tables, choices, 150) is None  # even the smallest plan is 200 bytes
    assert {p["a"] for p in bound_plans(tables, choices, 650)} == {(0.5, None), (0.9, None)}


def test_a_size_search_run_again_loads_its_packed_finalists(searched, splits, monkeypatch):
    import shutil

    import torchslim.search.finalists as finalists

    r, out, _ = searched
    again_out = out.parent / "packed_again"
    shutil.copytree(out, again_out)  # the run folder with its store, left as the first search wrote it
    calls: list[str] = []
    real = finalists.kd_finetune_
    monkeypatch.setattr(finalists, "kd_finetune_", lambda *a, **k: calls.append(k.get("stage")) or real(*a, **k))
    model = digits_teacher(splits.train, epochs=6)
    space = SearchSpace(keep=[1.0, 0.5], bn_batches=1, max_candidates=2, precision=["fp32"], exclude=["features.3"],
                        sparsity=[0.5, 0.8], share_bits=[4], packed_bases=1)
    again = search.search(model, splits.train, splits.val, Budget(size_bytes=8000, batch=16, latency_budget_s=0.01),
                          space, finetune=ts.TrainConfig(epochs=1, lr=3e-3), test=splits.test, out=again_out,
                          finalists=2, recipe_data={"dataset": "digits"})
    assert calls == []  # both fine-tunes of every packed finalist (masked, then the centroids) loaded
    assert again.chosen.extra["packed"] == r.chosen.extra["packed"] and again.chosen.plan == r.chosen.plan
    assert (again.metrics["val_accuracy"], again.metrics["bytes"], again.metrics["test_accuracy"]) == (
        r.metrics["val_accuracy"], r.metrics["bytes"], r.metrics["test_accuracy"])
    stages = {p.name.split("-")[0] for p in (again_out / "store").iterdir() if p.is_dir()}
    assert {"finetuned", "shared"} <= stages


def test_each_trial_under_a_size_bound_is_also_measured_as_a_packed_file(splits):
    pytest.importorskip("optuna")
    model = digits_teacher(splits.train, epochs=6)
    space = SearchSpace(keep=[1.0, 0.5], bn_batches=1, max_candidates=2, precision=["fp32"], exclude=["features.3"],
                        sparsity=[0.5, 0.8], share_bits=[4], packed_bases=1)
    lines: list[str] = []
    r = search.search(model, splits.train, splits.val, Budget(size_bytes=8000, batch=16, latency_budget_s=0.01),
                      space, trials=2, trial_finetune=ts.TrainConfig(epochs=1, batch_size=64), trial_samples=128,
                      finalists=0, progress=lines.append)
    trial_fp32 = [p for p in r.points if p.source == "trial" and p.precision == "fp32"]
    trial_packed = [p for p in r.points if p.source == "trial" and p.precision == "packed"]
    assert trial_fp32 and all(p.bytes > 8000 for p in trial_fp32)  # no fp32 file of this model meets the bound
    # Each measured trial has a packed twin: same plan and trial, its codes, its measured file within the bound
    # the codes were solved for (up to the per-layer byte scaling's error).
    assert {p.extra["trial"] for p in trial_packed} == {p.extra["trial"] for p in trial_fp32
                                                          if p.extra.get("duplicate_of") is None}
    for q in trial_packed:
        twin = next(p for p in trial_fp32 if p.extra["trial"] == q.extra["trial"])
        assert q.plan == twin.plan and set(q.extra["packed"]) and q.bytes < twin.bytes
    assert any("packed file of that model" in line for line in lines)
    # "best feasible so far" counts the stage-one packed files too (the only feasible points of stage one here).
    import re

    first = next(line for line in lines if line.startswith("[trial 1/"))
    stage_one = max(100 * p.accuracy for p in r.points if p.source != "trial" and p.bytes <= 8000)
    assert float(re.search(r"best feasible so far: ([\d.]+)%", first).group(1)) >= round(stage_one, 2)
