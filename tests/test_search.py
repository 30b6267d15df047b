"""torchslim.search: budgets, the channel space, the Lagrangian front, measured points, the emitted recipe.

One tiny search (digits, a width-8 fmnist_teacher, 3 groups, keep 100% or 50%) is shared by the
module; timings use batch 16 and 10 ms of timing per point, so they are noisy but real.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import torchslim as ts
import torchslim.search as search
from torchslim.search import Budget, InfeasibleBudget, Point, SearchSpace, choose, pareto_front
from torchslim.search.sensitivity import accuracy
from torchslim.search.space import channel_groups, plan_config
from conftest import digits_teacher

DATA = {"dataset": "digits", "val_fraction": 0.1}


@pytest.fixture(scope="module")
def model(splits):
    return digits_teacher(splits.train, epochs=6)


@pytest.fixture(scope="module")
def result(model, splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto")
    # fp32 only: the int8 axis has its own tests (tests/test_search_precision.py)
    space = SearchSpace(keep=[1.0, 0.5], bn_batches=1, max_candidates=3, precision=["fp32"],
                        exclude=["features.3", "features.10"])
    lines: list[str] = []
    r = search.search(model, splits.train, splits.val, Budget(macs=0.8, batch=16, latency_budget_s=0.01), space,
                      finetune=ts.TrainConfig(epochs=1), test=splits.test, out=out, recipe_data=DATA,
                      progress=lines.append)
    return r, out, lines


def _point(acc: float, ratio: float, plan: dict | None = None) -> Point:
    return Point(plan or {"a": int(acc * 100), "b": int(ratio * 100)}, "sweep", acc, 0.0, ratio, ratio, ratio, 1, 1)


def test_budget_needs_exactly_one_objective():
    with pytest.raises(Exception, match="exactly one"):
        Budget()
    with pytest.raises(Exception, match="exactly one"):
        Budget(max_drop=0.5, latency=0.25)
    with pytest.raises(Exception, match="keep"):
        SearchSpace(keep=[1.0, 0.0])
    assert Budget(latency=0.25).objective == "latency"


def test_configs_round_trip():
    for cfg in (Budget(max_drop=0.5, batch=64), SearchSpace(keep=[1.0, 0.5], round_to=8, exclude=["re:fc.*"])):
        assert ts.config_from_dict(cfg.to_dict()) == cfg


def test_pareto_front_keeps_only_non_dominated_points():
    pts = [_point(0.9, 1.0), _point(0.8, 0.5), _point(0.7, 0.6), _point(0.85, 0.5), _point(0.5, 0.2)]
    front = pareto_front(pts)
    assert [(p.accuracy, p.latency_ratio) for p in front] == [(0.5, 0.2), (0.85, 0.5), (0.9, 1.0)]


def test_plan_config_cuts_exactly_the_planned_groups(model):
    x = torch.zeros(1, 1, 8, 8)
    groups = channel_groups(model, x, SearchSpace())
    keys = [g.key for g in groups]
    for g in groups:  # an override key must address its own group only
        assert sum(g.key in other.names for other in groups) == 1
    assert len(set(keys)) == len(keys)
    plan = {g.label: g.keeps[-1] for g in groups[1:3]}
    cut = ts.prune_channels(model, x, plan_config(groups, plan, SearchSpace())).model
    widths = {n: m.out_channels if hasattr(m, "out_channels") else getattr(m, "out_features", None)
              for n, m in cut.named_modules()}
    for g in groups:
        assert widths[g.label] == plan.get(g.label, g.size)


def test_front_is_non_dominated_and_every_point_measured(result):
    r, _, lines = result
    assert r.front and r.dense in r.points
    for p in r.front:
        assert p in r.points  # only measured points reach the front
        assert p.latency_p50_ms > 0 and p.latency_p90_ms >= p.latency_p50_ms * 0.5 and p.bytes > 0 and p.macs > 0
        assert not any(search.front.dominates(q, p) for q in r.points)
    assert {p.source for p in r.points} >= {"dense", "sweep", "uniform"}
    assert any(line.startswith("[1/") and "best feasible" in line for line in lines)
    assert r.prediction_error["points"] == len(r.points) - 1
    assert "chosen plan after fine-tuning" in r.summary()


def test_chosen_point_respects_the_budget(result, splits):
    r, _, _ = result
    assert r.chosen.macs <= 0.8 * r.dense.macs
    assert r.chosen in r.front
    assert ts.measure.count_macs(r.best, splits.test.x[:1]) == r.chosen.macs
    assert r.metrics["test_accuracy"] == pytest.approx(accuracy(r.best, splits.test.x, splits.test.y))


def test_infeasible_budget_names_the_nearest_points(result):
    r, _, _ = result
    with pytest.raises(InfeasibleBudget, match="nearest points of the front") as info:
        choose(r.points, Budget(latency=1e-6, batch=16), r.dense)
    assert info.value.nearest and all(p in r.front for p in info.value.nearest)
    assert f"{100 * info.value.nearest[0].accuracy:.2f}%" in str(info.value)


def test_outputs_written_and_recipe_parses(result):
    r, out, _ = result
    for name in ("pareto.json", "pareto.png", "model.slim", "model.onnx", "dense.slim", "recipe.yaml"):
        assert (out / name).is_file(), name
    payload = json.loads((out / "pareto.json").read_text())
    assert len(payload["front"]) == len(r.front) and payload["chosen"]["plan"] == r.chosen.plan
    doc = yaml.safe_load((out / "recipe.yaml").read_text())
    recipe = ts.pipeline.parse_recipe(doc, "recipe.yaml", base_dir=out)
    assert [s.kind for s in recipe.stages] == ["prune_channels", "finetune", "evaluate", "export"]
    assert recipe.stages[0].method.overrides == plan_config(r.groups, r.chosen.plan, SearchSpace()).overrides


def test_the_run_records_how_steady_the_timings_were(result):
    r, out, _ = result
    timing = json.loads((out / "pareto.json").read_text())["timing"]
    assert timing == r.timing and timing["dense_comparisons"] >= len([p for p in r.points if p.source != "dense"])
    assert timing["dense_median_ms"] > 0 and timing["cpus"] >= 1 and isinstance(timing["warnings"], list)
    assert [w for w in r.summary().splitlines() if w.startswith("warning:")] == [f"warning: {w}" for w in
                                                                                timing["warnings"]]


def test_a_busy_machine_or_a_moving_dense_timing_is_warned_about(model, splits, monkeypatch):
    import os

    from torchslim.search.sensitivity import Measurer

    m = Measurer(model, [], SearchSpace(), Budget(latency=0.5, threads=1), splits.train.x)
    m.dense_ms = [10.0] * 10
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    quiet = m.timing_report()
    assert quiet["dense_spread_p10_p90"] == 0 and quiet["warnings"] == []
    monkeypatch.setattr(os, "getloadavg", lambda: (quiet["cpus"] + 3.0, 0.0, 0.0))
    m.dense_ms = [10.0] * 3 + [14.0] * 7  # the same file 40 % slower in most comparisons
    busy = m.timing_report()
    assert busy["dense_spread_p10_p90"] == pytest.approx(0.4)
    assert [w.split(" ")[1] for w in busy["warnings"]] == ["machine", "dense"]


def test_cli_parses_budgets():
    from torchslim.cli.main import build_parser

    args = build_parser().parse_args(["auto", "m.slim", "--data", "digits", "--latency", "0.25x", "--batch", "64"])
    assert args.latency == 0.25 and args.batch == 64 and args.max_drop is None
    assert build_parser().parse_args(["auto", "m.slim", "--data", "digits", "--size", "50KB"]).size == 50_000
    packed = build_parser().parse_args(["auto", "m.slim", "--size", "5KB", "--sparsity", "0.5,0.9", "--share-bits", "none"])
    assert packed.sparsity == [0.5, 0.9] and packed.share_bits == []
    for flag, bad in (("--sparsity", "1.0"), ("--share-bits", "13"), ("--keep", "0")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["auto", "m.slim", "--size", "5KB", flag, bad])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["auto", "m.slim", "--data", "digits", "--max-drop", "0.5", "--latency", "0.25x"])


@pytest.mark.slow
def test_recipe_reproduces_the_chosen_model(result, splits, tmp_path):
    r, out, _ = result
    run = ts.run_recipe(out / "recipe.yaml", out=tmp_path / "run", progress=False)
    again = ts.load(run / "models" / "finetuned.slim").eval()
    assert abs(100 * accuracy(again, splits.test.x, splits.test.y) - 100 * r.metrics["test_accuracy"]) <= 0.1


@pytest.mark.slow
def test_cli_auto_end_to_end(model, tmp_path, capsys):
    from torchslim.cli.main import main

    ts.save(model, tmp_path / "m.slim")
    rc = main(["auto", str(tmp_path / "m.slim"), "--data", "digits", "--macs", "0.9x", "--batch", "16",
               "--keep", "1,0.5", "--max-candidates", "2", "--latency-budget", "0.01", "--exclude", "features.3",
               "features.7", "features.10", "--precision", "fp32", "--out", str(tmp_path / "auto")])
    printed = capsys.readouterr().out
    assert rc == 0 and "[1/" in printed and "reproduce with: torchslim run" in printed
    assert (tmp_path / "auto" / "recipe.yaml").is_file()


def test_trial_finetune_ranks_candidates_after_a_short_kd_finetune(model, splits):
    space = SearchSpace(keep=[1.0, 0.5], exclude=["re:features.*"], bn_batches=1, max_candidates=1,
                        precision=["fp32"])
    r = search.search(model, splits.train, splits.val, Budget(macs=1.0, batch=16, latency_budget_s=0.01), space,
                      uniform=False, trial_finetune=ts.TrainConfig(epochs=1, batch_size=64), trial_samples=128)
    cut = [p for p in r.points if p.source == "sweep"]
    assert [g.label for g in r.groups] == ["classifier.0"] and len(cut) == 1
    assert cut[0].extra["trial_finetune_epochs"] == 1 and r.dense.extra["trial_finetune_epochs"] == 0


def test_a_macs_bound_chooses_among_plans_timed_slower_than_the_dense_model(model, splits, monkeypatch):
    # Timing noise can put every cut plan of a tiny model above the dense one's latency, off the
    # latency front; the MACs bound is exact, so the plans that meet it must still be chosen from.
    real = search.Measurer.latency

    def slower(self, built):
        lat = real(self, built)
        return lat if built is self.dense else {**lat, "ratio": 1.2 * max(lat["ratio"], 1.0)}

    monkeypatch.setattr(search.Measurer, "latency", slower)
    space = SearchSpace(keep=[1.0, 0.5], bn_batches=1, max_candidates=2, precision=["fp32"],
                        exclude=["features.3", "features.10"])
    r = search.search(model, splits.train, splits.val, Budget(macs=0.9, batch=16, latency_budget_s=0.01), space,
                      uniform=False)
    assert [p.source for p in r.front] == ["dense"]  # every cut plan was timed slower
    assert r.chosen.source != "dense" and r.chosen.macs <= 0.9 * r.dense.macs



def test_global_plan_cuts_the_group_whose_channels_rank_lowest_across_groups():
    from torchslim.search.space import global_plan, uniform_plan

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    with torch.no_grad():
        net[0].weight.fill_(0.01)
        net[0].weight[:2] = 1.0  # two strong filters, six weak ones
        net[2].weight.zero_()  # the weights that read group 0 add nothing to its channels' scores
        net[5].weight.fill_(0.1)  # group 1's channels all alike
    space = SearchSpace(keep=[1.0, 0.75, 0.5, 0.25])
    example = torch.randn(1, 1, 8, 8)
    groups = channel_groups(net, example, space)
    assert [g.label for g in groups] == ["0", "2"]
    plan = global_plan(net, example, groups, 0.5, space)
    # Half of the 16 channels go, the lowest on mean-normalised scores first: group 0's six weak ones.
    assert plan == {"0": 2, "2": 6}
    assert uniform_plan(groups, 0.5) == {"0": 4, "2": 4}
    assert all(plan[g.label] in g.keeps for g in groups)


def test_the_search_measures_the_global_rankings_plans_too(model, splits):
    space = SearchSpace(keep=[1.0, 0.5], bn_batches=1, max_candidates=1, precision=["fp32"])
    r = search.search(model, splits.train, splits.val, Budget(macs=0.8, batch=16, latency_budget_s=0.01), space,
                      uniform=False)
    from torchslim.search.space import global_plan

    globals_ = [p for p in r.points if p.source == "global"]
    sweep = [p for p in r.points if p.source == "sweep"]
    expected = global_plan(model, splits.train.x[:1], r.groups, 0.5, space)
    assert len(sweep) == 1
    if expected == sweep[0].plan:  # never measured twice
        assert globals_ == []
    else:
        assert [p.plan for p in globals_] == [expected]
        assert globals_[0].macs < r.dense.macs and globals_[0].latency_ratio > 0
