"""Structured pruning: every zoo model prunes, matches its masked twin, saves and reloads; configs and selection."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

import torchslim.models as models
from torchslim.config import config_from_dict
from torchslim.errors import ConfigError, ExportError, ModelError
from torchslim.export import load, read_metadata, save
from torchslim.measure import count_macs, count_parameters
from torchslim.prune.structured import (
    ChannelPruning,
    PrunedMultiheadAttention,
    build_dependency_graph,
    finetune,
    masked_reference,
    prune_channels,
    replay_history_,
    unit_scores,
)

from conftest import make_blobs


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Every preset's tiny twin (input 8x8 keeps them fast; 28x28 is checked for a few below).
TWINS = {
    "lenet300_100": dict(hidden1=16, hidden2=8),
    "lenet5": dict(conv1=6, conv2=8, fc=12),
    "fmnist_teacher": dict(width=8, fc=16),
    "fmnist_student": dict(width=6, fc=8),
    "article_teacher": dict(conv=6, fc=8),
    "article_student": dict(conv=6, fc=8),
    "resnet20": dict(width=4, blocks=1),
    "resnet56": dict(width=4, blocks=2),
    "vgg_small": dict(width=4, fc=8),
    "mobilenetv2": dict(width=4, expansion=2, blocks=1, last_channels=8),
    "vit_tiny": dict(dim=16, depth=1, heads=4, mlp_dim=16, patch_size=2),
}


def _twin(name: str, input_size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = models.create(name, input_size=input_size, num_classes=4, **TWINS[name])
    # Non-trivial BatchNorm statistics, so removing a channel that a BatchNorm shifts would show.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return model.eval()


def _check_shapes(model: nn.Module) -> None:
    """Every layer's recorded sizes agree with its tensors."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups), name
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == m.running_var.shape == (m.num_features,), name
        elif isinstance(m, nn.LayerNorm):
            assert m.weight.shape == m.normalized_shape, name
        elif isinstance(m, PrunedMultiheadAttention):
            assert m.in_proj_weight.shape == (3 * m.num_heads * m.head_dim, m.embed_dim), name


@pytest.mark.parametrize("name", sorted(TWINS))
def test_every_zoo_twin_prunes_and_matches_masked_reference(name):
    model = _twin(name)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ratio = random.Random(name).uniform(0.2, 0.7)
    config = ChannelPruning(ratio=ratio, importance="random", seed=len(name))
    result = prune_channels(model, x, config)
    pruned, report = result.model, result.report
    assert not hasattr(pruned, "torchslim_pruning_report")  # the report is returned, not hung on the model
    _check_shapes(pruned)
    assert count_parameters(pruned) < count_parameters(model)
    # the report counts attention too (count_macs misses its fused fast path)
    assert report.macs_after < report.macs_before
    assert not list(pruned._forward_hooks.values()) and model is not pruned
    with torch.no_grad():
        out, ref = pruned(x), masked_reference(model, pruned.torchslim_history[0]["ops"])(x)
    assert out.shape == (3, 4)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert pruned.torchslim_spec == model.torchslim_spec


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vit_tiny", "fmnist_teacher"])
def test_history_replays_through_slim_file(name, tmp_path):
    model = _twin(name)
    x = torch.randn(2, 1, 8, 8)
    target = 0.8 if name == "vit_tiny" else 0.6  # only its heads and MLP are prunable
    pruned = prune_channels(model, x, ChannelPruning(target_macs=target, steps=2, importance="l1")).model
    assert len(pruned.torchslim_history) == 2
    path = save(pruned, tmp_path / "p.slim")
    header = read_metadata(path)
    # the transform log holds one channels_removed record per pruning step, in order
    assert header["version"] == 3
    assert [t["type"] for t in header["transforms"]] == ["channels_removed"] * 2
    assert [t["ops"] for t in header["transforms"]] == [step["ops"] for step in pruned.torchslim_history]
    assert header["spec"] == model.torchslim_spec  # the spec is the unpruned architecture
    loaded = load(path).eval()
    _check_shapes(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    again = models.build_from_spec(model.torchslim_spec)
    replay_history_(again, pruned.torchslim_history)
    again.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), pruned(x))


def test_history_that_does_not_fit_is_refused(tmp_path):
    model = _twin("fmnist_student")
    pruned = prune_channels(model, torch.randn(1, 1, 8, 8), ChannelPruning(ratio=0.5)).model
    with pytest.raises(ModelError, match="size"):
        replay_history_(_twin("fmnist_teacher"), [{"ops": [{"target": "features.0", "role": "out", "size": 6, "removed": [0]}]}])
    path = save(pruned, tmp_path / "p.slim")
    pruned.torchslim_spec = {**pruned.torchslim_spec, "args": {**pruned.torchslim_spec["args"], "width": 7}}
    bad = save(pruned, tmp_path / "bad.slim")
    with pytest.raises(ExportError, match="transform log does not fit"):
        load(bad)
    assert load(path) is not None


def test_onnx_export_of_pruned_models_passes_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    from torchslim.export import export_onnx

    for name in ("resnet20", "vit_tiny"):
        model = _twin(name)
        x = torch.randn(2, 1, 8, 8)
        pruned = prune_channels(model, x, ChannelPruning(ratio=0.5)).model
        info = export_onnx(pruned, x, tmp_path / f"{name}.onnx", exporter="torchscript")
        assert info["max_abs_diff"] < 1e-4


