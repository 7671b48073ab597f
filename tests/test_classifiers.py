"""Teacher classifiers and student inits by name or file (seed.classifiers): ours, torchvision's and timm's layouts, and
the one-line errors when teachers and student do not share their classes."""

import pytest
import torch
import torchvision
from torch import nn

from seed.backbones import create_backbone
from seed.checkpoints import export_model, load_classifier, load_file
from seed.classifiers import load_student_init, load_teacher
from seed.errors import SeedError
from seed.registry import method_config
from seed.runner import run as distill

from .conftest import run_command
from .test_meal import CONFIGS, FAST, _classifier_file, _config


def _torchvision_layouts():
    resnet = torchvision.models.resnet18(num_classes=10).state_dict()
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=10).state_dict()
    return {
        "r18": (resnet, "fc."),
        "mbv3s": (mobilenet, "classifier.3."),
        "r18 DataParallel": ({f"module.{k}": v for k, v in resnet.items()}, "module.fc."),
    }


@pytest.mark.parametrize("layout", ["ours", "r18", "mbv3s", "r18 DataParallel"])
def test_teacher_classifiers_load(layout, tmp_path):
    path = tmp_path / "teacher.pth"
    if layout == "ours":
        _classifier_file(path)
        expected = load_file(path)["head_state_dict"]
        arch = None
    else:
        state, prefix = _torchvision_layouts()[layout]
        torch.save(state, path)
        expected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        arch = layout.split()[0]
    teacher, found = load_teacher(arch, str(path), _config(tmp_path))
    assert teacher.embed_dim == 10 and not teacher.normalize
    backbone, classifier, _, _ = load_classifier(path, arch)
    assert torch.equal(classifier.weight, expected["weight"]) and torch.equal(classifier.bias, expected["bias"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(images), classifier(backbone.eval()(images)), atol=1e-4)  # folded BN: same logits


def test_a_projection_head_is_not_a_classifier(tmp_path):
    backbone = create_backbone("r18", small_images=False)
    mlp = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    export_model(tmp_path / "moco.pt", "r18", backbone, mlp, 128, "mocov2", {}, False)
    with pytest.raises(SeedError, match="has an MLP projection head, not a classifier"):
        load_classifier(tmp_path / "moco.pt")
    assert load_classifier(tmp_path / "moco.pt", require_classifier=False)[1] is None  # still fine as a student init


def test_timm_teacher_when_timm_is_installed(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "timm.pth")
    teacher, found = load_teacher("timm:resnet18", str(tmp_path / "timm.pth"), _config(tmp_path))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(images), model(images), atol=1e-4)
    assert teacher.arch == "timm:resnet18" and teacher.embed_dim == 10


def test_timm_vit_and_torchvision_teachers_read_the_images_as_their_weights_expect(tmp_path):
    """A MEAL V2 / USI teacher timm:NAME from a ViT .safetensors made for 32 px reads 16-px images resized and renormalised
    (0.5, 0.5); tv:resnet18 from a torchvision file gives that model's logits. Seen to fail: with timm_classifier
    creating the ViT at its default 224 px, the file's pos_embed did not fit."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    teacher, found = load_teacher("timm:vit_tiny_patch16_224", str(tmp_path / "vit.safetensors"), _config(tmp_path))
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = nn.functional.interpolate(images * std + mean, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        assert torch.allclose(teacher(images), vit((pixels - 0.5) / 0.5), atol=1e-4)
    assert (teacher.arch, teacher.embed_dim, found) == ("timm:vit_tiny_patch16_224", 10, "timm")
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    teacher, _ = load_teacher("tv:resnet18", str(tmp_path / "resnet18.pth"), _config(tmp_path))
    with torch.no_grad():
        assert torch.allclose(teacher(images), resnet(images), atol=1e-4)
    assert (teacher.arch, teacher.embed_dim) == ("tv:resnet18", 10)


def test_timm_student_init_starts_from_timms_weights(tmp_path, monkeypatch):
    """--student-init timm:NAME (the public code starts its R-50 from timm's): our student computes what timm's model does.
    timm's weights are created here without the hub (pretrained=False, seeded), as offline tests must."""
    timm = pytest.importorskip("timm")
    create, made = timm.create_model, []

    def offline(name, pretrained=False, **kwargs):
        torch.manual_seed(7)
        made.append(create(name, pretrained=False, **kwargs).eval())
        return made[-1]

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    config = _config(tmp_path, student="r18", student_init="timm:resnet18.a1_in1k")
    path, backbone, classifier, small_images = load_student_init(config)
    assert path == str(tmp_path / "hub" / "checkpoints" / "timm-resnet18.a1_in1k.pth") and len(made) == 1
    assert classifier.out_features == 1000 and small_images is False
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(classifier(backbone.eval()(images)), made[0](images), atol=1e-4)
    load_student_init(config)
    assert len(made) == 1  # the file is kept in torch.hub's cache: timm is not asked again


def test_timm_is_an_extra_and_a_dev_dependency():
    import tomllib

    project = tomllib.loads((CONFIGS.parent / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("timm") for d in project["optional-dependencies"]["dev"])
    assert project["optional-dependencies"]["timm"] == ["timm>=0.9"]


@pytest.mark.parametrize(
    "teacher_classes, init_classes, message",
    [
        ((10, 5), 10, "teacher 2 (.*) has 5 classes, teacher 1 has 10"),
        ((5, 5), 10, "student init .* has 10 classes, the teachers 5"),
        ((5, 5), 5, "--data digits has 10 classes, the teachers 5"),
    ],
)
def test_class_mismatch_is_a_one_line_error(teacher_classes, init_classes, message, tmp_path):
    files = [str(_classifier_file(tmp_path / f"t{i}.pt", classes=c)) for i, c in enumerate(teacher_classes)]
    init = _classifier_file(tmp_path / "init.pt", classes=init_classes)
    config = method_config("distill", {"mode": "meal", "data": "digits", "teacher_checkpoints": ",".join(files),
                                         "student_init": str(init), "output": str(tmp_path / "out")})
    with pytest.raises(SeedError, match=message):
        distill(config)
    assert not (tmp_path / "out").exists()


def test_cli_class_mismatch_exits_2_with_one_line(tmp_path):
    files = [str(_classifier_file(tmp_path / f"t{c}.pt", classes=c)) for c in (10, 7)]
    result = run_command("seed-distill", "--mode", "meal", *FAST, "--teacher-checkpoints", ",".join(files), "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "has 7 classes, teacher 1 has 10" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
