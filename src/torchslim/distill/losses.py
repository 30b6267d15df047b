"""Knowledge-distillation losses as pure functions.

Shapes: ``student_logits`` and ``teacher_logits`` are ``(B, K)``; ``labels`` is ``(B,)``;
feature maps are ``(B, C, H, W)`` (or ``(B, F)`` for hints on fully connected layers).

Temperatures: every function accepts a finite ``1e-6 <= T <= 1e6`` and computes stably
across that whole range. The soft-target terms are scaled by T², which multiplies
rounding error by T², so above ``T = 50`` they are computed in float64 (float32 is
accurate to about 1e-6 relative up to T = 100, and 6 % off at T = 1e4). Far outside
the usual 1–20 the terms are finite but degenerate: T → 0 compares arg-maxes,
T → ∞ matches centred logits (``T²·KL → ½·mean_k((t − s − mean(t − s))²)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6
#: Above this temperature the soft-target terms are computed in float64.
FLOAT64_ABOVE = 50.0


def _soft_dtype(temperature: float) -> torch.dtype:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must be a finite number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                         f"got {temperature!r}")
    return torch.float64 if temperature > FLOAT64_ABOVE else torch.float32


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    The T² factor keeps the gradient magnitude comparable across temperatures
    (the soft-target gradients scale as 1/T²).

    Args:
        student_logits: ``(B, K)`` raw student outputs.
        teacher_logits: ``(B, K)`` raw teacher outputs (no gradient flows into them).
        temperature: T > 0; higher spreads the teacher's probability mass.

    Returns:
        A float32 scalar tensor.
    """
    dtype = _soft_dtype(temperature)
    log_p_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q); batchmean divides by B.
    loss = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    return loss.float()


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


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022): the KD loss split into its two parts.

    With ``p = softmax(z/T)`` and ``g`` the labelled class:

    - TCKD (target class): ``T² · KL([p_t^g, 1 − p_t^g] ‖ [p_s^g, 1 − p_s^g])``, a binary KL;
    - NCKD (non-target classes): ``T² · KL(p̂_t ‖ p̂_s)`` where ``p̂`` is the softmax over the
      K − 1 other classes only.

    Per sample, ``kd_loss = TCKD + (1 − p_t^g) · NCKD``: Hinton KD weighs the non-target
    knowledge by the teacher's doubt, which DKD replaces with a free weight.
    Both terms are averaged over the batch; everything is computed from log-probabilities,
    so it stays finite for any temperature in range.

    Args:
        student_logits: ``(B, K)``, K >= 2.
        teacher_logits: ``(B, K)``.
        labels: ``(B,)`` integer class labels (the target class of each row).
        temperature: T > 0.

    Returns:
        ``{"tckd_loss": scalar, "nckd_loss": scalar}`` (float32).
    """
    dtype = _soft_dtype(temperature)
    if student_logits.shape[1] < 2:
        raise ValueError("dkd_loss needs at least 2 classes")
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    others = (~target).nonzero()[:, 1].view(len(labels), -1)  # (B, K-1) indices of the non-target classes

    def binary(log_p: torch.Tensor) -> torch.Tensor:
        # [log p^g, log(1 - p^g)], the second as a logsumexp over the others (no 1 - p cancellation).
        return torch.stack([log_p.gather(1, labels[:, None]).squeeze(1),
                            torch.logsumexp(log_p.gather(1, others), dim=1)], dim=1)

    t2 = temperature**2
    tckd = F.kl_div(binary(log_s), binary(log_t), reduction="batchmean", log_target=True) * t2
    # Renormalising over the others: log_softmax of the non-target log-probabilities.
    nckd = F.kl_div(F.log_softmax(log_s.gather(1, others), dim=1), F.log_softmax(log_t.gather(1, others), dim=1),
                    reduction="batchmean", log_target=True) * t2
    return {"tckd_loss": tckd.float(), "nckd_loss": nckd.float()}


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean squared error between (adapted) student and teacher features.

    Args:
        student_features: ``(B, ...)``, already mapped to the teacher's shape by an adapter.
        teacher_features: ``(B, ...)``, same shape (no gradient flows into it).

    Returns:
        A float32 scalar: the mean over all elements.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"hint_loss: student features {tuple(student_features.shape)} and teacher features "
                         f"{tuple(teacher_features.shape)} differ in shape")
    return F.mse_loss(student_features.float(), teacher_features.detach().float())


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a feature map (Zagoruyko & Komodakis, 2017).

    ``A = mean_c |F_c|^p``, flattened and L2-normalised per sample.

    Args:
        features: ``(B, C, H, W)``.
        p: exponent; 2 in the paper.

    Returns:
        ``(B, H·W)`` float32, each row of unit L2 norm (zero rows stay zero).
    """
    if features.dim() != 4:
        raise ValueError(f"attention_map needs (B, C, H, W) features, got shape {tuple(features.shape)}")
    return F.normalize(features.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: mean squared difference of the normalised attention maps.

    Channel counts may differ (the maps average over channels); spatial sizes must match.

    Args:
        student_features: ``(B, C_s, H, W)``.
        teacher_features: ``(B, C_t, H, W)``.
        p: exponent of :func:`attention_map`.

    Returns:
        A float32 scalar: ``mean((A_s − A_t)²)`` over the batch and positions.
    """
    if student_features.shape[-2:] != teacher_features.shape[-2:]:
        raise ValueError(f"attention_loss: spatial sizes differ: student {tuple(student_features.shape)}, "
                         f"teacher {tuple(teacher_features.shape)}")
    return (attention_map(student_features, p) - attention_map(teacher_features.detach(), p)).pow(2).mean()
