"""Importance criteria, selection rules, N:M and the UnstructuredPruning config."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Split
from torchslim.errors import ConfigError
from torchslim.prune import (
    CRITERIA,
    ImportanceContext,
    MagnitudePruning,
    UnstructuredPruning,
    check_n_m,
    compute_scores,
    effective_weight,
    first_and_last,
    global_masks,
    global_sparsity,
    is_masked,
    is_n_m_sparse,
    layer_sparsity,
    mask_by_han,
    mask_n_m,
    masked_layers,
    prune_,
    register_criterion,
    unit_mean_scores,
)


def _planted_model() -> tuple[nn.Module, Split]:
    """Linear(8 -> 4 -> 3). Weight [0, 3] of the first layer is large but its input is always 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0, 3] = 5.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    x[:, 3] = 0.0
    return model, Split(x, torch.arange(64) % 3)


def _rank(scores: torch.Tensor, index: tuple[int, int]) -> int:
    """0 = lowest score (ties broken by position, as the selection functions do)."""
    order = torch.argsort(scores.flatten(), stable=True)
    flat = index[0] * scores.shape[1] + index[1]
    return int((order == flat).nonzero())


@pytest.mark.parametrize("criterion", ["l1", "l2", "lamp"])
def test_magnitude_criteria_rank_a_planted_small_weight_last(criterion):
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    with torch.no_grad():
        layer.weight[1, 4] = 1e-6
    scores = compute_scores([("fc", layer)], criterion, ImportanceContext())[0]
    assert _rank(scores, (1, 4)) == 0


def test_lamp_scores_by_hand_and_keep_a_small_weight_layer_alive_at_high_sparsity():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.5]]))
    scores = compute_scores([("fc", layer)], "lamp", ImportanceContext())[0].flatten().tolist()
    # squares 1, 4, 9, 0.25; each over the sum of the squares at least as large
    assert scores == pytest.approx([1 / 14, 4 / 13, 1.0, 0.25 / 14.25])

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        with torch.no_grad():
            m[2].weight.mul_(1e-3)  # a layer of small weights: global |w| takes it all first
        return m

    by_l1, by_lamp = model(), model()
    prune_(by_l1, UnstructuredPruning(sparsity=0.9, min_kept=0, criterion="l1"))
    prune_(by_lamp, UnstructuredPruning(sparsity=0.9, min_kept=0, criterion="lamp"))
    assert layer_sparsity(by_l1)["2"]["sparsity"] == 1.0
    assert layer_sparsity(by_lamp)["2"]["sparsity"] < 0.95
    assert global_sparsity(by_lamp) == pytest.approx(0.9, abs=1 / (64 * 64 + 64 * 8))


@pytest.mark.parametrize("criterion", ["taylor", "snip"])
def test_gradient_criteria_rank_a_large_weight_with_no_effect_last(criterion):
    model, data = _planted_model()
    layers = [("0", model[0]), ("2", model[2])]
    ctx = ImportanceContext.from_data(model, layers, data, batches=2, batch_size=32)
    scores = compute_scores(layers, criterion, ctx)[0]
    # The whole input-3 column has zero gradient; the planted weight is the largest of all
    # by magnitude, yet among the four lowest-ranked by sensitivity.
    assert _rank(scores, (0, 3)) < 4 and float(scores[0, 3]) == 0.0
    assert _rank(compute_scores(layers, "l1", ctx)[0], (0, 3)) == scores.numel() - 1
    prune_(model, UnstructuredPruning(criterion=criterion, sparsity=0.125, scope="layer", include=["0"]), data)
    assert model[0].weight[0, 3] == 0.0


def test_snip_scores_are_normalized_and_taylor_averages_absolute_values():
    model, data = _planted_model()
    layers = [("0", model[0]), ("2", model[2])]
    ctx = ImportanceContext.from_data(model, layers, data, batches=2, batch_size=32)
    snip = compute_scores(layers, "snip", ctx)
    assert sum(float(s.sum()) for s in snip) == pytest.approx(1.0)
    taylor, grad = ctx.taylor["0"], ctx.grad["0"]
    # |mean of w*g| <= mean of |w*g|: Taylor takes the absolute value per batch, SNIP after summing.
    assert torch.all((model[0].weight * grad).abs() <= taylor + 1e-7)


