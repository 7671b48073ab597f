import pytest
import torch
import torch.nn.functional as F
from torch import nn

from downstream.features import Features
from downstream.linear import LinearClassifier, default_lr, evaluate_head, fit_linear, parse_milestones
from seed.errors import SeedError


def separated(n: int, classes: int = 10, dim: int = 64, seed: int = 0) -> Features:
    """Classes around random centres, far apart relative to the noise, on a large offset (as raw ReLU features are)."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(42))
    labels = torch.arange(n) % classes
    features = 50 + centres[labels] + torch.randn(n, dim, generator=generator)
    return Features(features, labels, [str(c) for c in range(classes)])


def test_fast_probe_separates_separated_classes():
    train, val = separated(500), separated(200, seed=1)
    head = fit_linear(train, 10, epochs=20, batch_size=64)
    assert evaluate_head(head, val)["top1"] == 100.0
    assert isinstance(head, nn.Linear) and head.in_features == 64  # one layer on raw features: the standardisation is folded in


def test_fast_probe_on_random_labels_is_at_chance():
    train, val = separated(500), separated(1000, seed=1)
    shuffled = Features(train.features, train.labels[torch.randperm(500, generator=torch.Generator().manual_seed(0))], train.classes)
    head = fit_linear(shuffled, 10, epochs=20, batch_size=64)
    metrics = evaluate_head(head, val)
    assert metrics["top1"] < 20.0  # chance is 10%
    assert set(metrics) == {"top1", "top5"}


def test_fast_probe_stops_at_max_steps():
    train = separated(500)
    head = fit_linear(train, 10, epochs=100, batch_size=50, lr=0.1, max_steps=1)
    untrained = fit_linear(train, 10, epochs=0)
    assert not torch.equal(head.weight, untrained.weight)
    assert torch.count_nonzero(untrained.weight) == 0


def test_paper_learning_rates_and_milestones():
    assert default_lr("r50") == 30.0 and default_lr("r18") == 30.0
    assert default_lr("mbv3l") == 3.0 and default_lr("effb0") == 3.0
    assert parse_milestones(None, 100) == [60, 80]
    assert parse_milestones(None, 10) == [6, 8]
    assert parse_milestones("30, 10", 100) == [10, 30]
    with pytest.raises(SeedError, match="--milestones"):
        parse_milestones("sixty", 100)


class TinyBackbone(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 8


def test_linear_probe_keeps_the_backbone_frozen_in_eval_mode():
    backbone = TinyBackbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    module = LinearClassifier(backbone, 3, lr=30.0, momentum=0.9, weight_decay=0.0, milestones=[60, 80])
    module.train()
    assert module.training and module.head.training and not backbone.training
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    loss = F.cross_entropy(module(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm running statistics untouched
    assert module.head.weight.grad is not None


def test_finetune_trains_the_backbone():
    backbone = TinyBackbone()
    module = LinearClassifier(backbone, 3, lr=0.1, momentum=0.9, weight_decay=0.0, milestones=[], finetune=True, backbone_lr=0.01)
    module.train()
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())
