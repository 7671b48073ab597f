"""Teacher checkpoints in the layouts of the published files (random weights, exact key names and shapes)."""

import pytest
import torch
import torchvision

from seed.checkpoints import build_head, load_encoder
from seed.errors import SeedError
from seed.teacher import FrozenTeacher

SOURCE = torchvision.models.resnet18().state_dict()
BACKBONE = {k: v for k, v in SOURCE.items() if not k.startswith("fc.")}
DIM = 512


def _mlp(prefix: str, hidden: int, out: int, batch_norm: bool) -> dict[str, torch.Tensor]:
    """A 2-layer MLP head under ``prefix``: Linear(-BN)-ReLU-Linear, with the published index layout."""
    head = {f"{prefix}0.weight": torch.randn(hidden, DIM), f"{prefix}0.bias": torch.randn(hidden)}
    last = 2
    if batch_norm:
        head.update({f"{prefix}1.{n}": torch.rand(hidden) for n in ("weight", "bias", "running_mean", "running_var")})
        head[f"{prefix}1.num_batches_tracked"] = torch.tensor(0)
        last = 3
    head.update({f"{prefix}{last}.weight": torch.randn(out, hidden), f"{prefix}{last}.bias": torch.randn(out)})
    return head


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


LAYOUTS = {
    # facebookresearch/moco main_moco.py: {'epoch', 'arch', 'state_dict', 'optimizer'}; v2 MLP head fc.0/fc.2
    "MoCo v2": lambda: {"epoch": 800, "arch": "resnet18", "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]},
                        "state_dict": {**_prefixed("module.encoder_q.", {**BACKBONE, **_mlp("fc.", DIM, 128, False)}),
                                       **_prefixed("module.encoder_k.", BACKBONE), "module.queue": torch.randn(128, 4096),
                                       "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
    "MoCo v1": lambda: {"epoch": 200, "arch": "resnet18",
                        "state_dict": _prefixed("module.encoder_q.", {**BACKBONE, "fc.weight": torch.randn(128, DIM), "fc.bias": torch.randn(128)})},
    # facebookresearch/swav: a plain state dict with module.*, projection_head (Linear-BN-ReLU-Linear) and prototypes
    "SwAV": lambda: _prefixed("module.", {**BACKBONE, **_mlp("projection_head.", 2 * DIM, 128, True), "prototypes.weight": torch.randn(3000, 128)}),
    # official SEED: the whole distiller; the student's fc is the MLP head
    "SEED official student": lambda: {"epoch": 200, "state_dict": {**_prefixed("module.student.", {**BACKBONE, **_mlp("fc.", DIM, 128, False)}),
                                                                   **_prefixed("module.teacher.", BACKBONE), "module.queue": torch.randn(4096, 128)}},
    # SimCLR converted to PyTorch: {'model': ...} with an encoder prefix and the BN MLP head
    "SimCLR (converted)": lambda: {"model": {**_prefixed("encoder.", BACKBONE), **_mlp("head.", DIM, 128, True)}},
    "plain state_dict (torchvision)": lambda: SOURCE,
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_published_layouts_load(name, tmp_path):
    path = tmp_path / "teacher.pth.tar"
    content = LAYOUTS[name]()
    torch.save(content, path)
    backbone, head, found = load_encoder(path, "r18")
    assert found == name
    for key, value in BACKBONE.items():
        assert torch.equal(backbone.state_dict()[key], value), key
    if name == "plain state_dict (torchvision)":
        assert head is None  # a 1000-class classifier is not a projection head
    else:
        assert head(torch.randn(2, DIM)).shape == (2, 128)
    assert load_encoder(path, "r18", use_head=False)[1] is None


def test_head_rebuilt_from_weights_computes_the_published_function():
    state = _mlp("", DIM, 128, True)
    head = build_head(state).eval()
    x = torch.randn(3, DIM)
    h = (x @ state["0.weight"].T + state["0.bias"] - state["1.running_mean"]) / torch.sqrt(state["1.running_var"] + 1e-5)
    h = torch.relu(h * state["1.weight"] + state["1.bias"])
    assert torch.allclose(head(x), h @ state["3.weight"].T + state["3.bias"], atol=1e-4)


def test_unknown_layout_and_wrong_arch_are_one_line_errors(tmp_path):
    torch.save({"weights": {"a": 1}, "step": 3}, tmp_path / "odd.pt")
    with pytest.raises(SeedError, match=r"fits no known format \(found keys \['weights', 'step'\]\); known: .*MoCo"):
        load_encoder(tmp_path / "odd.pt", "r18")
    torch.save(LAYOUTS["MoCo v2"](), tmp_path / "moco.pth.tar")
    with pytest.raises(SeedError, match=r"\(MoCo v2\) lacks 'layer1.0.conv3.weight' of a r50 backbone"):
        load_encoder(tmp_path / "moco.pth.tar", "r50")
    with pytest.raises(SeedError, match="does not record its architecture; pass --arch"):
        load_encoder(tmp_path / "moco.pth.tar")
    torch.save(SOURCE, tmp_path / "tv.pth")
    with pytest.raises(SeedError, match="has no projection head"):
        load_encoder(tmp_path / "tv.pth", "r18", use_head=True)


@pytest.mark.parametrize("arch", ["r18", "mbv3s", "effb0"])
def test_folded_teacher_gives_the_same_embeddings(arch):
    from seed.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone(arch, small_images=True)
    for module in backbone.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(4, 3, 32, 32)
    reference = torch.nn.functional.normalize(backbone.eval()(images), dim=1)
    folded = FrozenTeacher(backbone, None, fold_bn=True, channels_last=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.backbone.modules()) or arch != "r18"
    assert torch.allclose(folded(images), reference, atol=1e-4)
    assert not any(p.requires_grad for p in folded.parameters())
    folded.train()
    assert not folded.training
