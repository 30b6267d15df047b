"""Feature distillation: hooks by name, adapters created for mismatched shapes and removed afterwards."""

import copy

import pytest
import torch
import torch.nn as nn

import torchslim.models as models
from torchslim.distill import (
    AttentionConfig,
    DistillConfig,
    DistillObjective,
    DKDConfig,
    HintConfig,
    KDConfig,
    distill,
)
from torchslim.distill.objective import ADAPTERS_ATTR
from torchslim.errors import ModelError
from torchslim.train import TrainConfig


@pytest.fixture
def teacher():
    torch.manual_seed(3)
    return models.create("fmnist_student", input_size=8, num_classes=4, width=6, fc=12).eval()


def _student():
    torch.manual_seed(0)
    return models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)


def test_adapters_are_created_for_mismatched_shapes_only(teacher, blobs):
    student = _student()
    # student features.0: 4x8x8, teacher features.0: 6x8x8 -> 1x1 conv; features (4x2x2 vs 6x2x2) -> conv;
    # classifier.1 (8 units) vs classifier.1 (12 units) -> linear; the logits layers match -> identity.
    layers = {"features.0": "features.0", "features": "features", "classifier.1": "classifier.1",
              "classifier.2": "classifier.2"}
    with DistillObjective(student, teacher, DistillConfig(hints=HintConfig(layers=layers)),
                          example=blobs.x[:2]) as objective:
        kinds = [type(a) for a in objective.adapters]
        assert kinds == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Identity]
        assert objective.adapters[0].weight.shape == (6, 4, 1, 1)
        assert objective.adapters[2].weight.shape == (12, 8)
        assert getattr(student, ADAPTERS_ATTR) is objective.adapters
        _, parts = objective(student, blobs.x[:8], blobs.y[:8])
        parts["loss"].backward()
        assert all(p.grad is not None for p in objective.adapters.parameters())
    assert not hasattr(student, ADAPTERS_ATTR)


def test_spatial_sizes_are_pooled_to_match(teacher, blobs):
    student = _student()
    # student features.0 is 4x8x8; teacher features (after two pools) is 6x2x2
    cfg = DistillConfig(hints=HintConfig(layers={"features.0": "features"}),
                        attention=AttentionConfig(layers={"features.0": "features"}))
    with DistillObjective(student, teacher, cfg, example=blobs.x[:2]) as objective:
        _, parts = objective(student, blobs.x[:8], blobs.y[:8])
    assert torch.isfinite(parts["hint_loss"]) and torch.isfinite(parts["attention_loss"])


def test_distill_trains_adapters_and_removes_them_from_the_final_model(teacher, blobs):
    student = _student()
    before = {k: v.shape for k, v in student.state_dict().items()}
    modules_before = [name for name, _ in student.named_modules()]
    seen = []
    cfg = DistillConfig(logits=DKDConfig(), hints=HintConfig(weight=0.5), attention=AttentionConfig(weight=10.0))
    records = distill(student, teacher, blobs, cfg, TrainConfig(lr=0.01, batch_size=64), epochs=2, progress=False,
                      on_epoch_end=lambda r: seen.append(any(ADAPTERS_ATTR in n for n, _ in student.named_modules())))
    assert seen == [True, True]  # trained with the student ...
    assert [name for name, _ in student.named_modules()] == modules_before  # ... and dropped afterwards
    assert {k: v.shape for k, v in student.state_dict().items()} == before
    for key in ("train_task_loss", "train_tckd_loss", "train_nckd_loss", "train_hint_loss", "train_attention_loss"):
        assert key in records[-1]
    assert records[-1]["teacher_outputs"] == "cached"


def test_adapters_are_removed_even_when_training_fails(teacher, blobs):
    student = _student()
    with pytest.raises(ValueError):
        distill(student, teacher, blobs, DistillConfig(hints=HintConfig()), epochs=1, progress=False,
                on_epoch_end=lambda r: (_ for _ in ()).throw(ValueError("boom")))
    assert not hasattr(student, ADAPTERS_ATTR)
    assert not student.features._forward_hooks


def test_unknown_and_incompatible_layers_are_clear_errors(teacher, blobs):
    student = _student()
    with pytest.raises(ModelError, match="no layer named 'featurs'.*'features'"):
        DistillObjective(student, teacher, DistillConfig(hints=HintConfig(layers={"featurs": "features"})),
                         example=blobs.x[:2])
    with pytest.raises(ModelError, match="cannot match student features"):
        DistillObjective(student, teacher, DistillConfig(hints=HintConfig(layers={"features": "classifier.1"})),
                         example=blobs.x[:2])
    with pytest.raises(ModelError, match="example"):
        DistillObjective(student, teacher, DistillConfig(hints=HintConfig()))
    assert not hasattr(student, ADAPTERS_ATTR) and not student.features._forward_hooks


def test_any_module_can_be_the_student(teacher, blobs):
    class Plain(nn.Module):  # no spec, no zoo layout
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
            self.head = nn.Linear(12, 4)

        def forward(self, x):
            return self.head(self.body(x).flatten(1))

    student = Plain()
    cfg = DistillConfig(hints=HintConfig(layers={"body": "features"}))
    records = distill(student, teacher, blobs, cfg, epochs=1, progress=False)
    assert records[0]["train_hint_loss"] > 0 and not hasattr(student, ADAPTERS_ATTR)


def test_a_masked_student_distills(teacher, blobs):
    from torchslim.prune import MagnitudePruning, prune_

    student = _student()
    prune_(student, MagnitudePruning(sparsity=0.5, scope="global"))
    distill(student, teacher, blobs, KDConfig(), epochs=1, progress=False)
    assert (student.features[0].weight == 0).float().mean() > 0.3


def test_teacher_in_train_mode_warns_and_different_classes_is_an_error(teacher, blobs):
    wrong = models.create("fmnist_student", input_size=8, num_classes=3, width=4, fc=8)
    with pytest.warns(UserWarning, match="train mode"):
        with pytest.raises(ModelError, match="same classes"):
            distill(wrong, copy.deepcopy(teacher).train(), blobs, KDConfig(), epochs=1, progress=False)


def test_a_half_precision_teacher_is_a_clear_error(teacher, blobs):
    with pytest.raises(ModelError, match=r"teacher's weights are torch.float16.*teacher.float\(\)"):
        distill(_student(), copy.deepcopy(teacher).half(), blobs, KDConfig(), epochs=1, progress=False)
