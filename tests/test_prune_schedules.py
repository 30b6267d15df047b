"""Schedules: gradual (AGP) with any criterion, iterative rounds, rewinding; no resurrection."""

from __future__ import annotations

import copy

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.prune import (
    AGPSchedule,
    IterativeSchedule,
    MagnitudePruning,
    UnstructuredPruning,
    at_sparsity,
    global_sparsity,
    gradual_pruning_hook,
    layer_sparsity,
    masked_layers,
    prune_,
    prune_iteratively,
    rewind_,
    snapshot_weights,
)
from torchslim.train import TrainConfig, fit


def _masks(model):
    return {n: m.weight_mask.clone() for n, m in masked_layers(model)}


def _assert_no_resurrection(model, earlier):
    for name, module in masked_layers(model):
        if name in earlier:
            gone = earlier[name] == 0
            assert torch.all(module.weight_mask[gone] == 0), name
            assert torch.all(module.weight[gone] == 0), name


def test_agp_endpoints_and_midpoint_follow_the_formula():
    s = AGPSchedule(initial_sparsity=0.2, final_sparsity=0.8, start_step=10, end_step=50, frequency=5)
    assert s.sparsity_at(10) == 0.2 and s.sparsity_at(50) == 0.8
    assert s.sparsity_at(30) == pytest.approx(0.8 + (0.2 - 0.8) * (1 - 20 / 40) ** 3)
    assert s.sparsity_at(20) == pytest.approx(0.8 + (0.2 - 0.8) * (1 - 10 / 40) ** 3)


def test_gradual_pruning_uses_the_given_criterion(tiny_mlp):
    cfg = UnstructuredPruning(criterion="random", sparsity=0.9, seed=3)
    one_shot = copy.deepcopy(tiny_mlp)
    prune_(one_shot, cfg)
    hook = gradual_pruning_hook(tiny_mlp, cfg, AGPSchedule(final_sparsity=0.9, end_step=40, frequency=10))
    seen = []
    for step in range(1, 41):
        hook(step)
        seen.append(global_sparsity(tiny_mlp))
    assert seen[8] < seen[18] < seen[28] < seen[39] == pytest.approx(0.9, abs=1e-3)
    # Random scores are fixed per layer, so the gradual masks nest into the one-shot mask.
    for (name, a), (_, b) in zip(masked_layers(tiny_mlp), masked_layers(one_shot)):
        assert torch.equal(a.weight_mask, b.weight_mask), name


def test_gradual_pruning_ramps_overrides_and_refuses_non_sparsity_targets(tiny_mlp):
    cfg = UnstructuredPruning(sparsity=0.8, overrides={"classifier.4": 0.4}, min_kept=0)
    half = at_sparsity(cfg, 0.4, 0.8)
    assert half.sparsity == 0.4 and half.overrides == {"classifier.4": 0.2}
    hook = gradual_pruning_hook(tiny_mlp, cfg, AGPSchedule(final_sparsity=0.8, end_step=10, frequency=10))
    hook(10)
    assert layer_sparsity(tiny_mlp)["classifier.4"]["zeros"] == round(0.4 * 32)
    with pytest.raises(ConfigError, match="set by 'sparsity', not by 'threshold'"):
        gradual_pruning_hook(tiny_mlp, UnstructuredPruning(threshold=0.1), AGPSchedule(final_sparsity=0.5, end_step=5))
    with pytest.raises(ConfigError, match="needs data"):
        gradual_pruning_hook(tiny_mlp, UnstructuredPruning(criterion="taylor"), AGPSchedule(final_sparsity=0.5, end_step=5))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gradual_pruning_in_fit_never_resurrects_through_momentum_or_decay(tiny_mlp, blobs, optimizer):
    cfg = UnstructuredPruning(criterion="taylor", sparsity=0.85, taylor_batches=2, taylor_batch_size=32)
    inner = gradual_pruning_hook(tiny_mlp, cfg, AGPSchedule(final_sparsity=0.85, end_step=12, frequency=2), blobs)
    history = []

    def hook(step):
        inner(step)
        if masked_layers(tiny_mlp):
            _assert_no_resurrection(tiny_mlp, history[-1] if history else {})
            history.append(_masks(tiny_mlp))

    train = TrainConfig(epochs=2, batch_size=32, optimizer=optimizer, lr=0.05, momentum=0.9, weight_decay=0.1)
    fit(tiny_mlp, blobs, train, on_step_end=hook, progress=False)
    tiny_mlp(blobs.x[:2])
    _assert_no_resurrection(tiny_mlp, history[0])
    _assert_no_resurrection(tiny_mlp, history[-1])
    assert global_sparsity(tiny_mlp) == pytest.approx(0.85, abs=1e-3)


def test_magnitude_config_still_drives_the_hook(tiny_mlp):
    hook = gradual_pruning_hook(tiny_mlp, MagnitudePruning(sparsity=0.5), AGPSchedule(final_sparsity=0.5, end_step=4))
    hook(4)
    assert global_sparsity(tiny_mlp) == pytest.approx(0.5, abs=1e-3)