def test_gradient_context_leaves_the_model_untouched(tiny_cnn, blobs):
    tiny_cnn.eval()
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    rng = torch.get_rng_state()
    from torchslim.prune import select_layers

    ImportanceContext.from_data(tiny_cnn, select_layers(tiny_cnn), blobs, batches=3, batch_size=16)
    assert not tiny_cnn.training
    assert all(torch.equal(before[k], v) for k, v in tiny_cnn.state_dict().items())  # BatchNorm stats too
    assert all(p.grad is None for p in tiny_cnn.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_random_criterion_is_seeded_per_layer_and_prunes_exactly():
    layer = nn.Linear(10, 10)
    a = compute_scores([("fc", layer)], "random", ImportanceContext(seed=1))[0]
    b = compute_scores([("fc", layer)], "random", ImportanceContext(seed=1))[0]
    c = compute_scores([("fc", layer)], "random", ImportanceContext(seed=2))[0]
    d = compute_scores([("other", layer)], "random", ImportanceContext(seed=1))[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    model = nn.Sequential(nn.Linear(10, 10))
    prune_(model, UnstructuredPruning(criterion="random", sparsity=0.37))
    assert layer_sparsity(model)["0"]["zeros"] == 37


def test_structural_score_ranks_whole_units_together():
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0],    # mean |w| 1.0,  mean w^2 1.0
                                         [0.0, 0.0, 0.0, 3.5],    # mean |w| 0.875, mean w^2 3.06
                                         [2.0, 2.0, 2.0, 2.0]]))
    assert torch.equal(unit_mean_scores(layer.weight)[1], torch.full((4,), 0.875))
    by_l1 = nn.Sequential(layer)
    by_l2 = nn.Sequential(nn.Linear(4, 3, bias=False))
    by_l2[0].weight.data.copy_(layer.weight.data)
    prune_(by_l1, UnstructuredPruning(criterion="l1", structural=True, sparsity=4 / 12))
    prune_(by_l2, UnstructuredPruning(criterion="l2", structural=True, sparsity=4 / 12))
    # The 3.5 goes with its weak unit under L1; under L2 the all-ones unit is the weakest.
    assert by_l1[0].weight[1].abs().sum() == 0 and by_l1[0].weight[0].abs().sum() == 4
    assert by_l2[0].weight[0].abs().sum() == 0 and by_l2[0].weight[1, 3] == 3.5


def test_structural_score_on_conv_filters(tiny_cnn):
    prune_(tiny_cnn, UnstructuredPruning(structural=True, sparsity=0.5, scope="layer", include=["features.4"],
                                         min_kept=0))
    w = tiny_cnn.features[4].weight
    per_filter = (w.flatten(1) != 0).sum(1)
    assert set(per_filter.tolist()) <= {0, w[0].numel()}  # whole filters kept or removed
    assert int((per_filter == 0).sum()) == w.shape[0] // 2


def test_a_user_criterion_is_called_with_module_name_and_context():
    calls = []

    @register_criterion("test_planted_last")
    def planted(module, name, context):
        calls.append((name, context.seed))
        scores = torch.ones_like(effective_weight(module))
        if name == "1":
            scores[0, 0] = -1.0
        return scores

    try:
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
        prune_(model, UnstructuredPruning(criterion="test_planted_last", sparsity=1 / 18, seed=7))
        assert calls == [("0", 7), ("1", 7)]
        assert model[1].weight[0, 0] == 0 and int((model[0].weight == 0).sum()) == 0
    finally:
        CRITERIA.pop("test_planted_last")


def test_a_criterion_returning_the_wrong_shape_is_an_error():
    register_criterion("test_bad_shape")(lambda module, name, context: torch.ones(2))
    try:
        with pytest.raises(ConfigError, match="test_bad_shape.*shape"):
            prune_(nn.Sequential(nn.Linear(3, 3)), UnstructuredPruning(criterion="test_bad_shape"))
    finally:
        CRITERIA.pop("test_bad_shape")


def test_gradient_criteria_need_data(tiny_mlp):
    with pytest.raises(ConfigError, match="needs data"):
        prune_(tiny_mlp, UnstructuredPruning(criterion="taylor", sparsity=0.5))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=5), sparsity=st.floats(0.0, 0.99),
       min_kept=st.integers(0, 3), seed=st.integers(0, 1000))
