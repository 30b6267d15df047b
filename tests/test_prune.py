import pytest
import torch
import torch.nn as nn

from torchslim.errors import ConfigError
from torchslim.prune import (
    MagnitudePruning,
    finalize_,
    global_sparsity,
    is_masked,
    layer_sparsity,
    mask_by_count,
    mask_by_threshold,
    prune_,
    select_layers,
)


def test_global_pruning_hits_the_target_exactly(tiny_mlp):
    prune_(tiny_mlp, MagnitudePruning(sparsity=0.75, scope="global"))
    stats = layer_sparsity(tiny_mlp)
    total = sum(s["total"] for s in stats.values())
    assert sum(s["zeros"] for s in stats.values()) == round(0.75 * total)
    # global scope prunes layers unevenly
    assert len({round(s["sparsity"], 3) for s in stats.values()}) > 1


def test_layer_scope_gives_every_layer_the_same_sparsity(tiny_cnn):
    prune_(tiny_cnn, MagnitudePruning(sparsity=0.5, scope="layer"))
    for name, s in layer_sparsity(tiny_cnn).items():
        assert s["zeros"] == round(0.5 * s["total"]), name


def test_global_pruning_removes_the_smallest_weights():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.9, 0.3, -0.05], [0.7, 0.2, -0.4, 0.8]]))
    model = nn.Sequential(layer)
    prune_(model, MagnitudePruning(sparsity=0.5))
    assert torch.allclose(model[0].weight, torch.tensor([[0.0, -0.9, 0.0, 0.0], [0.7, 0.0, -0.4, 0.8]]))


def test_threshold_prunes_weights_below_it_not_above():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, 0.5, -0.9]]))
    prune_(model, MagnitudePruning(threshold=0.5))
    assert torch.allclose(model[0].weight, torch.tensor([[0.0, 0.5, -0.9]]))


def test_masked_weights_get_zero_gradient_and_stay_zero_through_momentum_and_decay(tiny_cnn, blobs):
    prune_(tiny_cnn, MagnitudePruning(sparsity=0.8))
    masks = {n: m.weight_mask.clone() for n, m in tiny_cnn.named_modules() if is_masked(m)}
    opt = torch.optim.SGD(tiny_cnn.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(5):
        loss = nn.functional.cross_entropy(tiny_cnn(blobs.x[:32]), blobs.y[:32])
        opt.zero_grad()
        loss.backward()
        for name, module in tiny_cnn.named_modules():
            if name in masks:
                assert torch.all(module.weight_orig.grad[masks[name] == 0] == 0)
        opt.step()
    tiny_cnn(blobs.x[:1])
    for name, module in tiny_cnn.named_modules():
        if name in masks:
            assert torch.all(module.weight[masks[name] == 0] == 0)
    assert global_sparsity(tiny_cnn) >= 0.8 - 1e-3


def test_finalize_leaves_outputs_unchanged_and_removes_masks(tiny_cnn, blobs):
    prune_(tiny_cnn, MagnitudePruning(sparsity=0.6))
    tiny_cnn.eval()
    before = tiny_cnn(blobs.x[:16])
    finalize_(tiny_cnn)
    assert not any(is_masked(m) for m in tiny_cnn.modules())
    assert not any(name.endswith("_orig") for name, _ in tiny_cnn.named_parameters())
    assert torch.equal(tiny_cnn(blobs.x[:16]), before)


def test_pruning_again_never_resurrects_and_updates_masks_in_place(tiny_mlp):
    prune_(tiny_mlp, MagnitudePruning(sparsity=0.5))
    first = {n: m.weight_mask.clone() for n, m in tiny_mlp.named_modules() if is_masked(m)}
    buffers = {n: m.weight_mask for n, m in tiny_mlp.named_modules() if is_masked(m)}
    prune_(tiny_mlp, MagnitudePruning(sparsity=0.8))
    for name, module in tiny_mlp.named_modules():
        if name in first:
            assert module.weight_mask is buffers[name]  # same buffer: optimizers stay valid
            assert torch.all(module.weight_mask[first[name] == 0] == 0)
    assert global_sparsity(tiny_mlp) == pytest.approx(0.8, abs=1e-3)


def test_mask_functions_are_pure_and_respect_previous_masks():
    scores = torch.tensor([3.0, 1.0, 2.0, 4.0])
    previous = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert mask_by_count(scores, 2, previous).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert mask_by_threshold(scores, 2.0, previous).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert scores.tolist() == [3.0, 1.0, 2.0, 4.0]


def test_layer_selection_by_type_name_and_regex(tiny_cnn):
    names = [n for n, _ in select_layers(tiny_cnn)]
    assert names == ["features.0", "features.4", "classifier.0", "classifier.2"]
    assert [n for n, _ in select_layers(tiny_cnn, ["Conv2d"])] == ["features.0", "features.4"]
    assert [n for n, _ in select_layers(tiny_cnn, include=["re:classifier\\..*"])] == ["classifier.0", "classifier.2"]
    assert [n for n, _ in select_layers(tiny_cnn, exclude=["features.0", "re:.*\\.2"])] == ["features.4", "classifier.0"]
    prune_(tiny_cnn, MagnitudePruning(sparsity=0.5, exclude=["classifier.2"]))
    assert not is_masked(tiny_cnn.classifier[2]) and is_masked(tiny_cnn.classifier[0])


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": 0.5, "threshold": 0.1}, "exactly one"),
    ({}, "exactly one"),
    ({"sparsity": 0.5, "scope": "everywhere"}, "scope"),
    ({"sparsity": 0.5, "include": ["re:("]}, "regular expression"),
])
def test_pruning_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MagnitudePruning(**kwargs)


