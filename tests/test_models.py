"""timm:NAME and tv:NAME backbones (seed.models through seed.backbones): features, names, weights, round trips, ViT teachers."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn
from torchvision import models

from seed.backbones import create_backbone, feature_dim
from seed.checkpoints import export_model, file_sha256, load_backbone, load_classifier
from seed.errors import SeedError

from .conftest import TINY, run_command

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _images(size: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_timm_backbone_is_timms_pooled_output():
    """timm:NAME is timm's model with num_classes=0: same parameter names, same features, dim num_features.
    Seen to fail: with num_classes=0 dropped from seed.models._timm's create_model (timm's 1000-class head kept)."""
    torch.manual_seed(0)
    ours = create_backbone("timm:resnet18d").eval()
    theirs = timm.create_model("resnet18d", pretrained=False, num_classes=0).eval()
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(_images(32)), theirs(_images(32)))
    assert (ours.arch, ours.feature_dim, feature_dim("timm:resnet18d"), ours.feature_dropout) == ("timm:resnet18d", 512, 512, 0.0)


def test_torchvision_backbone_drops_the_last_linear_and_its_dropout():
    """tv:mobilenet_v3_small keeps SEED's Linear + Hardswish features (1024-d) and moves the Dropout(0.2) before the class
    Linear to feature_dropout. Seen to fail: with seed.models._last_linear taking the first Linear instead of the last."""
    torch.manual_seed(0)
    ours = create_backbone("tv:mobilenet_v3_small").eval()
    reference = models.mobilenet_v3_small().eval()
    reference.load_state_dict(ours.state_dict(), strict=False)
    features = nn.Sequential(reference.features, reference.avgpool, nn.Flatten(1), reference.classifier[0], reference.classifier[1])
    with torch.no_grad():
        assert torch.equal(ours(_images(32)), features(_images(32)))
    assert (ours.feature_dim, feature_dim("tv:mobilenet_v3_small"), ours.feature_dropout) == (1024, 1024, 0.2)
    assert set(reference.state_dict()) - set(ours.state_dict()) == {"classifier.3.weight", "classifier.3.bias"}
    assert feature_dim("tv:vit_b_16") == 768  # the head in heads.head, named, not numbered


@pytest.mark.parametrize("name, message", [
    ("timm:resnt18", "timm has no model 'resnt18' (did you mean resnet18"),
    ("tv:resnet19", "torchvision has no classification model 'resnet19' (did you mean resnet18"),
    ("resnet18", "timm:NAME or tv:NAME (did you mean r18, tv:resnet18?)"),
    ("r19", "(did you mean r18"),
])
def test_unknown_names_stop_with_close_matches(name, message):
    """One line with close matches. Seen to fail: with the difflib hints removed (seed.models._close, seed.backbones._lookup)."""
    with pytest.raises(SeedError) as error:
        feature_dim(name)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cli_unknown_timm_student_is_one_line_exit_2(tmp_path):
    """Exit 2, one line, nothing written. Seen to fail: with seed.models._close's hint removed."""
    result = run_command("seed-distill", "--student", "timm:resnt18", *TINY, "--output", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2 and "did you mean resnet18" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, size", [("timm:resnet18", 32), ("tv:mobilenet_v3_small", 32)])
def test_student_round_trip_gives_the_same_features_to_the_last_bit(name, size, tmp_path):
    """A timm/torchvision student.pt records its full name; load_backbone, seed-eval's open_checkpoint and --student-init's
    reader rebuild it with bit-identical features. Seen to fail: with seed.checkpoints._backbone_from not loading the
    state dict (random weights)."""
    from types import SimpleNamespace

    from downstream.common import open_checkpoint

    torch.manual_seed(3)
    student = create_backbone(name, small_images=True).eval()
    path = tmp_path / "student.pt"
    export_model(path, name, student, None, None, "seed", {}, True)
    with torch.no_grad():
        expected = student(_images(size))
        for backbone in (load_backbone(path), open_checkpoint(SimpleNamespace(checkpoint=str(path), arch=None, image_size=size)).backbone,
                         load_classifier(path, name, require_classifier=False)[0]):
            assert backbone.arch == name
            assert torch.equal(backbone.eval()(_images(size)), expected)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_files_load_and_safetensors_needs_no_pickle(suffix, tmp_path, monkeypatch):
    """A timm state dict, .pth or .safetensors (classifier included), loads into timm:NAME; safetensors never reaches
    torch.load. Seen to fail: without load_file's safetensors branch (the file was 'not a PyTorch checkpoint')."""
    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file(model.state_dict(), str(path))
        monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load read a safetensors file"))
    else:
        torch.save(model.state_dict(), path)
    backbone, classifier, _, _ = load_classifier(path, "timm:resnet18")
    with torch.no_grad():
        assert torch.equal(classifier(backbone.eval()(_images(32))), model(_images(32)))


@pytest.mark.parametrize("teacher, fetch", [("timm:resnet18", "timm"), ("tv:resnet18", "torchvision")])
def test_hub_weights_offline_name_the_file_to_pass(teacher, fetch, tmp_path):
    """Without --teacher-checkpoint a timm/tv teacher takes the hub's weights; offline that is one line naming the flag.
    Seen to fail: without the hub branch of seed.distill.default_teacher_checkpoint (the demo teacher's message came instead)."""
    result = run_command("seed-distill", "--teacher", teacher, *TINY, "--output", str(tmp_path / "out"), timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")})
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and f"{fetch}'s" in last and "could not be fetched" in last and "--teacher-checkpoint" in last


def _vit_file(tmp_path, size: int = 32) -> str:
    """A random-weight timm ViT-Tiny/16 made for ``size`` px, saved as safetensors (classifier included)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size)
    path = tmp_path / "vit.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_vit_teacher_sees_the_students_crop_resized_and_renormalised(tmp_path):
    """In SEED's step the ViT reads the student's 16px crop resized (bicubic, its pretrained_cfg) to the 32px its weights
    were made for, renormalised from ImageNet's mean/std to its own (0.5, 0.5). Seen to fail: with build_teacher giving
    no TeacherInput (the ViT got the 16px crop)."""
    from seed.config import resolve
    from seed.distill import SEED, build_teacher
    from seed.registry import method_config

    config = resolve(method_config("distill", {"student": "r18", "image_size": 16, "batch_size": 4, "queue_size": 8, "knn_every": 0,
                                                 "teacher": "timm:vit_tiny_patch16_224", "output": str(tmp_path)}), SEED.DEFAULTS)
    teacher, _ = build_teacher(config, _vit_file(tmp_path))
    module = SEED(config, teacher, num_classes=10)
    seen = {}
    module.backbone.register_forward_pre_hook(lambda _, args: seen.setdefault("student", args[0].clone()))
    teacher.backbone.register_forward_pre_hook(lambda _, args: seen.setdefault("teacher", args[0].clone()))
    module.training_step(([_images(16, 4)], torch.zeros(4)), 0)
    mean, std = (torch.tensor(IMAGENET_NORMALIZE[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    pixels = F.interpolate(seen["student"] * std + mean, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(seen["student"], _images(16, 4))
    assert seen["teacher"].shape == (4, 3, 32, 32)
    assert torch.allclose(seen["teacher"], (pixels - 0.5) / 0.5, atol=1e-5)
    assert teacher.embed_dim == 192  # the CLS token of ViT-Tiny (timm's global_pool 'token')


@pytest.mark.parametrize("cache", [False, True])
def test_seed_smoke_run_from_a_vit_teacher_file(cache, tmp_path):
    """seed-distill from a random-weight ViT-Tiny safetensors file into timm:resnet18, with and without --teacher-cache; the
    student.pt records timm:resnet18 and reads back; the cache is keyed by the ViT's file. Seen to fail: with the report's
    teacher kNN row built without its TeacherInput (a crash on the 16px images)."""
    args = ["--teacher", "timm:vit_tiny_patch16_224", "--teacher-checkpoint", _vit_file(tmp_path), "--student", "timm:resnet18",
            *TINY, "--queue-size", "64", "--max-steps", "2", "--output", str(tmp_path / "run")]
    result = run_command("seed-distill", *args, *(["--teacher-cache", "--cache-views", "1"] if cache else []), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "192-d embeddings" in result.stdout and "teacher timm:vit_tiny_patch16_224" in result.stdout
    assert ("teacher cache:" in result.stdout) == cache
    student = load_backbone(tmp_path / "run" / "student.pt")
    assert student.arch == "timm:resnet18"
    if cache:  # keyed by the ViT's name and file; the 2 steps' 32 rows filled
        folder = tmp_path / "run" / "teacher_cache"
        key = json.loads((folder / "key.json").read_text())
        assert key["teachers"] == [["timm:vit_tiny_patch16_224", file_sha256(tmp_path / "vit.safetensors")]] and key["width"] == 192
        assert int(np.load(folder / "filled.npy").sum()) == 32
    assert math.isfinite(float(result.stdout.split("distilled")[-1].split()[0]))


def test_torchvision_auxiliary_classifiers_are_dropped():
    """GoogLeNet's auxiliary heads are training losses: in train mode the backbone still gives one feature tensor.
    Seen to fail: without the aux_logits branch of seed.models._torchvision, train mode returned GoogLeNetOutputs."""
    backbone = create_backbone("tv:googlenet").train()
    features = backbone(_images(64))
    assert isinstance(features, torch.Tensor) and features.shape == (2, 1024) and backbone.aux1 is None


def test_a_vit_student_at_another_image_size_is_one_line_before_training(tmp_path):
    """A timm ViT made for 224 px, asked to train at 16 px, stops in configure (exit 2, one line), not in timm's assertion.
    Seen to fail: without check_image_size in TrainModule.configure, a traceback ended in 'Input height (16) doesn't match'."""
    result = run_command("seed-distill", "--student", "timm:vit_tiny_patch16_224", *TINY, "--output", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        "seed-distill: error: timm:vit_tiny_patch16_224 takes 224px images (its img_size), not --image-size 16; "
        "pass --image-size 224 or another model")