def test_global_pruning_hits_the_target_within_one_weight(sizes, sparsity, min_kept, seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(n, 2, bias=False) for n in sizes])
    for layer in model:
        layer.weight.data = torch.randn(layer.weight.shape, generator=g) * float(torch.rand(1, generator=g)) * 3
    total = sum(2 * n for n in sizes)
    capacity = sum(max(0, 2 * n - min_kept) for n in sizes)
    if round(sparsity * total) > capacity:
        return  # unreachable target: tested separately
    prune_(model, UnstructuredPruning(sparsity=sparsity, min_kept=min_kept))
    stats = layer_sparsity(model)
    assert abs(sum(s["zeros"] for s in stats.values()) - sparsity * total) <= 0.5 + 1e-9
    assert all(s["total"] - s["zeros"] >= min(min_kept, s["total"]) for s in stats.values())


def test_min_kept_stops_a_layer_being_emptied_and_moves_the_rest_elsewhere():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 4))
    with torch.no_grad():
        model[1].weight.mul_(1e-3)  # every weight of the last layer ranks below the first's
    prune_(model, UnstructuredPruning(sparsity=0.5, min_kept=6, criterion="l1"))
    stats = layer_sparsity(model)
    assert stats["1"]["zeros"] == 40 - 6
    assert stats["0"]["zeros"] + stats["1"]["zeros"] == 120
    empty = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 4))
    with torch.no_grad():
        empty[1].weight.mul_(1e-3)
    prune_(empty, UnstructuredPruning(sparsity=0.5, min_kept=0, criterion="l1"))
    assert layer_sparsity(empty)["1"]["sparsity"] == 1.0


def test_min_kept_in_layer_scope_and_threshold_and_unreachable_global_target_warns():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    prune_(model, UnstructuredPruning(sparsity=0.99, scope="layer", min_kept=3))
    assert int((model[0].weight != 0).sum()) == 3
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    prune_(model, UnstructuredPruning(threshold=1e9, min_kept=2))
    assert int((model[0].weight != 0).sum()) == 2
    with pytest.warns(UserWarning, match="could remove only"):
        masks = global_masks([torch.rand(4), torch.rand(3)], 7, min_kept=1)
    assert [int(m.sum()) for m in masks] == [1, 1]


def test_overrides_by_exact_name_and_regex_with_precedence(tiny_cnn):
    cfg = UnstructuredPruning(sparsity=0.5, scope="layer", min_kept=0, overrides={
        "re:classifier\\..*": 0.25, "re:.*\\.2": 0.9, "classifier.2": 0.75, "features.0": None})
    prune_(tiny_cnn, cfg)
    stats = layer_sparsity(tiny_cnn)
    assert not is_masked(tiny_cnn.features[0])
    assert stats["features.4"]["zeros"] == round(0.5 * stats["features.4"]["total"])
    assert stats["classifier.0"]["zeros"] == round(0.25 * stats["classifier.0"]["total"])  # first regex
    assert stats["classifier.2"]["zeros"] == round(0.75 * stats["classifier.2"]["total"])  # exact name wins


def test_global_scope_with_overrides_hits_the_target_over_the_pooled_layers(tiny_mlp):
    prune_(tiny_mlp, UnstructuredPruning(sparsity=0.8, overrides={"classifier.4": 0.1}))
    stats = layer_sparsity(tiny_mlp)
    assert stats["classifier.4"]["zeros"] == round(0.1 * stats["classifier.4"]["total"])
    pooled = stats["classifier.0"]["total"] + stats["classifier.2"]["total"]
    assert stats["classifier.0"]["zeros"] + stats["classifier.2"]["zeros"] == round(0.8 * pooled)


def test_exclude_first_last(tiny_cnn):
    assert first_and_last(tiny_cnn) == ["features.0", "classifier.2"]
    prune_(tiny_cnn, UnstructuredPruning(sparsity=0.5, exclude_first_last=True))
    assert [n for n, _ in masked_layers(tiny_cnn)] == ["features.4", "classifier.0"]


