"""Weight sharing (Deep Compression's trained quantization): k-means, centroid gradients, fine-tuning, finalize."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchslim as ts
from torchslim.config import config_from_dict
from torchslim.distill import DistillObjective, KDConfig
from torchslim.prune import MagnitudePruning, get_mask, is_masked
from torchslim.quant.sharing import (WeightSharing, codebooks, finalize_sharing_, is_shared, kmeans_1d,
                                     share_weights_, shared_layers, sharing_layers, sharing_summary)
from torchslim.train import TrainConfig, fit


class Split:
    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)


def _tiny(sparsity: float = 0.7) -> nn.Module:
    torch.manual_seed(0)
    model = ts.models.create("lenet300_100", input_size=8, hidden1=16, hidden2=12)
    if sparsity:
        ts.prune_(model, MagnitudePruning(sparsity=sparsity))
    return model


def _distinct_nonzero(w: torch.Tensor) -> int:
    return int(torch.unique(w[w != 0]).numel())


# ----------------------------------------------------------------- k-means
@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_kmeans_gives_sorted_centroids_and_nearest_codes(init):
    v = torch.randn(500, generator=torch.Generator().manual_seed(1))
    c, codes = kmeans_1d(v, 8, init=init, iterations=1000)
    assert c.numel() == 8 and torch.all(c[1:] > c[:-1])
    nearest = (v[:, None] - c[None, :]).abs().argmin(1)
    assert torch.equal(codes, nearest)
    for j in range(8):  # Lloyd's fixed point: every centroid is its cluster's mean
        assert torch.allclose(c[j], v[codes == j].mean(), atol=1e-5)


def test_kmeans_keeps_few_distinct_values_exactly_and_uses_every_centroid_on_pruned_weights():
    v = torch.tensor([0.5, -0.25, 0.5, 0.125])
    c, codes = kmeans_1d(v, 4)
    assert torch.equal(c[codes], v)
    # Pruned weights leave a gap around 0 where linear init puts empty centroids: they are re-seeded.
    w = torch.randn(2000, generator=torch.Generator().manual_seed(2))
    w = w[w.abs() > 1.0]
    c, _ = kmeans_1d(w, 16)
    assert c.numel() == 16
    assert kmeans_1d(torch.zeros(0), 4)[0].numel() == 0


# ----------------------------------------------------------------- config
def test_config_overrides_by_name_and_regex_and_errors_name_the_pattern():
    model = _tiny()
    cfg = WeightSharing(linear_bits=4, overrides={"classifier.4": 2, "re:classifier\\.[02]": 3, "classifier.2": None})
    bits = {name: b for name, _, b in sharing_layers(model, cfg)}
    assert bits == {"classifier.0": 3, "classifier.4": 2}  # exact name wins; None leaves it float
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ts.ConfigError, match="no_such"):
        share_weights_(model, WeightSharing(overrides={"no_such": 3}))
    with pytest.raises(ts.ConfigError, match="exclude"):
        share_weights_(model, WeightSharing(exclude=["re:feat.*"]))
    with pytest.raises(ts.ConfigError, match="bad regular expression"):
        WeightSharing(overrides={"re:(": 3})
    with pytest.raises(ts.ConfigError, match="linear_bits"):
        WeightSharing(linear_bits=0)
    assert not any(is_shared(m) for m in model.modules())  # a refused config changed nothing


# ----------------------------------------------------------------- sharing
def test_share_keeps_pruned_weights_zero_and_at_most_2_pow_bits_values():
    model = _tiny()
    masks = {n: get_mask(m).clone() for n, m in model.named_modules() if is_masked(m)}
    share_weights_(model, WeightSharing(linear_bits=3))
    assert [n for n, _ in shared_layers(model)] == ["classifier.0", "classifier.2", "classifier.4"]
    for name, module in shared_layers(model):
        assert _distinct_nonzero(module.weight) <= 8
        assert torch.all(module.weight[masks[name] == 0] == 0)
    assert all(v["centroids"] <= 8 for v in sharing_summary(model).values())
    books = finalize_sharing_(model)
    for name, mask in masks.items():  # masks come back as masks, unchanged
        module = model.get_submodule(name)
        assert is_masked(module) and torch.equal(get_mask(module), mask)
        assert torch.equal(module.weight, books[f"{name}.weight"].codebook[books[f"{name}.weight"].codes.long()
                                                                          .clamp(min=0)] * mask)
    assert model.torchslim_codebooks["classifier.0.weight"]["bits"] == 3


def test_a_finalized_pruned_model_keeps_its_zeros_without_gaining_masks():
    model = _tiny()
    ts.prune.finalize_(model)
    zeros = model.classifier[0].weight == 0
    share_weights_(model, WeightSharing(linear_bits=2))
    finalize_sharing_(model)
    assert not is_masked(model.classifier[0]) and torch.equal(model.classifier[0].weight == 0, zeros)
    assert _distinct_nonzero(model.classifier[0].weight) <= 4


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    ts.prune_(nn.Sequential(layer), MagnitudePruning(sparsity=0.5))
    share_weights_(nn.Sequential(layer), WeightSharing(linear_bits=2))
    hook = next(h for h in layer._forward_pre_hooks.values() if hasattr(h, "compute"))
    x = torch.randn(5, 6)
    weight = hook.compute(layer)
    weight.retain_grad()
    F.linear(x, weight, layer.bias).pow(2).sum().backward()
    codes = layer.weight_codes.long()
    keep = codes >= 0
    expected = torch.zeros_like(layer.weight_codebook).index_add_(0, codes[keep], weight.grad[keep])
    assert torch.allclose(layer.weight_codebook.grad, expected, atol=1e-6)
    # And torch's own numerical check of the map codebook -> weight -> output, in double.
    codebook = layer.weight_codebook.detach().double().requires_grad_(True)

    def out(cb: torch.Tensor) -> torch.Tensor:
        w = torch.where(keep, cb[codes.clamp(min=0)], torch.zeros((), dtype=cb.dtype))
        return F.linear(x.double(), w)

    assert torch.autograd.gradcheck(out, (codebook,))


def test_fine_tuning_with_fit_moves_centroids_and_keeps_pruned_weights_zero():
    model = _tiny()
    masks = {n: get_mask(m).clone() for n, m in model.named_modules() if is_masked(m)}
    share_weights_(model, WeightSharing(linear_bits=3))
    before = codebooks(model)
    fit(model, Split(), TrainConfig(epochs=2, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.9,
                                    weight_decay=1e-3), progress=False)
    after = codebooks(model)
    assert any(not torch.equal(before[k].codebook, after[k].codebook) for k in before)
    assert all(torch.equal(before[k].codes, after[k].codes) for k in before)  # only centroids move
    copy.deepcopy(model)  # a model that has run forward can still be copied (the store, teachers)
    finalize_sharing_(model)
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert torch.all(w[mask == 0] == 0) and _distinct_nonzero(w) <= 8


def test_fine_tuning_distilling_from_the_float_model():
    teacher = _tiny()
    student = copy.deepcopy(teacher)
    share_weights_(student, WeightSharing(linear_bits=2))
    with DistillObjective(student, teacher.eval(), KDConfig(temperature=2.0, alpha=0.5)) as loss:
        history = fit(student, Split(), TrainConfig(epochs=1, batch_size=16, lr=0.01), objective=loss,
                      progress=False)
    assert "train_kd_loss" in history[-1]
    finalize_sharing_(student)
    assert all(_distinct_nonzero(m.weight) <= 4 for m in student.modules() if isinstance(m, nn.Linear))


def test_a_shared_model_checkpoints_and_resumes_into_the_same_shared_model(tmp_path):
    model = _tiny()
    share_weights_(model, WeightSharing(linear_bits=3))
    path = tmp_path / "ckpt.pt"
    fit(model, Split(), TrainConfig(epochs=1, batch_size=32), checkpoint_path=path, progress=False)
    again = _tiny()
    share_weights_(again, WeightSharing(linear_bits=3))
    fit(again, Split(), TrainConfig(epochs=1, batch_size=32), checkpoint_path=path, progress=False)  # resumes: done
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_biases_share_their_own_codebook_fine_tune_and_pack_bit_exactly(tmp_path):
    from torchslim.quant.pack import pack

    model = _tiny()
    share_weights_(model, WeightSharing(linear_bits=3, bias_bits=2))
    books = codebooks(model)
    assert {"classifier.0.bias", "classifier.4.bias"} <= set(books) and books["classifier.0.bias"].bits == 2
    before = books["classifier.0.bias"].codebook
    fit(model, Split(), TrainConfig(epochs=1, batch_size=16, lr=0.01), progress=False)
    assert not torch.equal(codebooks(model)["classifier.0.bias"].codebook, before)  # fine-tuned too
    copy.deepcopy(model)
    finalize_sharing_(model)
    for module in (m for m in model.modules() if isinstance(m, nn.Linear)):
        assert _distinct_nonzero(module.bias) <= 4 and is_masked(module)  # the weight's mask came back
        assert {n for n, _ in module.named_parameters()} == {"bias", "weight_orig"}
    report = pack(model.eval(), tmp_path / "m.packed.slim")
    rows = {r.name: r for r in report.layers}
    assert rows["classifier.0.bias"].values == "codebook" and rows["classifier.0.bias"].weight_bits == 2
    mine, theirs = model.state_dict(), ts.load(tmp_path / "m.packed.slim").state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_bias_bits_are_checked_and_a_layer_without_bias_is_skipped():
    with pytest.raises(ValueError, match="bias_bits"):
        WeightSharing(bias_bits=0)
    layer = nn.Linear(6, 4, bias=False)
    share_weights_(nn.Sequential(layer), WeightSharing(bias_bits=3))
    assert set(codebooks(nn.Sequential(layer))) == {"0.weight"}
