"""The Config base: strict values, and a registry of torchslim's own classes only."""

import pytest
from pydantic import Field

import torchslim.config as config_module
from torchslim import DistillConfig, KDConfig, TrainConfig, UnstructuredPruning
from torchslim.config import Config, config_from_dict, registered_config_types
from torchslim.errors import ConfigError


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry, so classes defined by a test do not outlive it."""
    copy = dict(config_module._CONFIG_TYPES)
    monkeypatch.setattr(config_module, "_CONFIG_TYPES", copy)
    return copy


@pytest.mark.parametrize("cls, field, value, message", [
    (TrainConfig, "epochs", True, "true/false is not a number"),
    (TrainConfig, "epochs", "3", "drop the quotes"),
    (TrainConfig, "epochs", 3.0, "valid integer"),
    (TrainConfig, "lr", False, "true/false is not a number"),
    (TrainConfig, "lr", "0.1", "drop the quotes"),
    (TrainConfig, "grad_clip", True, "true/false"),  # float | None
    (TrainConfig, "nesterov", 1, "valid boolean"),
    (TrainConfig, "nesterov", "yes", "valid boolean"),
    (UnstructuredPruning, "sparsity", False, "true/false is not a number"),
    (KDConfig, "temperature", "4", "drop the quotes"),
])
def test_values_are_not_coerced(cls, field, value, message):
    with pytest.raises(ConfigError, match=rf"{field}: .*{message}"):
        cls(**{field: value})


def test_nested_values_are_strict_too():
    with pytest.raises(ConfigError, match=r"logits\.temperature: .*drop the quotes"):
        DistillConfig(logits={"temperature": "4"})
    with pytest.raises(ConfigError, match=r"cache_top_k: .*true/false"):
        config_from_dict({"type": "DistillConfig", "cache_top_k": True})


def test_an_int_is_a_float_and_a_list_is_a_tuple():
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    assert TrainConfig(grad_clip=2).grad_clip == 2.0
    assert UnstructuredPruning(n_m=[2, 4]).n_m == (2, 4)  # YAML gives lists
    assert KDConfig(temperature=4) == KDConfig(temperature=4.0)


def test_configs_round_trip_strictly():
    for cfg in (TrainConfig(epochs=2, lr=1), DistillConfig(logits={"method": "dkd"}, hints={"layers": {"a": "b"}})):
        assert config_from_dict(cfg.to_dict()) == cfg


def test_user_subclass_works_but_is_not_resolvable_by_name(registry):
    class MyConfig(Config):  # defined in this test module, not in torchslim
        depth: int = Field(2, ge=1)

    assert MyConfig(depth=3).depth == 3
    with pytest.raises(ConfigError, match="depth: .*true/false"):
        MyConfig(depth=True)
    assert "MyConfig" not in registered_config_types()
    with pytest.raises(ConfigError, match="unknown config type 'MyConfig'"):
        config_from_dict(MyConfig().to_dict())


def test_user_subclass_may_reuse_a_torchslim_name(registry):
    class TrainConfig(Config):  # noqa: F811  (a user's own class of that name)
        steps: int = 1

    assert config_from_dict({"type": "TrainConfig", "epochs": 2}) == config_module._CONFIG_TYPES["TrainConfig"](epochs=2)
    assert registry["TrainConfig"].__module__ == "torchslim.train.config"


def test_a_duplicate_name_among_torchslim_classes_fails_at_class_creation(registry):
    with pytest.raises(TypeError, match="'KDConfig' is taken by torchslim.distill.configs.KDConfig"):
        class KDConfig(Config):
            __module__ = "torchslim.somewhere_else"
            x: int = 1

    class FreshConfig(Config):
        __module__ = "torchslim.somewhere_else"
        x: int = 1

    assert registered_config_types()["FreshConfig"] is FreshConfig
    assert config_from_dict({"type": "FreshConfig", "x": 3}) == FreshConfig(x=3)


def test_every_registered_class_is_torchslims_own():
    assert registered_config_types()
    assert all(cls.__module__.startswith("torchslim.") for cls in registered_config_types().values())
