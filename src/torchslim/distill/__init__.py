"""Knowledge distillation: losses (pure functions), configs, the teacher-output cache,
feature hooks and adapters, the distillation objective, ``distill()`` and ``derive_student()``.

Example:
    >>> from torchslim.distill import DistillConfig, DKDConfig, HintConfig
    >>> cfg = DistillConfig(logits=DKDConfig(temperature=4.0), hints=HintConfig(weight=1.0))
    >>> cfg.describe()["weights"]
    {'task_loss': 1.0, 'tckd_loss': 1.0, 'nckd_loss': 8.0, 'hint_loss': 1.0}
"""

from torchslim.distill.cache import TeacherCache, cache_teacher_outputs, fingerprint, not_cacheable_reason
from torchslim.distill.configs import AttentionConfig, DistillConfig, DKDConfig, HintConfig, KDConfig
from torchslim.distill.kd import KDObjective, distill, estimate_cache_bytes, prepare_teacher_cache
from torchslim.distill.losses import attention_loss, attention_map, dkd_loss, hint_loss, hinton_loss, kd_loss
from torchslim.distill.objective import DistillObjective, IndexedSplit, freeze_teacher
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
    "derive_student",
    "distill",
    "dkd_loss",
    "estimate_cache_bytes",
    "fingerprint",
    "freeze_teacher",
    "hint_loss",
    "hinton_loss",
    "kd_loss",
    "not_cacheable_reason",
    "prepare_teacher_cache",
]