def test_no_matching_layer_is_an_error(tiny_cnn):
    with pytest.raises(ConfigError, match="include: 'nothing' matches no Linear/Conv2d layer.*features.0"):
        prune_(tiny_cnn, MagnitudePruning(sparsity=0.5, include=["nothing"]))
    with pytest.raises(ConfigError, match="no layer matched"):  # every pattern matches, the selection is empty
        prune_(tiny_cnn, MagnitudePruning(sparsity=0.5, include=["features.0"], exclude=["features.0"]))


def test_agp_schedule_matches_the_formula_at_its_ends_and_midpoint():
    from torchslim.prune import AGPSchedule

    s = AGPSchedule(initial_sparsity=0.1, final_sparsity=0.9, start_step=100, end_step=300, frequency=20)
    assert s.sparsity_at(0) == 0.1 and s.sparsity_at(100) == 0.1
    assert s.sparsity_at(200) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - 0.5) ** 3)
    assert s.sparsity_at(300) == 0.9 and s.sparsity_at(10_000) == 0.9
    assert [t for t in range(0, 400) if s.is_update_step(t)] == list(range(100, 301, 20))
    with pytest.raises(ConfigError, match="end_step"):
        AGPSchedule(final_sparsity=0.5, start_step=10, end_step=5)


def test_gradual_pruning_during_fit_reaches_the_target_without_rebuilding_the_optimizer(tiny_mlp, blobs):
    from torchslim.prune import AGPSchedule, gradual_pruning_hook
    from torchslim.train import TrainConfig, fit

    prune_(tiny_mlp, MagnitudePruning(sparsity=0.0))
    seen = []

    def hook(step, inner=gradual_pruning_hook(tiny_mlp, MagnitudePruning(sparsity=0.9),
                                              AGPSchedule(final_sparsity=0.9, end_step=12, frequency=3))):
        inner(step)
        seen.append(global_sparsity(tiny_mlp))

    fit(tiny_mlp, blobs, TrainConfig(epochs=2, batch_size=32), on_step_end=hook, progress=False)
    assert seen[0] < seen[5] < seen[11]
    assert seen[11] == pytest.approx(0.9, abs=1e-3) and seen[-1] == pytest.approx(0.9, abs=1e-3)
