import copy
import json

import pytest
import torch
from torch import nn

from downstream import cli, linear
from downstream.common import Checkpoint, EvalConfig, open_checkpoint
from downstream.features import Features, cached_features, extract, open_split
from downstream.linear import LinearClassifier, default_lr, evaluate_head, fit_linear, parse_milestones
from seed.backbones import create_backbone
from seed.checkpoints import export_model, load_encoder
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


def test_fast_probe_does_not_depend_on_the_feature_scale():
    """A random-init MobileNetV3 gives features of about 1e-10 (its BatchNorm statistics are the init's): same probe as at scale 1."""
    train, val = separated(500, dim=16), separated(200, seed=1, dim=16)
    train = Features(train.features / 50 + 0.04 * torch.randn(500, 16, generator=torch.Generator().manual_seed(3)), train.labels, train.classes)
    val = Features(val.features / 50 + 0.04 * torch.randn(200, 16, generator=torch.Generator().manual_seed(4)), val.labels, val.classes)
    tiny = 2.0 ** -33  # about 1.2e-10; a power of two, so the scaled features are exact
    small_train, small_val = (Features(f.features * tiny, f.labels, f.classes) for f in (train, val))
    head, small_head = fit_linear(train, 10, epochs=5, batch_size=64), fit_linear(small_train, 10, epochs=5, batch_size=64)
    assert 20.0 < evaluate_head(head, val)["top1"] < 100.0
    assert evaluate_head(small_head, small_val) == evaluate_head(head, val)
    assert torch.allclose(small_head.weight * tiny, head.weight, rtol=1e-5)


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


def test_linear_probe_is_built_frozen_in_eval_mode():
    """Lightning 2.x never calls train()/eval() at fit start: the module must be in its modes as built."""
    backbone = TinyBackbone()
    assert backbone.training
    module = LinearClassifier(backbone, 3, lr=30.0, momentum=0.9, weight_decay=0.0, milestones=[60, 80])
    assert module.training and module.head.training and not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    module.train()
    assert not backbone.training


def test_full_linear_run_leaves_the_backbone_and_its_cached_features_untouched(tmp_path, monkeypatch, capsys):
    """A real ``seed-eval linear`` (engine, 3 steps at lr 30): no train() by hand, every backbone tensor bit-identical after."""
    monkeypatch.setenv("SEED_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    export_model(tmp_path / "student.pt", "r18", create_backbone("r18"), None, None, "seed", {}, small_images=False)
    opened: list[Checkpoint] = []

    def open_and_keep(config: EvalConfig) -> Checkpoint:
        opened.append(open_checkpoint(config))
        return opened[-1]

    monkeypatch.setattr(linear, "open_checkpoint", open_and_keep)
    cli.main(["linear", "--checkpoint", str(tmp_path / "student.pt"), "--data", "digits", "--image-size", "16", "--num-workers", "0",
              "--batch-size", "32", "--max-steps", "3", "--output", str(tmp_path / "run")])
    pristine, _, _ = load_encoder(tmp_path / "student.pt", use_head=False)
    expected = pristine.state_dict()
    used = opened[0].backbone.state_dict()
    assert sum(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in expected) == 60
    assert [k for k in expected if not torch.equal(used[k], expected[k])] == []
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["global_step"] == 3
    assert [k for k in expected if not torch.equal(saved["state_dict"][f"backbone.{k}"], expected[k])] == []
    head = torch.load(tmp_path / "run" / "classifier.pt", weights_only=True)["state_dict"]
    assert torch.equal(head["weight"], saved["state_dict"]["head.weight"])  # the head did train and is the one kept

    config = EvalConfig(checkpoint=str(tmp_path / "student.pt"), data="digits", image_size=16, num_workers=0)
    val_set = open_split(config, "val")
    capsys.readouterr()
    cached = cached_features(open_checkpoint(config), config, "val", val_set)  # what knn / linear --fast / semi will read
    assert "val features: (360, 512) from the cache" in capsys.readouterr().out  # the file the linear run wrote
    assert torch.equal(cached.features, extract(pristine, val_set, 64, 0, torch.device("cpu")).features)


def test_full_linear_protocol_learns_well_above_chance_and_above_its_untrained_probe(tmp_path, monkeypatch):
    """The full protocol (augmented images through the engine) on digits, 6 epochs at 16px, batch 64, on random-init r18
    features (93 % with a 20-epoch fast probe): val top-1 well above chance (10 %) and far above the same probe's before training.

    The lr is given (0.1, drops at epochs 3 and 5): the papers' 30 is for pretrained features and diverges on these.
    Seen to fail when the head's lr in configure_optimizers is 0, and when an optimizer_step override runs the closure
    but skips optimizer.step().
    """
    monkeypatch.setenv("SEED_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    export_model(tmp_path / "student.pt", "r18", create_backbone("r18"), None, None, "seed", {}, small_images=False)
    untrained: list[nn.Linear] = []

    class Recorded(LinearClassifier):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            untrained.append(copy.deepcopy(self.head))

    monkeypatch.setattr(linear, "LinearClassifier", Recorded)
    cli.main(["linear", "--checkpoint", str(tmp_path / "student.pt"), "--data", "digits", "--image-size", "16", "--num-workers", "0",
              "--batch-size", "64", "--epochs", "6", "--lr", "0.1", "--milestones", "3,5", "--output", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["settings"]["mode"] == "full (augmented images, engine)" and len(untrained) == 1
    config = EvalConfig(checkpoint=str(tmp_path / "student.pt"), data="digits", image_size=16, num_workers=0)
    val = cached_features(open_checkpoint(config), config, "val", open_split(config, "val"))
    before = evaluate_head(untrained[0], val)["top1"]
    after = results["metrics"]["top1"]
    trained = nn.Linear(512, 10)
    trained.load_state_dict(torch.load(tmp_path / "run" / "classifier.pt", weights_only=True)["state_dict"])
    assert evaluate_head(trained, val)["top1"] == pytest.approx(after, abs=1e-3)  # the score is the kept head's on these very features
    assert before < 25.0 and after > 40.0 and after > before + 25.0, (before, after)


def test_finetune_trains_the_backbone():
    backbone = TinyBackbone()
    module = LinearClassifier(backbone, 3, lr=0.1, momentum=0.9, weight_decay=0.0, milestones=[], finetune=True, backbone_lr=0.01)
    module.train()
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())
