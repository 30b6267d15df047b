"""torchslim.search.finetunes: trial and finalist fine-tunes kept in the pipeline's content store.

Tiny on purpose: digits, a width-8 fmnist_teacher, two searchable groups with 3 widths each,
trial fine-tunes of 64 samples, 10 ms of timing per point.
"""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
import torchslim.search as search
import torchslim.search.finalists as finalists
from torchslim.errors import ConfigError
from torchslim.search import Budget, SearchSpace
from torchslim.search.finetunes import FinetuneStore
from torchslim.search.recipe import FINETUNE_ID
from torchslim.search.space import plan_key
from conftest import digits_teacher

SPACE = SearchSpace(keep=[1.0, 0.75, 0.5], bn_batches=1, max_candidates=2, precision=["fp32"],
                    exclude=["features.0", "features.3", "features.7"])
TUNE = ts.TrainConfig(epochs=1, batch_size=32)
KW = {"trial_finetune": TUNE, "trial_samples": 64, "finetune": TUNE, "finalists": 1}


@pytest.fixture(scope="module")
def model(splits):
    return digits_teacher(splits.train, epochs=4)


def _counting(monkeypatch) -> list[str]:
    """The stages of every fine-tune that really trains from now on."""
    calls: list[str] = []
    real = finalists.kd_finetune_

    def counted(*args, **kwargs):
        calls.append(kwargs["stage"])
        return real(*args, **kwargs)

    monkeypatch.setattr(finalists, "kd_finetune_", counted)
    return calls


def _cut_points(result) -> dict[str, float]:
    return {plan_key(p.plan): p.accuracy for p in result.points if p.source != "dense"}


@pytest.mark.slow
def test_searches_under_other_budgets_share_the_fine_tunes_of_one_store(model, splits, tmp_path, monkeypatch):
    store = tmp_path / "store"
    first = search.search(model, splits.train, splits.val, Budget(max_drop=5.0, batch=16, latency_budget_s=0.01),
                          SPACE, out=tmp_path / "a", store=store, **KW)
    calls = _counting(monkeypatch)
    second = search.search(model, splits.train, splits.val, Budget(latency=1.0, batch=16, latency_budget_s=0.01),
                           SPACE, out=tmp_path / "b", store=store, **KW)
    a, b = _cut_points(first), _cut_points(second)
    common = set(a) & set(b)
    assert common  # the uniform plans are measured by both
    # A plan the first search fine-tuned is loaded, not trained again: the same weights, the same accuracy.
    assert calls.count("trial") == len(set(b) - set(a))
    assert {k: b[k] for k in common} == {k: a[k] for k in common}
    assert len(list(store.glob("trial-*"))) == len(set(a) | set(b))
    assert not (tmp_path / "a" / "store").exists() and (store / "cache").is_dir()  # one teacher cache for all


def test_a_search_run_again_loads_its_finalists_instead_of_training_them(model, splits, tmp_path, monkeypatch):
    # A MACs bound: exact, so a cut plan is chosen and fine-tuned as a finalist whatever the timings
    # (under an accuracy budget the proxy's choice can be the fastest point, leaving no finalist).
    budget = Budget(macs=0.9, batch=16, latency_budget_s=0.01)
    first = search.search(model, splits.train, splits.val, budget, SPACE, out=tmp_path, test=splits.test, **KW)
    assert list((tmp_path / "store").glob(f"{FINETUNE_ID}-*/files/weights.safetensors"))  # the default store: RUN_DIR/store
    calls = _counting(monkeypatch)
    again = search.search(model, splits.train, splits.val, budget, SPACE, out=tmp_path, test=splits.test, **KW)
    assert calls == []  # stage one from the run folder's cache, every fine-tune from the store
    assert again.chosen.plan == first.chosen.plan
    assert again.metrics["val_accuracy"] == first.metrics["val_accuracy"]
    assert again.metrics["test_accuracy"] == first.metrics["test_accuracy"]


def test_a_damaged_stored_fine_tune_names_its_folder(model, tmp_path):
    fs = FinetuneStore(tmp_path, model, SPACE)
    x = torch.randn(8, 1, 8, 8)
    split = type("Split", (), {"x": x, "y": torch.zeros(8, dtype=torch.long)})()
    made = fs.get("trial", {"g": 4}, split, None, TUNE, None, 0, lambda: torch.nn.Linear(2, 2), lambda m, d: [])
    assert fs.made == 1 and isinstance(made, torch.nn.Linear)
    again = fs.get("trial", {"g": 4}, split, None, TUNE, None, 0, lambda: torch.nn.Linear(2, 2),
                   lambda m, d: pytest.fail("a stored fine-tune ran again"))
    assert fs.loaded == 1 and torch.equal(again.weight, made.weight)
    (weights,) = tmp_path.glob("trial-*/files/weights.safetensors")
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"delete that folder"):
        fs.get("trial", {"g": 4}, split, None, TUNE, None, 0, lambda: torch.nn.Linear(2, 2), lambda m, d: [])
    other = fs.key("trial", {"g": 2}, split, None, TUNE, None, 0)
    assert other != fs.key("trial", {"g": 4}, split, None, TUNE, None, 0)
    assert other != fs.key("trial", {"g": 2}, split, None, TUNE, None, 1)  # the seed is part of the key


def test_a_point_is_finished_for_a_run_without_a_store(model, splits):
    # benchmarks/auto_compression.py finishes points with its own namespace (no store): it must work.
    from types import SimpleNamespace

    from torchslim.search.finalists import finish_point
    from torchslim.search.space import channel_groups

    groups = channel_groups(model, splits.train.x[:1], SPACE)
    budget = Budget(max_drop=5.0, batch=16, latency_budget_s=0.01)
    m = search.Measurer(model, groups, SPACE, budget, splits.train.x)
    run = SimpleNamespace(m=m, dense_acc=0.9, int8_cfg=None, budget=budget)
    plan = {g.label: g.keeps[-1] for g in groups}
    point = search.Point(plan, "sweep", 0.5, 40.0, 1.0, 1.0, 0.5, 1, 1)
    tuned, metrics, quantized = finish_point(run, point, splits.train, splits.val, TUNE, None, 0)
    assert quantized is None and metrics["finetune_epochs"] == 1
    assert metrics["val_accuracy"] == pytest.approx(search.sensitivity.accuracy(tuned, splits.val.x, splits.val.y))
