"""Knowledge-distillation losses as pure functions.

Shapes: ``student_logits`` and ``teacher_logits`` are ``(B, K)``; ``labels`` is ``(B,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    The T² factor keeps the gradient magnitude comparable across temperatures
    (the soft-target gradients scale as 1/T²).

    Args:
        student_logits: ``(B, K)`` raw student outputs.
        teacher_logits: ``(B, K)`` raw teacher outputs (no gradient flows into them).
        temperature: T > 0; higher spreads the teacher's probability mass.

    Returns:
        A scalar tensor.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q); batchmean divides by B.
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """``α · CE(student, labels) + (1 − α) · kd_loss(student, teacher, T)``.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``.
        labels: ``(B,)`` integer class labels.
        temperature: T > 0.
        alpha: weight of the hard-label task loss, in [0, 1].
        label_smoothing: for the task cross-entropy.

    Returns:
        ``{"loss": total, "task_loss": CE, "kd_loss": soft-target term}`` (scalars).
    """
    task = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    soft = kd_loss(student_logits, teacher_logits, temperature)
    return {"loss": alpha * task + (1.0 - alpha) * soft, "task_loss": task, "kd_loss": soft}