def test_han_rule_thresholds_at_quality_times_the_layer_std(tiny_mlp):
    weights = {n: m.weight.detach().clone() for n, m in tiny_mlp.named_modules() if isinstance(m, nn.Linear)}
    prune_(tiny_mlp, UnstructuredPruning(han_quality=0.7, min_kept=0))
    for name, module in tiny_mlp.named_modules():
        if name in weights:
            w = weights[name]
            expected = w * (w.abs() >= 0.7 * w.std())
            assert torch.equal(module.weight, expected), name
            assert 0 < layer_sparsity(tiny_mlp)[name]["sparsity"] < 1
    assert mask_by_han(torch.tensor([2.0, -2.0, 0.5, 0.0]), 1.0).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_threshold_applies_to_the_criterion_scores():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, 0.5, -0.9]]))
    prune_(model, UnstructuredPruning(criterion="l2", threshold=0.25, min_kept=0))  # w^2 >= 0.25
    assert torch.equal(model[0].weight, torch.tensor([[0.0, 0.5, -0.9]]))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_n_m_masks_obey_n_m_on_linear_and_conv(n, m):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16, 8))
    prune_(model, UnstructuredPruning(n_m=(n, m), layer_types=["Conv2d", "Linear"]))
    assert check_n_m(model, n, m) == {"0": True, "2": True}
    assert global_sparsity(model) == pytest.approx(1 - n / m)
    # Groups run along input channels: each (out, kh, kw) position keeps n of every m channels.
    conv = model[0].weight.permute(0, 2, 3, 1).reshape(-1, m)
    assert torch.all((conv != 0).sum(1) == n)
    # The kept entries are the largest in each group.
    w = nn.Linear(m, 1).weight.detach()
    kept = mask_n_m(w.abs(), n, m).bool()
    assert w.abs()[kept].min() >= w.abs()[~kept].max()


def test_n_m_keeps_previous_zeros(tiny_mlp):
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    previous = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert mask_n_m(scores, 2, 4, previous).tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert not is_n_m_sparse(torch.ones(1, 4), 2, 4)
    prune_(tiny_mlp, UnstructuredPruning(sparsity=0.6))
    before = {n: m.weight_mask.clone() for n, m in masked_layers(tiny_mlp)}
    prune_(tiny_mlp, UnstructuredPruning(n_m=(2, 4)))
    for name, module in masked_layers(tiny_mlp):
        assert torch.all(module.weight_mask[before[name] == 0] == 0), name
    assert all(check_n_m(tiny_mlp, 2, 4).values())


def test_n_m_error_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 2))
    with pytest.raises(ConfigError, match="layer '1'.*not a multiple of M=4"):
        prune_(model, UnstructuredPruning(n_m=(2, 4)))
    prune_(model, UnstructuredPruning(n_m=(2, 4), exclude_first_last=False, exclude=["1"]))
    assert check_n_m(model, 2, 4) == {"0": True}


def test_magnitude_pruning_is_the_l1_special_case(tiny_cnn):
    import copy

    other = copy.deepcopy(tiny_cnn)
    prune_(tiny_cnn, MagnitudePruning(sparsity=0.7, exclude=["features.0"]))
    prune_(other, UnstructuredPruning(criterion="l1", sparsity=0.7, exclude=["features.0"], min_kept=0))
    for (n1, m1), (_, m2) in zip(masked_layers(tiny_cnn), masked_layers(other)):
        assert torch.equal(m1.weight_mask, m2.weight_mask), n1


