"""The next-token loss, standalone so that the training loop and tensor parallelism can swap it; and the
distillation loss that mixes it with a teacher's distribution."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Targets with this value (padding, prompt tokens in SFT) add nothing to the loss."""


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the valid targets: logits (B, T, V), targets (B, T) -> scalar, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
                      alpha: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) of knowledge distillation (Hinton et al. 2015), computed in fp32:
    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * ce.

    student and teacher logits (B, T, V) over one vocabulary, targets (B, T); kl is the mean over the positions
    with a valid target, of the KL summed over the vocabulary (B*T, V) -> (B*T,), so both terms are per-token means.
    T^2 keeps the KL term's gradients (which shrink as 1/T^2) the size of the cross-entropy's whatever T is.
    """
    valid = targets.flatten() != IGNORE_INDEX  # (B*T,)
    log_student = F.log_softmax(student.flatten(0, 1)[valid].float() / temperature, dim=-1)  # (N, V)
    log_teacher = F.log_softmax(teacher.flatten(0, 1)[valid].float() / temperature, dim=-1)  # (N, V)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)  # sum over V, mean over N
    ce = cross_entropy_loss(student, targets)
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce
