import sys

import pytest
import torch

import torchslim.models as models
from torchslim.errors import ModelError

PRESETS = [p.name for p in models.list_presets()]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("size", [28, 8])
def test_every_preset_builds_and_runs(name, size):
    model = models.create(name, input_size=size, num_classes=7)
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 7)
    assert models.get_spec(model)["preset"] == name
    rebuilt = models.build_from_spec(models.get_spec(model))
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_zoo_sizes_match_their_definitions():
    assert _params(models.create("fmnist_student")) * 10 <= _params(models.create("fmnist_teacher"))
    lenet5 = models.create("lenet5")
    assert [m.out_channels for m in lenet5.features if isinstance(m, torch.nn.Conv2d)] == [20, 50]
    assert lenet5.classifier[0].in_features == 50 * 4 * 4 and lenet5.classifier[0].out_features == 500
    # the reference article's pair, with the flatten sizes it got wrong corrected
    assert models.create("article_teacher").classifier[0].in_features == 32 * 12 * 12
    assert models.create("article_student").classifier[0].in_features == 16 * 13 * 13
    assert _params(models.create("lenet300_100")) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_unknown_preset_and_bad_argument_are_clear_errors():
    with pytest.raises(ModelError, match="unknown model preset 'nope'.*lenet5"):
        models.create("nope")
    with pytest.raises(ModelError, match="Known arguments"):
        models.create("lenet5", widht=3)


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(
        "import torch.nn as nn\n"
        "def build(hidden=4):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 3))\n"
        "def not_a_model():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = models.create_from_factory("user_nets:build", hidden=5)
    assert models.get_spec(model) == {"factory": "user_nets:build", "args": {"hidden": 5}}
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        models.create_from_factory("user_nets:not_a_model")
    with pytest.raises(ModelError, match="has no attribute"):
        models.create_from_factory("user_nets:missing")
    with pytest.raises(ModelError, match="package.module:function"):
        models.create_from_factory("user_nets.build")
    sys.modules.pop("user_nets", None)