@pytest.mark.parametrize("kwargs,match", [
    ({"criterion": "l3"}, r"criterion: unknown criterion 'l3'"),
    ({"sparsity": 1.0}, r"sparsity: Input should be less than 1"),
    ({"sparsity": 0.5, "threshold": 0.1}, r"exactly one of 'sparsity', 'threshold'"),
    ({"sparsity": None}, r"exactly one of"),
    ({"han_quality": -1.0}, r"han_quality: Input should be greater than 0"),
    ({"han_quality": 1.0, "criterion": "taylor"}, r"han_quality .*needs criterion 'l1' or 'l2'"),
    ({"n_m": (4, 2)}, r"n_m: N:M needs 1 <= N < M"),
    ({"n_m": (2, 4), "overrides": {"a": 0.5}}, r"with n_m, overrides may only be null"),
    ({"overrides": {"re:(": 0.5}}, r"overrides: bad regular expression"),
    ({"overrides": {"fc": 1.5}}, r"overrides: sparsity for 'fc' must be in \[0, 1\)"),
    ({"scope": "everywhere"}, r"scope: Input should be 'global' or 'layer'"),
    ({"layer_types": ["LSTM"]}, r"layer_types: unknown layer type 'LSTM'"),
    ({"min_kept": -1}, r"min_kept: Input should be greater than or equal to 0"),
    ({"exclude": ["re:["]}, r"exclude: bad regular expression"),
    ({"taylor_batches": 0}, r"taylor_batches"),
    ({"bogus": 1}, r"bogus: unknown key"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        UnstructuredPruning(**kwargs)


def test_sparsity_defaults_only_when_no_other_target_is_set():
    assert UnstructuredPruning().sparsity == 0.5
    assert UnstructuredPruning(threshold=0.1).sparsity is None
    assert UnstructuredPruning(n_m=[2, 4]).target == "n_m"
    from torchslim.config import config_from_dict

    for cfg in (UnstructuredPruning(han_quality=1.2), UnstructuredPruning(n_m=(2, 4), overrides={"fc": None})):
        assert config_from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------
# names that match nothing fail at once (issue 14 item 14), N:M checked up front
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field, pattern", [
    ({"overrides": {"no_such_layer": 0.5}}, "overrides", "'no_such_layer'"),
    ({"overrides": {"re:features\\..*": 0.5}}, "overrides", "'re:features"),
    ({"include": ["classifier.9"]}, "include", "'classifier.9'"),
    ({"include": ["re:conv.*"]}, "include", "'re:conv"),
    ({"exclude": ["classifer.0"]}, "exclude", "'classifer.0'"),
    ({"exclude": ["re:.*attn.*"]}, "exclude", "'re:.*attn"),
])
def test_a_name_or_pattern_matching_no_layer_fails_at_once(tiny_mlp, kwargs, field, pattern):
    config = UnstructuredPruning(sparsity=0.5, **kwargs)
    expected = rf"{field}: {pattern}.*matches no Linear/Conv2d layer.*classifier\.0, classifier\.2"
    from torchslim.prune import check_layer_names, check_pruning, pruning_layers

    for check in (check_layer_names, check_pruning, pruning_layers):
        with pytest.raises(ConfigError, match=expected):
            check(tiny_mlp, config)
    with pytest.raises(ConfigError, match=expected):
        prune_(tiny_mlp, config)
    assert not masked_layers(tiny_mlp)  # nothing was pruned before the error
    if "overrides" not in kwargs:  # MagnitudePruning shares the check
        magnitude = MagnitudePruning(sparsity=0.5, **kwargs)
        for check in (check_layer_names, lambda m, c: prune_(m, c)):
            with pytest.raises(ConfigError, match=expected):
                check(tiny_mlp, magnitude)


def test_a_module_of_another_type_is_named_as_such(tiny_mlp):
    with pytest.raises(ConfigError, match=r"'classifier\.1' is a ReLU, not one of layer_types"):
        prune_(tiny_mlp, UnstructuredPruning(exclude=["classifier.1"]))


def test_every_schedule_checks_names_before_it_trains(tiny_mlp, blobs):
    import torchslim as ts
    from torchslim.prune import (
        AGPSchedule,
        IterativeSchedule,
        SensitivityConfig,
        gradual_pruning_hook,
        prune_iteratively,
        sensitivity_analysis,
    )

    bad = UnstructuredPruning(sparsity=0.8, overrides={"re:fc.*": 0.5})
    with pytest.raises(ConfigError, match="matches no Linear/Conv2d layer"):
        gradual_pruning_hook(tiny_mlp, bad, AGPSchedule(final_sparsity=0.8, end_step=10, frequency=1))
    with pytest.raises(ConfigError, match="matches no Linear/Conv2d layer"):
        prune_iteratively(tiny_mlp, bad, blobs, ts.TrainConfig(epochs=1), IterativeSchedule(rounds=2))
    with pytest.raises(ConfigError, match="matches no Linear/Conv2d layer"):
        sensitivity_analysis(tiny_mlp, blobs, SensitivityConfig(pruning=bad))
    assert not masked_layers(tiny_mlp)


def test_n_m_divisibility_is_checked_before_pruning():
    from torchslim.prune import check_n_m_divisible, check_pruning

    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10), nn.Linear(10, 2))
    config = UnstructuredPruning(n_m=(2, 4))
    for check in (check_n_m_divisible, check_pruning):
        with pytest.raises(ConfigError, match=r"layers '2' \(input dimension 6\), '3' \(input dimension 10\) "
                                              r"have input dimensions, not a multiple of M=4"):
            check(model, config)
    ok = UnstructuredPruning(n_m=(2, 4), exclude=["2", "3"])
    check_pruning(model, ok)
    check_n_m_divisible(model, UnstructuredPruning(sparsity=0.5))  # no N:M: nothing to check
    prune_(model, ok)
    assert check_n_m(model, 2, 4) == {"0": True}