def test_28x28_twins_and_target_macs_with_rounding():
    for name in ("resnet56", "mobilenetv2", "lenet5"):
        model = _twin(name, input_size=28)
        x = torch.randn(1, 1, 28, 28)
        result = prune_channels(model, x, ChannelPruning(target_macs=0.5, steps=3, round_to=2))
        pruned, report = result.model, result.report
        assert report.target_met and report.macs_after <= 0.5 * report.macs_before
        assert report.macs_before == count_macs(model, x) and report.macs_after == count_macs(pruned, x)
        assert len(report.steps) == 3 and report.steps[0]["macs"] > report.steps[2]["macs"]
        for (m0_name, m0), (_, m1) in zip(model.named_modules(), pruned.named_modules()):
            if isinstance(m0, nn.Conv2d) and m1.out_channels != m0.out_channels:
                assert m1.out_channels % 2 == 0, m0_name


def test_target_params_and_unreachable_target_warns():
    model = _twin("fmnist_teacher")
    x = torch.randn(1, 1, 8, 8)
    n = count_parameters(model)
    pruned = prune_channels(model, x, ChannelPruning(target_params=n // 3)).model
    assert count_parameters(pruned) <= n // 3
    with pytest.warns(UserWarning, match="could not reach"):
        small = prune_channels(model, x, ChannelPruning(target_macs=0.01, max_ratio=0.5))
    assert not small.report.target_met


def test_overrides_and_exclude():
    model = _twin("fmnist_teacher")
    x = torch.randn(1, 1, 8, 8)
    pruned = prune_channels(model, x, ChannelPruning(ratio=0.5, overrides={"features.0": 0.0, "re:classifier\\..*": 0.25},
                                                     exclude=["features.3"])).model
    assert pruned.features[0].out_channels == 8  # override 0 keeps the group
    assert pruned.features[3].out_channels == 8  # excluded
    assert pruned.classifier[0].out_features == 12  # 16 * (1 - 0.25)
    assert pruned.features[7].out_channels < 16


def test_layer_scope_removes_same_fraction_everywhere():
    model = _twin("vgg_small")
    pruned = prune_channels(model, torch.randn(1, 1, 8, 8), ChannelPruning(ratio=0.5, scope="layer")).model
    assert [m.out_channels for m in pruned.features if isinstance(m, nn.Conv2d)] == [2, 2, 4, 4, 8, 8]


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=None), "exactly one"),
    (dict(ratio=0.5, target_macs=0.5), "exactly one"),
    (dict(ratio=1.0), "ratio"),
    (dict(target_macs=0.0), "target_macs"),
    (dict(ratio=0.5, overrides={"re:(": 0.1}), "regular expression"),
    (dict(ratio=0.5, overrides={"a": 1.5}), "overrides"),
    (dict(ratio=0.5, importance="magic"), "importance"),
    (dict(ratio=0.5, round_to=0), "round_to"),
])
def test_config_is_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ChannelPruning(**kwargs)


def test_config_defaults_and_round_trip():
    assert ChannelPruning().ratio == 0.5 and ChannelPruning(target_macs=0.5).ratio is None
    config = ChannelPruning(target_macs=0.5, steps=4, round_to=8, overrides={"re:fc.*": 0.2}, exclude=["head"])
    assert config_from_dict(config.to_dict()) == config


def test_importance_criteria_rank_the_obvious_channel_last():
    model = _twin("fmnist_student")
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        model.features[0].weight[2] *= 1e-3   # tiny filter
        model.features[1].weight[4] = 1e-4    # tiny gamma in the first BatchNorm
    graph = build_dependency_graph(model, x)
    assert int(unit_scores(model, graph, "l1")[0].argmin()) == 2
    assert int(unit_scores(model, graph, "l2")[0].argmin()) == 2
    assert int(unit_scores(model, graph, "bn")[0].argmin()) == 4
    r1, r2 = unit_scores(model, graph, "random", seed=1), unit_scores(model, graph, "random", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))


def test_taylor_needs_data_and_scores_dead_channels_zero():
    model = _twin("fmnist_student")
    data = make_blobs(64, classes=4)
    x = data.x[:2]
    with pytest.raises(ConfigError, match="data"):
        prune_channels(model, x, ChannelPruning(ratio=0.5, importance="taylor")).model
    with torch.no_grad():
        model.features[4].weight[:, 1] = 0  # nothing reads channel 1 of the first conv
    graph = build_dependency_graph(model, x)
    scores = unit_scores(model, graph, "taylor", data=data, batches=2, batch_size=16)
    assert scores[0][1] == 0 and scores[0].sum() > 0
    pruned = prune_channels(model, x, ChannelPruning(ratio=0.3, importance="taylor", calibration_batches=2), data=data).model
    assert pruned.features[0].out_channels < 6
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_finetune_between_steps_with_distillation():
    model = _twin("fmnist_student")
    data = make_blobs(64, classes=4)
    from torchslim.train import TrainConfig

    calls = []

    def tune(m):
        calls.append(finetune(m, data, TrainConfig(epochs=1, batch_size=32), teacher=model, progress=False))

    pruned = prune_channels(model, data.x[:2], ChannelPruning(ratio=0.5, steps=2), finetune=tune).model
    assert len(calls) == 2 and "train_kd_loss" in calls[0][0]
    assert not model.training and all(p.requires_grad for p in model.parameters())  # the teacher was a copy
    assert pruned(data.x[:2]).shape == (2, 4)