def test_iterative_schedule_ramps():
    geometric = IterativeSchedule(rounds=4)
    assert [round(geometric.sparsity_after(k, 0.9375), 6) for k in range(1, 5)] == [0.5, 0.75, 0.875, 0.9375]
    assert IterativeSchedule(rounds=2, ramp="linear").sparsity_after(1, 0.8) == pytest.approx(0.4)
    assert IterativeSchedule(rounds=2, ramp="cubic").sparsity_after(1, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    with pytest.raises(ConfigError, match="rounds"):
        IterativeSchedule(rounds=0)


def test_iterative_rounds_hit_each_target_and_never_resurrect(tiny_mlp, blobs):
    rounds, masks = [], []

    def on_round_end(summary):
        rounds.append(summary)
        if masks:
            _assert_no_resurrection(tiny_mlp, masks[-1])
        masks.append(_masks(tiny_mlp))

    train = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.05)
    history = prune_iteratively(tiny_mlp, UnstructuredPruning(sparsity=0.875, min_kept=0), blobs, train,
                                IterativeSchedule(rounds=3), val=blobs, on_round_end=on_round_end)
    assert [r["round"] for r in history] == [1, 2, 3]
    assert [round(r["sparsity"], 3) for r in rounds] == [0.5, 0.75, 0.875]
    assert all("val_accuracy" in r for r in rounds)
    _assert_no_resurrection(tiny_mlp, masks[0])


def test_rewinding_restores_kept_weights_and_keeps_pruned_ones_zero(tiny_mlp, blobs):
    early = snapshot_weights(tiny_mlp)
    fit(tiny_mlp, blobs, TrainConfig(epochs=1, batch_size=32), progress=False)
    prune_iteratively(tiny_mlp, UnstructuredPruning(sparsity=0.75), blobs, TrainConfig(epochs=0),
                      IterativeSchedule(rounds=2), rewind_to=early)
    for name, module in masked_layers(tiny_mlp):
        kept = module.weight_mask.bool()
        assert torch.equal(module.weight_orig[kept], early[f"{name}.weight"][kept])
        assert torch.all(module.weight[~kept] == 0) and torch.all(module.weight_orig[~kept] == 0)
        assert torch.equal(module.bias, early[f"{name}.bias"])
    assert global_sparsity(tiny_mlp) == pytest.approx(0.75, abs=1e-3)


def test_rewinding_then_training_never_resurrects(tiny_mlp, blobs):
    early = tiny_mlp.state_dict()  # a plain state dict works as well as a snapshot
    early = {k: v.clone() for k, v in early.items()}
    train = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.1)
    masks = []
    prune_iteratively(tiny_mlp, UnstructuredPruning(sparsity=0.8), blobs, train, IterativeSchedule(rounds=3),
                      rewind_to=early, on_round_end=lambda s: masks.append(_masks(tiny_mlp)))
    tiny_mlp(blobs.x[:2])
    _assert_no_resurrection(tiny_mlp, masks[0])
    _assert_no_resurrection(tiny_mlp, masks[1])


def test_late_rewinding_matches_the_same_steps_done_by_hand(tiny_mlp, blobs):
    cfg = UnstructuredPruning(sparsity=0.75)
    schedule = IterativeSchedule(rounds=2, rewind_epoch=1)
    train = TrainConfig(epochs=2, batch_size=64)
    by_hand = copy.deepcopy(tiny_mlp)

    prune_iteratively(tiny_mlp, cfg, blobs, train, schedule)

    from torchslim.prune import WeightSnapshot

    prune_(by_hand, at_sparsity(cfg, schedule.sparsity_after(1, 0.75)))
    snap = WeightSnapshot(by_hand, epoch=1)
    fit(by_hand, blobs, train, seed=1, on_epoch_end=snap, progress=False)
    prune_(by_hand, at_sparsity(cfg, 0.75))
    rewind_(by_hand, snap.state)
    fit(by_hand, blobs, train, seed=2, progress=False)
    for (name, a), (_, b) in zip(masked_layers(tiny_mlp), masked_layers(by_hand)):
        assert torch.equal(a.weight, b.weight), name


def test_rewind_rejects_a_snapshot_of_another_model(tiny_mlp, tiny_cnn):
    with pytest.raises(ConfigError, match="cannot rewind"):
        rewind_(tiny_mlp, snapshot_weights(tiny_cnn))


def test_iterative_with_a_threshold_config_applies_it_every_round(tiny_mlp, blobs):
    prune_iteratively(tiny_mlp, UnstructuredPruning(han_quality=0.5), blobs, TrainConfig(epochs=0),
                      IterativeSchedule(rounds=2))
    assert 0 < global_sparsity(tiny_mlp) < 1


def test_agp_over_places_the_ramp_by_fractions():
    s = AGPSchedule.over(0.95, 1000, start=0.1, end=0.4, updates=30)
    assert (s.start_step, s.end_step, s.frequency, s.final_sparsity) == (100, 400, 10, 0.95)
    assert s.sparsity_at(400) == 0.95 and s.sparsity_at(100) == 0.0
    with pytest.raises(ConfigError, match="start < end"):
        AGPSchedule.over(0.9, 100, start=0.5, end=0.5)
