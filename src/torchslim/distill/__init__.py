"""Knowledge distillation: losses (pure functions), configs, the teacher-output cache,
feature hooks and adapters, the distillation objective, ``distill()`` and ``derive_student()``.

``torchslim.distill`` is both this package and the verb: calling the module,
``ts.distill(student, teacher, train, config, ...)``, calls
:func:`torchslim.distill.kd.distill` (also importable as
``from torchslim.distill import distill``). A plain function bound to the name
``distill`` on the ``torchslim`` package would shadow the package there, so that
``import torchslim.distill as d`` gave the function, depending on import order;
a callable module gives the same object whichever way it is reached::

    import torchslim as ts
    import torchslim.distill as d          # the package (d is ts.distill)
    from torchslim.distill import KDConfig  # its members
    ts.distill(student, teacher, train, KDConfig(), epochs=5)   # the verb

Example:
    >>> from torchslim.distill import DistillConfig, DKDConfig, HintConfig
    >>> cfg = DistillConfig(logits=DKDConfig(temperature=4.0), hints=HintConfig(weight=1.0))
    >>> cfg.describe()["weights"]
    {'task_loss': 1.0, 'tckd_loss': 1.0, 'nckd_loss': 1.0, 'hint_loss': 1.0}
"""

import inspect as _inspect
import sys as _sys
import types as _types

from torchslim.distill.cache import TeacherCache, cache_teacher_outputs, fingerprint, not_cacheable_reason
from torchslim.distill.configs import AttentionConfig, DistillConfig, DKDConfig, HintConfig, KDConfig
from torchslim.distill.checks import check_distill_layers
from torchslim.distill.frozen import freeze_teacher, frozen_teacher
from torchslim.distill.kd import KDObjective, distill, estimate_cache_bytes, prepare_teacher_cache
from torchslim.distill.losses import attention_loss, attention_map, dkd_loss, hint_loss, hinton_loss, kd_loss
from torchslim.distill.objective import DistillObjective, IndexedSplit
from torchslim.distill.students import derive_student

__all__ = [
    "AttentionConfig",
    "DKDConfig",
    "DistillConfig",
    "DistillObjective",
    "HintConfig",
    "IndexedSplit",
    "KDConfig",
    "KDObjective",
    "TeacherCache",
    "attention_loss",
    "attention_map",
    "cache_teacher_outputs",
    "check_distill_layers",
    "derive_student",
    "distill",
    "dkd_loss",
    "estimate_cache_bytes",
    "fingerprint",
    "freeze_teacher",
    "frozen_teacher",
    "hint_loss",
    "hinton_loss",
    "kd_loss",
    "not_cacheable_reason",
    "prepare_teacher_cache",
]


class _CallableModule(_types.ModuleType):
    """This package's class: calling it calls :func:`distill` (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
#: ``inspect.signature(ts.distill)`` and ``help`` show the verb's parameters.
__signature__ = _inspect.signature(distill)
