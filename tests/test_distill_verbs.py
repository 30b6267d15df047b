"""The distillation verbs give the teacher back as it came (on error too); ts.distill vs the package;
layer names checked before training."""

import copy
import importlib
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn

import torchslim as ts
import torchslim.models as models
from torchslim.distill import (
    AttentionConfig,
    DistillConfig,
    DistillObjective,
    HintConfig,
    KDConfig,
    KDObjective,
    cache_teacher_outputs,
    check_distill_layers,
    estimate_cache_bytes,
    frozen_teacher,
)
from torchslim.errors import ConfigError, ModelError


def _teacher():
    torch.manual_seed(3)
    return models.create("fmnist_student", input_size=8, num_classes=4, width=6, fc=12)


def _student():
    torch.manual_seed(0)
    return models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)


def _flags(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def _mixed_teacher():
    """Train mode, trainable, except one frozen layer and one module in eval mode: all kept as is."""
    teacher = _teacher().train()
    teacher.features[0].weight.requires_grad_(False)
    next(m for m in teacher.modules() if m is not teacher).eval()
    return teacher


class Boom(Exception):
    pass


def _boom(record):
    raise Boom


@pytest.mark.parametrize("config", [KDConfig(), DistillConfig(hints=HintConfig(), teacher_outputs="online"),
                                    DistillConfig(attention=AttentionConfig(), teacher_outputs="cached")])
def test_distill_gives_the_teacher_back_as_it_came(config, blobs):
    teacher = _mixed_teacher()
    before = _flags(teacher)
    with pytest.warns(UserWarning, match="train mode"):
        ts.distill(_student(), teacher, blobs, config, epochs=1, progress=False)
    assert _flags(teacher) == before


@pytest.mark.parametrize("teacher_outputs", ["online", "cached"])
def test_distill_gives_the_teacher_back_when_training_raises(teacher_outputs, blobs):
    teacher = _mixed_teacher()
    before = _flags(teacher)
    with pytest.warns(UserWarning, match="train mode"), pytest.raises(Boom):
        ts.distill(_student(), teacher, blobs, DistillConfig(hints=HintConfig(), teacher_outputs=teacher_outputs),
                   epochs=2, progress=False, on_epoch_end=_boom)
    assert _flags(teacher) == before


def test_objectives_cache_and_probes_restore_the_teacher(blobs):
    teacher = _mixed_teacher()
    before = _flags(teacher)
    with pytest.warns(UserWarning):
        with DistillObjective(_student(), teacher, DistillConfig(hints=HintConfig()), example=blobs.x[:2]):
            assert _flags(teacher) != before and not teacher.training
    assert _flags(teacher) == before
    with pytest.warns(UserWarning), KDObjective(teacher, KDConfig()):
        pass
    assert _flags(teacher) == before
    with pytest.warns(UserWarning), pytest.raises(ModelError):  # fails part way through set-up
        DistillObjective(_student(), teacher, DistillConfig(hints=HintConfig(layers={"features": "classifier.1"})),
                         example=blobs.x[:2])
    assert _flags(teacher) == before
    cache_teacher_outputs(teacher, blobs, layers=["features"])
    estimate_cache_bytes(teacher, blobs, DistillConfig(hints=HintConfig()))
    assert _flags(teacher) == before
    with pytest.raises(Boom), pytest.warns(UserWarning), frozen_teacher(teacher):
        raise Boom
    assert _flags(teacher) == before


def test_ts_distill_is_the_package_and_the_verb():
    import torchslim.distill as package
    from torchslim.distill import distill as function
    from torchslim.distill.kd import distill as kd_distill

    assert isinstance(package, types.ModuleType) and package is ts.distill is sys.modules["torchslim.distill"]
    assert package.KDConfig is ts.KDConfig and function is kd_distill and callable(ts.distill)
    assert "teacher_cache" in str(__import__("inspect").signature(ts.distill))
    assert importlib.import_module("torchslim.distill") is ts.distill


def test_import_order_does_not_change_what_torchslim_distill_is():
    # A fresh interpreter importing the submodule first, then the package.
    code = ("import torchslim.distill as d, types, torchslim as ts; from torchslim.distill import KDConfig; "
            "assert isinstance(d, types.ModuleType) and d is ts.distill and callable(d); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_ts_distill_call_trains(blobs):
    student = _student()
    records = ts.distill(student, _teacher().eval(), blobs, KDConfig(), epochs=1, progress=False)
    assert records[0]["epoch"] == 1 and "train_kd_loss" in records[0]


def test_unknown_layer_names_fail_at_once_naming_existing_modules(blobs):
    student, teacher = _student(), _teacher().eval()
    with pytest.raises(ConfigError, match=r"hints.layers: the student has no layer named 'featurs'; "
                                          r"closest names: 'features'"):
        check_distill_layers(student, teacher, DistillConfig(hints=HintConfig(layers={"featurs": "features"})))
    with pytest.raises(ConfigError, match=r"attention.layers: the teacher has no layer named 'zzz'; "
                                          r"its modules include: 'features', 'features.0'"):
        check_distill_layers(student, teacher, DistillConfig(attention=AttentionConfig(layers={"features": "zzz"})))
    check_distill_layers(student, teacher, KDConfig())  # no layers: nothing to check
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match="no layer named 'featurs'"):  # distill checks before any teacher pass
        ts.distill(student, teacher, blobs, DistillConfig(hints=HintConfig(layers={"featurs": "features"})),
                   epochs=1, progress=False)
    assert calls == []


def test_layer_check_with_an_example_checks_classes_and_shapes(blobs):
    student, teacher = _student().train(), _teacher().eval()
    before = _flags(student), _flags(teacher)
    check_distill_layers(student, teacher, DistillConfig(hints=HintConfig(), attention=AttentionConfig()),
                         example=blobs.x[:2])
    assert (_flags(student), _flags(teacher)) == before
    wrong = models.create("fmnist_student", input_size=8, num_classes=3, width=4, fc=8)
    with pytest.raises(ModelError, match="same classes"):
        check_distill_layers(wrong, teacher, KDConfig(), example=blobs.x[:2])
    with pytest.raises(ModelError, match="cannot match student features"):
        check_distill_layers(student, teacher, DistillConfig(hints=HintConfig(layers={"features": "classifier.1"})),
                             example=blobs.x[:2])
    with pytest.raises(ModelError, match=r"attention maps need \(B, C, H, W\)"):
        check_distill_layers(student, teacher, DistillConfig(attention=AttentionConfig(
            layers={"classifier.1": "classifier.1"})), example=blobs.x[:2])
