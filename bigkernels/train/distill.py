"""Knowledge distillation: a student learns from a teacher's softened outputs and the true labels
(Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network").

    loss = alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 - alpha) · CE(student, labels)

The T² keeps the soft term's gradients on the same scale as the hard term's when T changes (the
softened gradients shrink as 1/T²).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Optional[Tensor] = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> Tensor:
    """Temperature-scaled KL to the teacher, × T², plus (with targets) the hard-label cross-entropy.

    Args:
        student_logits, teacher_logits: (..., C) logits of the same shape; the leading dimensions are
            flattened into rows and the KL is averaged over rows ("batchmean").
        targets: (...) integer class indices, or None for the soft term alone.
        temperature: T > 0; alpha in [0, 1] weighs the soft term (1 - alpha the hard one).
    Returns a scalar tensor; gradients flow into the student only (the teacher is detached).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss: teacher_logits must have the student_logits' shape "
            f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation_loss: alpha must be in [0, 1], got {alpha}")
    classes = student_logits.shape[-1]
    student = (student_logits.reshape(-1, classes) / temperature).float().log_softmax(-1)
    teacher = (teacher_logits.detach().reshape(-1, classes) / temperature).float().log_softmax(-1)
    soft = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2
    if targets is None:
        return soft
    hard = F.cross_entropy(student_logits.reshape(-1, classes).float(), targets.reshape(-1))
    return alpha * soft + (1 - alpha) * hard


class distillation_step:  # noqa: N801 - used like a function: fit(..., compute_loss=distillation_step(teacher))
    """The loss of one teacher→student step, for ``fit(compute_loss=...)`` or a loop of your own.

        step = distillation_step(teacher, temperature=4.0, alpha=0.7)
        loss = step(student, (inputs, targets))   # teacher in eval mode, under no_grad
        loss.backward()

    The teacher runs in eval mode without gradients, on the batch's inputs; targets may be None
    (pure distillation on unlabeled data: batches of (inputs, None) or just inputs).
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 2.0, alpha: float = 0.5) -> None:
        self.teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, student: nn.Module, batch: Any) -> Tensor:
        inputs, targets = batch if isinstance(batch, (tuple, list)) else (batch, None)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return distillation_loss(student(inputs), teacher_logits, targets, temperature=self.temperature, alpha=self.alpha)
