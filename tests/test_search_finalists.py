"""The final choice decided by the full fine-tune (torchslim.search.finalists).

The bisection and the bound's choice are checked with a fake fine-tune (what each point
recovers to is given), then one tiny digits search checks that the finalists are fine-tuned
as the chosen model is and that the choice respects the budget after that fine-tune.
"""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts
import torchslim.search as search
from torchslim.errors import ConfigError
from torchslim.search import Budget, Point, SearchSpace
from torchslim.search.finalists import best_within_bound, bisect_drop, drop_candidates
from torchslim.search.sensitivity import accuracy
from conftest import digits_teacher


def _p(ratio: float, drop: float, precision: str = "fp32", source: str = "sweep", plan: dict | None = None) -> Point:
    plan = plan if plan is not None else {"g": int(ratio * 1000)}
    return Point(plan, source, 0.9 - drop / 100, drop, ratio, ratio, ratio, 1, 1, precision=precision)


def _fake(recovered: dict[float, float], calls: list[float]):
    """A fine-tune that brings the point at latency ratio r to ``recovered[r]`` points of drop."""
    def evaluate(p: Point):
        calls.append(p.latency_ratio)
        drop = recovered[p.latency_ratio]
        return object(), {"val_accuracy": 0.9 - drop / 100, "val_drop": drop}, None
    return evaluate


def test_candidates_are_the_front_faster_than_the_proxy_choice_fastest_first():
    dense = _p(1.0, 0.0, source="dense", plan={"g": 8})
    proxy = _p(0.6, 0.3)
    fast = [_p(0.3, 4.0), _p(0.2, 9.0), _p(0.45, 1.5)]
    cands = drop_candidates([dense, proxy, *fast], [dense, proxy, *fast], proxy)
    assert [c.latency_ratio for c in cands] == [0.2, 0.3, 0.45]
    # no feasible proxy choice: every cut point of the front, the dense model still excluded
    assert [c.latency_ratio for c in drop_candidates([dense, proxy, *fast], [dense], None)] == [0.2, 0.3, 0.45, 0.6]


def test_a_point_the_proxy_puts_within_its_noise_of_the_front_is_a_candidate_too():
    fast, slow = _p(0.234, 2.82), _p(0.339, 1.68)
    near, far = _p(0.296, 2.90), _p(0.266, 3.60)  # 0.08 and 0.78 proxy points behind the 0.234x plan
    cands = drop_candidates([fast, slow], [fast, slow, near, far], None)
    assert [c.latency_ratio for c in cands] == [0.234, 0.296, 0.339]
    assert [c.latency_ratio for c in drop_candidates([fast, slow], [fast, slow, near, far], None, margin=0.0)] == \
        [0.234, 0.339]


def test_an_int8_candidate_within_noise_of_its_fp32_twin_gives_way_to_it():
    twin = _p(0.50, 2.0, plan={"g": 3})
    q8 = _p(0.49, 2.1, precision="int8", plan={"g": 3})  # 2 % faster: timing noise
    fast8 = _p(0.30, 2.5, precision="int8", plan={"g": 5})
    cands = drop_candidates([q8, fast8], [twin, q8, fast8], None)
    assert [(c.precision, c.latency_ratio) for c in cands] == [("int8", 0.30), ("fp32", 0.50)]


def test_candidates_within_timing_noise_count_as_one_latency():
    # 0.226x and 0.229x (1.3 % apart) are one latency: the proxy's more accurate one is kept
    near = [_p(0.226, 2.6), _p(0.229, 1.9), _p(0.30, 1.5), _p(0.139, 3.9)]
    cands = drop_candidates(near, near, None)
    assert [(c.latency_ratio, c.drop) for c in cands] == [(0.139, 3.9), (0.229, 1.9), (0.30, 1.5)]
    assert len(drop_candidates(near, near, None, noise=0.0)) == 4


def test_bisection_finds_the_fastest_candidate_within_the_drop_in_log_probes():
    ratios = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    recovered = {0.1: 3.0, 0.2: 1.9, 0.3: 0.8, 0.4: 0.45, 0.5: 0.3, 0.6: 0.2, 0.7: 0.1}
    calls: list[float] = []
    best, tried = bisect_drop([_p(r, 5.0) for r in ratios], 0.5, _fake(recovered, calls), 3, lambda s: None)
    assert best is not None and best.point.latency_ratio == 0.4
    assert calls == [0.4, 0.2, 0.3] and len(tried) == 3
    assert [f.feasible for f in tried] == [True, False, False]
    assert tried[0].record()["val_drop"] == 0.45 and tried[0].record()["proxy_drop"] == 5.0


def test_once_both_sides_are_probed_the_next_probe_is_where_the_measured_drops_cross_the_budget():
    # The first probe lands just outside the drop: a bisection would spend its last probe halfway
    # back (0.35x); the line through the two measured drops points at the crossing (0.3x).
    recovered = {0.1: 5.0, 0.15: 3.0, 0.2: 1.5, 0.234: 0.9, 0.26: 0.55, 0.3: 0.3, 0.35: 0.1, 0.442: 0.0, 0.514: -0.14}
    calls: list[float] = []
    best, tried = bisect_drop([_p(r, 5.0) for r in recovered], 0.5, _fake(recovered, calls), 3, lambda s: None)
    assert calls == [0.26, 0.442, 0.3] and best is not None and best.point.latency_ratio == 0.3
    # Few candidates between the probes: the nearest to the crossing (0.53x), not the first above it.
    recovered = {0.05: 9.0, 0.1: 6.0, 0.2: 3.0, 0.3: 1.5, 0.434: 0.68, 0.474: 0.16, 0.804: -0.2, 0.893: -0.18,
                 0.95: -0.2}
    calls = []
    best, _ = bisect_drop([_p(r, 5.0) for r in recovered], 0.5, _fake(recovered, calls), 3, lambda s: None)
    assert calls == [0.434, 0.893, 0.474] and best is not None and best.point.latency_ratio == 0.474


