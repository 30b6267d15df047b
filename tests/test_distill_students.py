"""derive_student: a narrower twin of a preset, and backward-compatible preset registration."""

import pytest
import torch
import torch.nn as nn

import torchslim.models as models
from torchslim.distill import KDConfig, derive_student, distill
from torchslim.errors import ModelError
from torchslim.models.registry import get_preset, register_preset


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_derive_student_halves_the_width_arguments_of_a_preset():
    teacher = models.create("fmnist_teacher", input_size=8, num_classes=4, width=8, fc=32, dropout=0.2)
    student = derive_student(teacher, width=0.5)
    assert student.torchslim_spec == {"preset": "fmnist_teacher",
                                      "args": {"in_channels": 1, "num_classes": 4, "input_size": 8,
                                               "width": 4, "fc": 16, "dropout": 0.2}}
    assert _params(student) < _params(teacher) / 3
    assert student(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert models.build_from_spec(student.torchslim_spec).state_dict().keys() == student.state_dict().keys()


def test_every_zoo_preset_declares_its_widths_and_derives():
    for info in models.list_presets():
        if info.name not in ("lenet300_100", "lenet5", "fmnist_teacher", "fmnist_student",
                             "article_teacher", "article_student"):
            continue  # presets added elsewhere may not declare widths
        assert info.width_args
        teacher = models.create(info.name)
        student = derive_student(teacher, width=0.25)
        assert _params(student) < _params(teacher)
        assert student(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_init_from_teacher_copies_leading_slices_and_is_a_working_start(blobs):
    torch.manual_seed(0)
    teacher = models.create("fmnist_teacher", input_size=8, num_classes=4, width=8, fc=16).eval()
    student = derive_student(teacher, width=0.5, init="teacher")
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["features.0.weight"], t["features.0.weight"][:4])
    assert torch.equal(s["features.3.weight"], t["features.3.weight"][:4, :4])
    assert torch.equal(s["classifier.0.weight"], t["classifier.0.weight"][:8, :s["classifier.0.weight"].shape[1]])
    assert torch.equal(s["classifier.3.bias"], t["classifier.3.bias"])
    distill(student, teacher, blobs, KDConfig(), epochs=1, progress=False)


def test_init_from_a_masked_teacher_uses_the_effective_weights():
    from torchslim.prune import MagnitudePruning, prune_

    teacher = models.create("lenet300_100", input_size=8, num_classes=4, hidden1=16, hidden2=8)
    prune_(teacher, MagnitudePruning(sparsity=0.5, scope="global"))
    student = derive_student(teacher, width=0.5, init="teacher")
    w = teacher.classifier[0].weight_orig * teacher.classifier[0].weight_mask
    assert torch.equal(student.classifier[0].weight, w[:8])


def test_derive_student_errors_are_clear():
    with pytest.raises(ModelError, match="built by torchslim.models.create"):
        derive_student(nn.Linear(3, 2))
    teacher = models.create("lenet5", input_size=8, num_classes=4)
    with pytest.raises(ModelError, match="width must be in"):
        derive_student(teacher, width=1.5)
    with pytest.raises(ModelError, match="not an integer width"):
        derive_student(teacher, width_args=("num_classes_x",))


def test_plain_register_preset_still_works_and_explicit_width_args_derive():
    @register_preset
    def _tmp_plain_preset(num_classes: int = 3, hidden: int = 8) -> nn.Module:
        """A test-only preset registered the plain way."""
        return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    try:
        info = get_preset("_tmp_plain_preset")
        assert info.width_args == () and info.description == "A test-only preset registered the plain way."
        teacher = models.create("_tmp_plain_preset")
        with pytest.raises(ModelError, match="declares no width arguments"):
            derive_student(teacher)
        student = derive_student(teacher, width=0.5, width_args=("hidden",))
        assert student.torchslim_spec["args"] == {"num_classes": 3, "hidden": 4}
        with pytest.raises(ModelError, match="not arguments of the builder"):
            register_preset(width_args=("nope",))(lambda hidden=1: nn.Identity())
    finally:
        from torchslim.models import registry

        registry._PRESETS.pop("_tmp_plain_preset", None)
