import math

import torch
import torch.nn.functional as F

from seed.losses import seed_loss


def test_seed_loss_equals_its_formula_on_known_vectors():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    tau_s, tau_t = 0.5, 1.0
    # student logits: [s.t, s.q1, s.q2] / 0.5 = [0, 2, 0]; teacher: [t.t, t.q1, t.q2] / 1 = [1, 0, -1]
    p = [math.exp(1) / (math.exp(1) + 1 + math.exp(-1)), 1 / (math.exp(1) + 1 + math.exp(-1)), math.exp(-1) / (math.exp(1) + 1 + math.exp(-1))]
    log_z = math.log(1 + math.exp(2) + 1)
    expected = -(p[0] * (0 - log_z) + p[1] * (2 - log_z) + p[2] * (0 - log_z))
    assert math.isclose(float(seed_loss(s, t, queue, tau_s, tau_t)), expected, rel_tol=1e-6)


def test_seed_loss_is_batch_mean_of_soft_cross_entropy():
    torch.manual_seed(0)
    s, t, queue = (F.normalize(torch.randn(n, 8), dim=1) for n in (5, 5, 11))
    per_row = [seed_loss(s[i:i + 1], t[i:i + 1], queue, 0.2, 0.04) for i in range(5)]
    assert torch.allclose(seed_loss(s, t, queue, 0.2, 0.04), torch.stack(per_row).mean(), atol=1e-6)


def test_tiny_teacher_temperature_is_one_hot_on_the_own_embedding():
    """With tau_t = 1e-4 the target is one-hot on column 0, so the loss is the InfoNCE of s against t."""
    torch.manual_seed(1)
    s, t, queue = (F.normalize(torch.randn(n, 16), dim=1) for n in (4, 4, 32))
    logits = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1) / 0.2
    infonce = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(seed_loss(s, t, queue, 0.2, 1e-4), infonce, atol=1e-5)


def test_student_equal_to_teacher_minimises_at_equal_temperatures():
    torch.manual_seed(2)
    t, queue = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(20, 8), dim=1)
    s = F.normalize(torch.randn(3, 8), dim=1, eps=1e-12).requires_grad_()
    at_teacher = seed_loss(t, t, queue, 0.5, 0.5)
    assert seed_loss(s, t, queue, 0.5, 0.5) > at_teacher
