"""Losses as plain functions on tensors, each with the equation it implements."""

import torch
import torch.nn.functional as F
from torch import Tensor


def seed_loss(student: Tensor, teacher: Tensor, queue: Tensor, tau_s: float, tau_t: float) -> Tensor:
    """SEED's similarity cross-entropy (Fang et al. 2021, Eq. 4-6), averaged over the batch.

    With L2-normalised embeddings ``student`` (N,D), ``teacher`` (N,D) and the
    queue of past teacher embeddings ``queue`` (K,D), the anchors are the
    batch's own teacher embedding followed by the queue:

        p_T = softmax([t.t, t.Q] / tau_t),  z_S = [s.t, s.Q] / tau_s,
        loss = -sum_j p_T[j] log softmax(z_S)[j].

    Computed in float32 so that tau_t = 1e-4 stays exact under autocast.
    """
    student, teacher, queue = student.float(), teacher.float(), queue.float()
    anchors_student = torch.cat([(student * teacher).sum(1, keepdim=True), student @ queue.T], dim=1)
    anchors_teacher = torch.cat([(teacher * teacher).sum(1, keepdim=True), teacher @ queue.T], dim=1)
    target = F.softmax(anchors_teacher / tau_t, dim=1)
    return -(target * F.log_softmax(anchors_student / tau_s, dim=1)).sum(dim=1).mean()


def ensemble_target(teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """MEAL V2's soft target (Shen & Savvides 2020, Sec. 3): the mean of the teachers' softmax outputs.

    ``teacher_logits`` is (T, N, C), one row of logits per teacher and image;
    returns (N, C) probabilities ``p_T = 1/T sum_t softmax(z_t / temperature)``.
    """
    return F.softmax(teacher_logits.float() / temperature, dim=-1).mean(dim=0)


def soft_cross_entropy(student_logits: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """MEAL V2's KD loss: ``-sum_c p_T[c] log softmax(z_S / temperature)[c]``, averaged over the batch.

    At a temperature other than MEAL V2's 1 the loss is multiplied by
    ``temperature**2``, so that its gradients keep their size (Hinton et al.
    2015, Sec. 2). No hard labels enter it.
    """
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    return -(target.float() * log_probs).sum(dim=1).mean() * temperature**2


def discriminator_loss(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """MEAL V2's discriminator loss: BCE-with-logits of the (N, 2) scores against one-hot rows.

    Student rows are labelled ``[1, 0]``, teacher rows ``[0, 1]`` (as in the
    public code); the mean runs over all ``2N x 2`` entries, as
    ``nn.BCEWithLogitsLoss`` does.
    """
    scores = torch.cat([student_scores, teacher_scores]).float()
    labels = torch.zeros_like(scores)
    labels[: len(student_scores), 0] = 1.0
    labels[len(student_scores):, 1] = 1.0
    return F.binary_cross_entropy_with_logits(scores, labels)


def usi_loss(student: Tensor, teacher: Tensor | None, target: Tensor, kd_weight: float = 5.0, kd_only: bool = False) -> Tensor:
    """USI's loss (Ridnik et al. 2022, Sec. 3; ``train.py`` of Alibaba-MIIL/Solving_ImageNet), on logits and soft targets.

    ``-sum_c y[c] log softmax(z_S)[c]`` to the (mixed) labels ``target``, averaged over the batch (timm's
    ``SoftTargetCrossEntropy``), plus ``kd_weight`` x ``KL(softmax(z_T) || softmax(z_S))`` summed over classes and
    averaged over the batch (``F.kl_div(..., reduction="batchmean")``), at temperature 1. ``kd_only`` keeps only the
    weighted KD term, as ``--use_kd_only_loss`` does. ``teacher=None`` (with ``kd_weight`` 0: USI's recipe without KD)
    has no KD term, so the control runs no teacher.
    """
    log_probs = F.log_softmax(student.float(), dim=1)
    cross_entropy = -(target.float() * log_probs).sum(dim=1).mean()
    if teacher is None:
        if kd_weight != 0 or kd_only:
            raise ValueError("usi_loss without a teacher has no KD term: pass kd_weight=0 and kd_only=False")
        return cross_entropy
    kd = kd_weight * F.kl_div(log_probs, F.softmax(teacher.float(), dim=1), reduction="batchmean")
    return kd if kd_only else cross_entropy + kd
