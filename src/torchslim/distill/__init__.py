"""Knowledge distillation: losses (pure functions), the KD objective and ``distill()``."""

from torchslim.distill.kd import KDConfig, KDObjective, distill, freeze_teacher
from torchslim.distill.losses import hinton_loss, kd_loss

__all__ = ["KDConfig", "KDObjective", "distill", "freeze_teacher", "hinton_loss", "kd_loss"]
