import math

import pytest
import torch
import torch.nn.functional as F

from seed.losses import seed_loss, usi_loss


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


def _soft_cross_entropy(target_logits: list[float], student_logits: list[float]) -> float:
    """-sum_j softmax(target)_j log softmax(student)_j, written out."""
    target_z = sum(math.exp(v) for v in target_logits)
    log_z = math.log(sum(math.exp(v) for v in student_logits))
    return -sum(math.exp(t) / target_z * (s - log_z) for t, s in zip(target_logits, student_logits, strict=True))


def test_seed_loss_exact_values_pin_the_positive_column_the_mean_and_each_temperature():
    """Two rows, tau_s = 0.5 and tau_t = 0.25: column 0 is s.t for the student and t.t = 1 for the teacher, tau_s divides only
    the student's logits and tau_t only the teacher's, and the rows are averaged (not summed)."""
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # row 1: student [s.t, s.q1, s.q2] / 0.5 = [0.6, 1, 0] / 0.5; teacher [t.t, t.q1, t.q2] / 0.25 = [1, 0.6, 0.8] / 0.25
    row1 = _soft_cross_entropy([4.0, 2.4, 3.2], [1.2, 2.0, 0.0])
    # row 2: student [-0.6, 0, 1] / 0.5; teacher [1, 0.8, -0.6] / 0.25
    row2 = _soft_cross_entropy([4.0, 3.2, -2.4], [-1.2, 0.0, 2.0])
    assert math.isclose(float(seed_loss(s, t, queue, 0.5, 0.25)), (row1 + row2) / 2, rel_tol=1e-6)
    assert math.isclose((row1 + row2) / 2, 2.23802, abs_tol=1e-5)  # the number itself, so the formula above cannot drift with the code


def test_usi_loss_equals_its_formula_on_hand_worked_rows():
    """Row 1: student softmax (1/4, 3/4), teacher (1/2, 1/2), label class 0; row 2: student (1/2, 1/2), teacher (1/3, 2/3),
    a mixed label (0.3, 0.7). Cross-entropy to the labels and KL(teacher || student), each averaged over the two rows.
    Seen to fail with the KL's arguments swapped, with reduction "mean" (divides by classes too) and with kd_only
    dropping the weight."""
    student = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, math.log(2)]])
    target = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    cross_entropy = (math.log(4) + math.log(2)) / 2
    kl = (0.5 * math.log(2) + 0.5 * math.log(2 / 3) + math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3) / 2
    assert math.isclose(usi_loss(student, teacher, target), cross_entropy + 5 * kl, rel_tol=1e-6)
    assert math.isclose(usi_loss(student, teacher, target, kd_weight=2.0), cross_entropy + 2 * kl, rel_tol=1e-6)
    assert math.isclose(usi_loss(student, teacher, target, kd_only=True), 5 * kl, rel_tol=1e-6)
    assert math.isclose(usi_loss(student, teacher, target, kd_weight=0.0), cross_entropy, rel_tol=1e-6)
    assert math.isclose(usi_loss(student, None, target, kd_weight=0.0), cross_entropy, rel_tol=1e-6)  # USI's control: no teacher
    with pytest.raises(ValueError, match="kd_weight=0"):
        usi_loss(student, None, target)
    assert usi_loss(teacher, teacher, F.one_hot(torch.tensor([1, 1]), 2).float(), kd_only=True).abs() < 1e-6  # the same softmax: no KL
