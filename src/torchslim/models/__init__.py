"""Model zoo presets and loading of user models.

``create(name, **overrides)`` builds a preset; ``create_from_factory("pkg.mod:fn")``
builds a user's model; both record a JSON-able spec on the model so it can be
saved and rebuilt without pickle.
"""

from torchslim.models import zoo as _zoo  # noqa: F401  (registers the presets)
from torchslim.models import zoo_extra as _zoo_extra  # noqa: F401  (registers resnet20/56, vgg_small, mobilenetv2, vit_tiny)
from torchslim.models.checks import check_finite, check_forward
from torchslim.models.registry import (
    PresetInfo,
    build_from_spec,
    create,
    create_from_factory,
    get_spec,
    import_factory,
    list_presets,
    register_preset,
)

__all__ = [
    "check_finite",
    "check_forward",
    "PresetInfo",
    "build_from_spec",
    "create",
    "create_from_factory",
    "get_spec",
    "import_factory",
    "list_presets",
    "register_preset",
]
