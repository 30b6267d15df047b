"""Tests for torchslim.measure: counts, MACs, bytes, latency, accuracy, profile."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

from torchslim.errors import ExportError, ModelError
from torchslim.export import save
from torchslim.measure import (
    Profile,
    count_macs,
    count_nonzero,
    count_parameters,
    dense_bytes,
    evaluate_accuracy,
    measure_latency,
    profile,
    profile_file,
)
from torchslim.measure.latency import make_batch
from torchslim.models import create
from torchslim.prune import MagnitudePruning, apply_mask_, is_masked, prune_


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_cnn() -> nn.Module:
    return create("fmnist_student", width=4, fc=8)


def tiny_mlp() -> nn.Module:
    return create("lenet300_100", hidden1=16, hidden2=8)


# --- params / nonzero -------------------------------------------------------


def test_params_and_nonzero_with_known_zeros():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[0, :] = 0.0  # 4 zeros
        layer.weight[1, 2] = 0.0  # 1 zero
        layer.bias.copy_(torch.tensor([0.0, 2.0, 3.0]))  # 1 zero
    assert count_parameters(layer) == 15
    assert count_nonzero(layer) == 15 - 6


def test_shared_parameters_count_once():
    a = nn.Linear(3, 3, bias=False)
    model = nn.Sequential(a, nn.ReLU(), a)
    assert count_parameters(model) == 9
    assert count_nonzero(model) == int((a.weight != 0).sum())
    assert dense_bytes(model) == 9 * 4


def test_masked_model_counts():
    model = tiny_mlp()
    dense_params = count_parameters(model)
    dense_size = dense_bytes(model)
    prune_(model, MagnitudePruning(sparsity=0.5))
    # weight_orig counts once; the mask buffer is neither a parameter nor model bytes.
    assert count_parameters(model) == dense_params
    assert dense_bytes(model) == dense_size
    expected = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert is_masked(m)
            expected += int(((m.weight_orig * m.weight_mask) != 0).sum()) + int((m.bias != 0).sum())
    assert count_nonzero(model) == expected
    weights = sum(m.weight_mask.numel() for m in model.modules() if isinstance(m, nn.Linear))
    kept = sum(int(m.weight_mask.sum()) for m in model.modules() if isinstance(m, nn.Linear))
    assert kept == weights - round(0.5 * weights)


def test_nonzero_sees_masked_entries_even_if_orig_is_not_zero():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    apply_mask_(layer, torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]]))
    with torch.no_grad():
        layer.weight_orig.fill_(5.0)  # what an optimizer step could do; the mask still rules
    assert count_nonzero(layer) == 3
    assert count_parameters(layer) == 8


# --- MACs -----------------------------------------------------------------


def test_macs_linear():
    assert count_macs(nn.Linear(10, 5), torch.randn(1, 10)) == 50
    assert count_macs(nn.Linear(10, 5), torch.randn(3, 10)) == 150


def test_macs_conv_by_hand():
    conv = nn.Conv2d(2, 4, kernel_size=3, padding=1)
    # 4 output channels x 5x5 positions, each a 2x3x3 dot product (bias adds not counted)
    assert count_macs(conv, torch.randn(1, 2, 5, 5)) == 4 * 5 * 5 * 2 * 3 * 3
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 7))
    assert count_macs(model, torch.randn(1, 1, 8, 8)) == 3 * 6 * 6 * 9 + 3 * 6 * 6 * 7


def test_macs_restore_mode_and_keep_masks():
    model = tiny_cnn()
    prune_(model, MagnitudePruning(sparsity=0.5))
    model.train()
    model.classifier.eval()
    bn = model.features[1]
    before = bn.running_mean.clone()
    dense = count_macs(tiny_cnn(), torch.randn(1, 1, 28, 28))
    assert count_macs(model, torch.randn(1, 1, 28, 28)) == dense  # dense MACs, masks or not
    assert model.training and not model.classifier.training  # per-module modes restored
    assert is_masked(model.features[0])  # measured on a finalized copy, not in place
    assert torch.equal(bn.running_mean, before)

    plain = tiny_cnn().train()
    count_macs(plain, torch.randn(2, 1, 28, 28))
    assert plain.training
    assert torch.equal(plain.features[1].running_mean, torch.zeros(4))  # ran in eval mode


def test_macs_bad_input_is_model_error():
    with pytest.raises(ModelError, match="MACs"):
        count_macs(nn.Linear(10, 5), torch.randn(1, 7))


def _mha_macs(b: int, length: int, e: int) -> int:
    # Self-attention on (B, L, E) with H heads of size d = E/H (H drops out: H*d = E):
    # in-projection (q, k, v): 3 * B*L*E*E; Q K^T per head (L x d)(d x L): B*H*L*L*d = B*L*L*E;
    # weights V per head (L x L)(L x d): B*L*L*E; out-projection: B*L*E*E.
    # Scaling, softmax and bias adds are elementwise and not counted.
    return 3 * b * length * e * e + b * length * length * e + b * length * length * e + b * length * e * e


class _SelfAttention(nn.Module):
    def __init__(self, e: int, heads: int, need_weights: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


@pytest.mark.parametrize("need_weights", [True, False])  # bmm path / fused CPU SDPA kernel
def test_macs_multihead_attention_by_hand(need_weights):
    b, length, e, heads = 2, 5, 8, 2
    x = torch.randn(b, length, e)
    assert count_macs(_SelfAttention(e, heads, need_weights), x) == _mha_macs(b, length, e)
    # The module called directly (need_weights=True by default) counts the same.
    assert count_macs(nn.MultiheadAttention(e, heads, batch_first=True), (x, x, x)) == _mha_macs(b, length, e)


def test_macs_transformer_encoder_layer_by_hand():
    b, length, e, heads, ff = 2, 5, 8, 2, 16
    layer = nn.TransformerEncoderLayer(e, heads, dim_feedforward=ff, batch_first=True)
    # Attention + the two MLP linears E -> ff -> E (LayerNorms are not counted).
    expected = _mha_macs(b, length, e) + 2 * b * length * e * ff
    assert count_macs(layer, torch.randn(b, length, e)) == expected
    assert layer.training  # eval only during the count
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(e, heads, ff, batch_first=True), num_layers=2)
    assert count_macs(encoder, torch.randn(b, length, e)) == 2 * expected


def test_macs_vit_counts_attention_and_restores_fastpath():
    # The vit_tiny twin of tests/test_structured.py: 8x8 input, 2x2 patches -> 16 tokens of dim 16.
    model = create("vit_tiny", input_size=8, num_classes=4, dim=16, depth=1, heads=4, mlp_dim=16, patch_size=2)
    tokens, dim, mlp = 16, 16, 16
    linear_like = (
        tokens * dim * 1 * 2 * 2  # patch conv
        + 4 * tokens * dim * dim  # attention in- and out-projections
        + 2 * tokens * dim * mlp  # MLP
        + dim * 4  # head
    )
    attention = 2 * tokens * tokens * dim  # Q K^T and weights V
    macs = count_macs(model, torch.randn(1, 1, 8, 8))
    assert macs > linear_like
    assert macs == linear_like + attention

    before = torch.backends.mha.get_fastpath_enabled()
    try:
        for setting in (False, True):
            torch.backends.mha.set_fastpath_enabled(setting)
            count_macs(model, torch.randn(1, 1, 8, 8))
            assert torch.backends.mha.get_fastpath_enabled() is setting

        class Boom(nn.Module):
            def forward(self, x):
                assert not torch.backends.mha.get_fastpath_enabled()  # off during the count
                raise RuntimeError("boom")

        with pytest.raises(ModelError, match="boom"):
            count_macs(Boom(), torch.randn(1))
        assert torch.backends.mha.get_fastpath_enabled() is True  # restored after the failure
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


# --- bytes ----------------------------------------------------------------


def test_dense_bytes():
    assert dense_bytes(nn.Linear(10, 5)) == 55 * 4
    bn = nn.BatchNorm2d(3)  # weight, bias, running_mean, running_var (f32) + num_batches_tracked (i64)
    assert dense_bytes(bn) == 4 * 3 * 4 + 8
    assert dense_bytes(nn.Linear(10, 5).half()) == 55 * 2


# --- latency / accuracy ---------------------------------------------------


def test_latency_positive_and_shape_inputs():
    model = tiny_mlp()
    threads = torch.get_num_threads()
    r = measure_latency(model, (1, 28, 28), batch_size=4, warmup=1, repeats=5, threads=1)
    assert r["median_ms"] > 0 and r["min_ms"] > 0 and r["p90_ms"] >= r["min_ms"]
    assert r["repeats"] == 5 and r["batch_size"] == 4 and r["threads"] == 1
    assert torch.get_num_threads() == threads  # restored


def test_latency_adaptive_repeats_and_tensor_input():
    model = tiny_cnn()
    prune_(model, MagnitudePruning(sparsity=0.5))
    model.train()
    r = measure_latency(model, torch.randn(2, 1, 28, 28), batch_size=3, warmup=1, budget_s=0.02)
    assert 5 <= r["repeats"] <= 500
    assert r["median_ms"] > 0
    assert model.training and is_masked(model.features[0])  # the model itself untouched


def test_make_batch():
    example = torch.arange(6.0).view(3, 2)
    batch = make_batch(example, 5)
    assert batch.shape == (5, 2)
    assert torch.equal(batch[3], example[0])
    assert make_batch((1, 4, 4), 2).shape == (2, 1, 4, 4)
    assert torch.equal(make_batch((3,), 2), make_batch((3,), 2))  # seeded
    with pytest.raises(ModelError):
        make_batch((3,), 0)


def test_evaluate_accuracy():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])  # the third is wrong
    model.train()
    assert evaluate_accuracy(model, x, y, batch_size=3) == pytest.approx(0.75)
    assert model.training
    with pytest.raises(ModelError):
        evaluate_accuracy(model, x, y[:2])


# --- profile --------------------------------------------------------------


def test_profile_fields_consistent(tmp_path):
    model = tiny_cnn()
    prune_(model, MagnitudePruning(sparsity=0.8))
    x = torch.randn(3, 1, 28, 28)
    p = profile(model, x, batch_sizes=(1, 2), latency=True, latency_budget_s=0.01)
    assert isinstance(p, Profile)
    assert p.params == count_parameters(model)
    assert p.nonzero == count_nonzero(model)
    assert p.sparsity == pytest.approx(1 - p.nonzero / p.params)
    assert p.macs == count_macs(model, x[:1])  # per sample
    assert p.dense_bytes == dense_bytes(model)
    assert p.nonzero < p.params
    save(model, tmp_path / "m.slim", input_shape=[1, 28, 28])
    assert p.file_bytes == os.path.getsize(tmp_path / "m.slim")
    assert sorted(p.latency_ms) == [1, 2] and all(v > 0 for v in p.latency_ms.values())
    d = p.to_dict()
    assert d["params"] == p.params and json.loads(json.dumps(d))["latency_ms"]["2"] == p.latency_ms[2]
    text = str(p)
    assert "params" in text and "MAC" in text and "batch 2" in text


def test_profile_without_spec_or_latency():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    p = profile(model, torch.randn(1, 2, 2), latency=False)
    assert p.file_bytes is None and p.latency_ms == {}
    assert p.macs == 8
    assert "n/a" in str(p)
    assert profile(model, torch.randn(1, 2, 2), file_bytes=123, latency=False).file_bytes == 123


def test_profile_file(tmp_path):
    path = tmp_path / "m.slim"
    save(tiny_mlp(), path)  # input_shape from the preset: [1, 28, 28]
    p = profile_file(path, batch_sizes=(1,), latency=False)
    assert p.file_bytes == os.path.getsize(path)
    assert p.macs == 28 * 28 * 16 + 16 * 8 + 8 * 10
    model = create("fmnist_student", width=4, fc=8)
    save(model, tmp_path / "n.slim", spec={"preset": "fmnist_student", "args": {"width": 4, "fc": 8}})
    with pytest.raises(ExportError, match="input_shape"):
        profile_file(tmp_path / "n.slim", latency=False)


def test_compare_latency_times_every_model_the_same_number_of_passes_and_ranks_them():
    import torchslim as ts
    from torchslim.measure import compare_latency

    torch.manual_seed(0)
    big = ts.models.create("lenet300_100", hidden1=1024, hidden2=512)
    small = ts.models.create("lenet300_100", hidden1=16, hidden2=8)
    before = {k: v.clone() for k, v in big.state_dict().items()}
    timed = compare_latency({"big": big, "small": small}, (1, 28, 28), batch_size=64, repeats=20)
    assert timed["big"]["repeats"] == timed["small"]["repeats"] == 20
    assert 0 < timed["small"]["min_ms"] <= timed["small"]["median_ms"]
    assert timed["small"]["min_ms"] < timed["big"]["min_ms"]  # ~100x fewer MACs
    assert all(torch.equal(before[k], v) for k, v in big.state_dict().items())
    with pytest.raises(ts.ModelError, match="at least one model"):
        compare_latency({}, (1, 28, 28))
