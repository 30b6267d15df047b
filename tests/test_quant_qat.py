"""Quantization-aware training + KD (torchslim.quant.qat): the int8 file in ONNX Runtime is the fake-quant model."""

from __future__ import annotations

import copy
import types

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import torchslim as ts
from torchslim.config import config_from_dict
from torchslim.core.masks import apply_mask_
from torchslim.errors import ConfigError
from torchslim.quant.qat import (ActivationQuantizer, QATConfig, TiedQuantizer, export_qat, fold_batchnorm, prepare_qat,
                                 qat, qat_agreement)


@pytest.fixture(scope="module")
def data():
    """A learnable 3-class problem on 1x8x8 inputs (train, test) and a tiny conv-BN model trained on it."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (1024,), generator=gen)
    x = torch.randn(1024, 1, 8, 8, generator=gen) * 0.5
    x[:, 0, :, :] += (y.float() - 1).view(-1, 1, 1)  # each class shifts the image
    train, test = types.SimpleNamespace(x=x[:512], y=y[:512]), types.SimpleNamespace(x=x[512:], y=y[512:])
    torch.manual_seed(0)
    model = ts.models.create("fmnist_student", width=4, fc=16, input_size=8, num_classes=3)
    ts.fit(model, train, ts.TrainConfig(epochs=1, lr=0.01, batch_size=64), progress=False)
    return train, test, model.eval()


FAST = ts.TrainConfig(epochs=1, lr=1e-3, batch_size=64)


@pytest.mark.parametrize("ranges,outputs,masked", [("observed", True, False), ("learned", False, True)])
def test_int8_file_in_onnx_runtime_matches_the_fake_quant_model(data, ranges, outputs, masked):
    train, test, model = data
    before = copy.deepcopy(model.state_dict())
    if masked:  # a pruning mask keeps working: pruned weights stay zero in training and in the int8 file
        model = copy.deepcopy(model)
        mask = (torch.rand(model.features[4].weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()
        apply_mask_(model.features[4], mask)
    q = qat(model, train, QATConfig(calibration_samples=256, activation_ranges=ranges, quantize_outputs=outputs),
            FAST)
    agree = qat_agreement(q, test)
    print(f"{ranges}: agreement {agree['agreement']:.4f}, max logit diff {agree['max_logit_diff']:.3g}")
    assert agree["agreement"] >= 0.995 and agree["samples"] == 512
    assert agree["max_logit_diff"] < 0.05  # same integers, same scales: only rounding ties may differ
    float_acc = ts.evaluate(model, test)["accuracy"]
    assert q.evaluate(test)["accuracy"] >= float_acc - 0.03
    assert q.bn_folded and q.folded == ["features.1", "features.5"]
    assert q.describe()["mode"] == "qat" and len(q.history) == 1 and "train_kd_loss" in q.history[0]
    proto = onnx.load_from_string(q.int8_onnx)
    kinds = [n.op_type for n in proto.graph.node]
    # 4 layers: each input quantized, and each output unless left float
    assert kinds.count("QuantizeLinear") == (8 if outputs else 4) and "BatchNormalization" not in kinds
    fq = q.fake_quant
    if outputs:  # outputs quantized after each ReLU; the next layer's input reuses that scale (no requantizing)
        assert fq.features[0].qat_after_relu and not fq.classifier[2].qat_after_relu
        assert isinstance(fq.features[4].qat_input, TiedQuantizer) and fq.features[4].qat_input.source is \
            fq.features[0].qat_output
        assert isinstance(fq.classifier[0].qat_input, TiedQuantizer)  # through MaxPool and flatten
        assert not isinstance(fq.features[0].qat_input, TiedQuantizer)  # the model's input
    if masked:
        trained = q.fake_quant.features[4]
        assert torch.equal(trained.weight_mask, mask) and (trained.weight_orig[mask == 0] == 0).all()
        w = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name.endswith("_w_q")
                                       and numpy_helper.to_array(i).shape == tuple(mask.shape)))
        assert w.dtype == np.int8 and (w[mask.numpy() == 0] == 0).all() and (w[mask.numpy() == 1] != 0).any()
    else:
        for key, value in model.state_dict().items():  # the float model is left as it was
            assert torch.equal(value, before[key])


def test_batchnorm_folding_keeps_the_outputs(data):
    _, test, model = data
    folded, names = fold_batchnorm(model)
    assert names == ["features.1", "features.5"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(test.x[:64]), model(test.x[:64]), atol=1e-5)


def test_learned_scale_gets_a_gradient_and_observed_ranges_follow_the_data():
    learned = ActivationQuantizer(learned=True, ema_decay=0.9)
    learned.min_val.fill_(0.0), learned.max_val.fill_(1.0)
    learned.set_range()
    learned.train()
    x = torch.rand(8, 16) * 2  # half the values clip: the scale should grow
    learned(x).sum().backward()
    assert learned.scale.grad is not None and learned.scale.grad.item() != 0
    observed = ActivationQuantizer(learned=False, ema_decay=0.5)
    observed.min_val.fill_(0.0), observed.max_val.fill_(1.0)
    observed.set_range()
    observed.train()
    observed(torch.full((4,), 3.0))
    assert observed.max_val.item() == pytest.approx(2.0) and observed.scale.item() == pytest.approx(2.0 / 255)
    assert observed.zero_point.item() == 0


def test_config_round_trips_and_bad_names_fail_before_training(data):
    train, _, model = data
    c = QATConfig(activation_ranges="learned", exclude=["classifier.2"], ema_decay=0.9)
    assert config_from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        QATConfig(ema_decay=1.5)
    with pytest.raises(ConfigError, match="classifier.9"):
        prepare_qat(model, QATConfig(exclude=["classifier.9"]), calib=train)
    q = prepare_qat(model, QATConfig(exclude=["classifier.2"], calibration_samples=64), calib=train)
    assert not hasattr(q.classifier[2], "qat_input") and hasattr(q.classifier[0], "qat_input")


def test_a_float_first_conv_pools_before_its_relu_and_the_file_still_matches_the_fake_quant_model(data):
    train, test, model = data
    qmodel = prepare_qat(model, QATConfig(exclude=["features.0"], calibration_samples=64), calib=train)
    q = export_qat(qmodel, QATConfig(exclude=["features.0"], calibration_samples=64), test.x[:8])
    ops = {n.name: n.op_type for n in onnx.load_from_string(q.int8_onnx).graph.node}
    assert [ops[n] for n in q.moved] == ["Relu", "MaxPool"] and q.describe()["pool_before_relu"] == q.moved
    agree = qat_agreement(q, test)  # pool-then-ReLU computes exactly what ReLU-then-pool did
    assert agree["agreement"] >= 0.995 and agree["max_logit_diff"] < 0.05