def test_bisection_stops_at_k_probes_and_reports_none_when_nothing_recovers():
    calls: list[float] = []
    recovered = {r: 2.0 for r in (0.1, 0.2, 0.3, 0.4, 0.5)}
    best, tried = bisect_drop([_p(r, 4.0) for r in recovered], 0.5, _fake(recovered, calls), 2, lambda s: None)
    assert best is None and len(calls) == 2 and not any(f.feasible for f in tried)
    assert bisect_drop([], 0.5, _fake({}, []), 3, lambda s: None) == (None, [])


def test_under_a_bound_the_best_after_the_fine_tune_wins_not_the_best_proxy():
    pts = [_p(0.20, 1.0), _p(0.22, 2.0), _p(0.24, 3.0), _p(1.0, 0.0, source="dense")]
    calls: list[float] = []
    best, tried = best_within_bound(pts, _fake({0.20: 0.9, 0.22: 0.4, 0.24: 0.6}, calls), 2, lambda s: None)
    assert calls == [0.20, 0.22]  # the 2 best by the proxy, the dense model never fine-tuned
    assert best is not None and best.point.latency_ratio == 0.22


@pytest.fixture(scope="module")
def model(splits):
    return digits_teacher(splits.train, epochs=6)


def test_search_checks_the_drop_after_the_full_fine_tune(model, splits, tmp_path):
    space = SearchSpace(keep=[1.0, 0.5, 0.25], bn_batches=1, max_candidates=4, precision=["fp32"],
                        exclude=["features.3"])
    finetune = ts.TrainConfig(epochs=2, lr=3e-3)
    lines: list[str] = []
    r = search.search(model, splits.train, splits.val, Budget(max_drop=1.0, batch=16, latency_budget_s=0.01), space,
                      finetune=finetune, test=splits.test, out=tmp_path, progress=lines.append, finalists=2,
                      uniform=False)
    payload = json.loads((tmp_path / "pareto.json").read_text())
    records = payload["finalists"]
    assert r.metrics["finalists"] == len(records) >= 1
    assert sum(line.startswith("finalist ") for line in lines) == len(records)
    assert all(rec["proxy_drop"] > 1.0 for rec in records)  # only points the proxy alone would have refused
    # the shipped model is the one scored: its validation accuracy is what the choice used
    assert r.metrics["val_accuracy"] == pytest.approx(accuracy(r.best, splits.val.x, splits.val.y))
    assert r.metrics["test_accuracy"] == pytest.approx(accuracy(r.best, splits.test.x, splits.test.y))
    if r.metrics["chosen_by"] == "full fine-tune":
        assert r.metrics["val_drop"] <= 1.0 and r.chosen.drop > 1.0
        assert any(rec["feasible"] and rec["plan"] == r.chosen.plan for rec in records)
    else:
        assert not any(rec["feasible"] for rec in records) and r.chosen.drop <= 1.0


def test_finalists_must_not_be_negative(model, splits):
    with pytest.raises(ConfigError, match="finalists"):
        search.search(model, splits.train, splits.val, Budget(max_drop=1.0), SearchSpace(), finalists=-1)


def test_cli_auto_takes_a_recipe_runs_it_once_and_searches_its_final_model(tmp_path, capsys):
    """``torchslim auto RECIPE``: the recipe trains the dense model (into RUN_DIR/base), its data is the search's."""
    import yaml

    from torchslim.cli.main import main

    doc = {"version": 2, "name": "base", "seed": 0, "threads": 1, "data": {"dataset": "digits", "val_fraction": 0.1},
           "models": {"net": {"preset": "fmnist_teacher", "args": {"width": 8, "fc": 32}}},
           "stages": [{"kind": "train", "id": "trained", "input": "net",
                       "train": {"epochs": 2, "lr": 0.003, "batch_size": 64}},
                      {"kind": "export", "onnx": False}]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(doc))
    out = tmp_path / "auto"
    args = ["auto", str(tmp_path / "base.yaml"), "--macs", "0.9x", "--batch", "16", "--keep", "1,0.5",
            "--max-candidates", "2", "--latency-budget", "0.01", "--exclude", "features.3", "features.7",
            "features.10", "--precision", "fp32", "--finetune-epochs", "0", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "running" in printed and (out / "base" / "model.slim").is_file()
    emitted = yaml.safe_load((out / "recipe.yaml").read_text())
    assert emitted["data"] == {"dataset": "digits", "val_fraction": 0.1} and emitted["seed"] == 0
    dense = ts.load(out / "dense.slim")  # the recipe's trained model is what the search cut
    trained = ts.load(out / "base" / "model.slim")
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), trained.state_dict().values()))
    # resumed: the recipe is not run again
    assert main(["auto", "--resume", str(out)]) == 0
    assert "running" not in capsys.readouterr().out
    assert main(["auto", str(tmp_path / "base.yaml"), "--data", "digits", "--macs", "0.9x"]) != 0
    assert "is a recipe: its data section gives the data; drop --data" in capsys.readouterr().err
