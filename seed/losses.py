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
