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


#: The other encoder of a two-encoder file (MoCo's key encoder, SEED's teacher): the same keys and shapes, other values,
#: so that a reader taking that copy instead of the query encoder / student is caught.
OTHER = {k: v + 1.0 if v.is_floating_point() else v for k, v in BACKBONE.items()}


LAYOUTS = {
    # facebookresearch/moco main_moco.py: {'epoch', 'arch', 'state_dict', 'optimizer'}; v2 MLP head fc.0/fc.2
    "MoCo v2": lambda: {"epoch": 800, "arch": "resnet18", "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]},
                        "state_dict": {**_prefixed("module.encoder_q.", {**BACKBONE, **_mlp("fc.", DIM, 128, False)}),
                                       **_prefixed("module.encoder_k.", {**OTHER, **_mlp("fc.", DIM, 128, False)}), "module.queue": torch.randn(128, 4096),
                                       "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
    "MoCo v1": lambda: {"epoch": 200, "arch": "resnet18",
                        "state_dict": _prefixed("module.encoder_q.", {**BACKBONE, "fc.weight": torch.randn(128, DIM), "fc.bias": torch.randn(128)})},
    # facebookresearch/swav: a plain state dict with module.*, projection_head (Linear-BN-ReLU-Linear) and prototypes
    "SwAV": lambda: _prefixed("module.", {**BACKBONE, **_mlp("projection_head.", 2 * DIM, 128, True), "prototypes.weight": torch.randn(3000, 128)}),
    # official SEED: the whole distiller; the student's fc is the MLP head
    "SEED official student": lambda: {"epoch": 200, "state_dict": {**_prefixed("module.student.", {**BACKBONE, **_mlp("fc.", DIM, 128, False)}),
                                                                   **_prefixed("module.teacher.", {**OTHER, **_mlp("fc.", DIM, 128, False)}),
                                                                   "module.queue": torch.randn(4096, 128)}},
    # SimCLR converted to PyTorch: {'model': ...} with an encoder prefix and the BN MLP head
    "SimCLR (converted)": lambda: {"model": {**_prefixed("encoder.", BACKBONE), **_mlp("head.", DIM, 128, True)}},
    # SEED's released simclr_200.pth: SimCLRResNet (the ResNet as .module) in two DataParallels; fc = Linear-BN-ReLU-Linear
    "SimCLR (SEED release)": lambda: {"model": _prefixed("module.module.module.", {**BACKBONE, **_mlp("fc.", DIM, 128, True)})},
    # the same weights saved without wrappers: fc.0-fc.3 is still a projection head, not a classifier to drop
    "ResNet state_dict with an MLP head (fc.0...)": lambda: {**BACKBONE, **_mlp("fc.", DIM, 128, True)},
    "plain state_dict (torchvision)": lambda: SOURCE,
}


#: Where each layout keeps the head that must be loaded: the query encoder's / the student's, never the key encoder's or teacher's.
HEADS = {"MoCo v2": "module.encoder_q.fc.", "MoCo v1": "module.encoder_q.fc.", "SwAV": "module.projection_head.",
         "SEED official student": "module.student.fc.", "SimCLR (converted)": "head.", "SimCLR (SEED release)": "module.module.module.fc.",
         "ResNet state_dict with an MLP head (fc.0...)": "fc."}
#: The second encoder of the two-encoder layouts.
SECOND = {"MoCo v2": "module.encoder_k.", "SEED official student": "module.teacher."}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_published_layouts_load(name, tmp_path):
    """The backbone and head are the query encoder's (MoCo) / the student's (SEED), whose twin in the file holds other values.

    Seen to fail when the MoCo reader's prefix is changed to ``module.encoder_k.`` and the SEED reader's to ``module.teacher.``.
    """
    path = tmp_path / "teacher.pth.tar"
    content = LAYOUTS[name]()
    torch.save(content, path)
    backbone, head, found = load_encoder(path, "r18")
    assert found == name
    loaded = backbone.state_dict()
    for key, value in BACKBONE.items():
        assert torch.equal(loaded[key], value), key
    tensors = content.get("state_dict", content.get("model", content))
    if name in SECOND:
        twin = {k[len(SECOND[name]):]: v for k, v in tensors.items() if k.startswith(SECOND[name])}
        assert twin.keys() >= BACKBONE.keys() and not any(torch.equal(loaded[k], twin[k]) for k in BACKBONE if twin[k].is_floating_point())
    if name == "plain state_dict (torchvision)":
        assert head is None  # a 1000-class classifier is not a projection head
    else:
        expected = {k[len(HEADS[name]):]: v for k, v in tensors.items() if k.startswith(HEADS[name])}
        expected = {f"0.{k}": v for k, v in expected.items()} if "weight" in expected else expected  # MoCo v1: one Linear
        assert head.state_dict().keys() == expected.keys()
        assert all(torch.equal(v, expected[k]) for k, v in head.named_parameters())  # BatchNorm statistics: the test below
        assert head(torch.randn(2, DIM)).shape == (2, 128)
    assert load_encoder(path, "r18", use_head=False)[1] is None


def test_a_loaded_projection_head_keeps_its_batchnorm_statistics(tmp_path):
    """SwAV's and SimCLR's heads hold a BatchNorm1d whose running statistics the frozen teacher uses: they must be the file's.

    Seen to fail when load_encoder probes the head's input size in train mode (mean x0.9, var x0.9 + 0.1 x 0).
    """
    torch.save(LAYOUTS["SwAV"](), tmp_path / "swav.pth.tar")
    expected = {k.removeprefix("module.projection_head."): v for k, v in torch.load(tmp_path / "swav.pth.tar").items()
                if k.startswith("module.projection_head.1.")}
    head = load_encoder(tmp_path / "swav.pth.tar", "r18")[1]
    assert [k for k, v in head.state_dict().items() if k in expected and not torch.equal(v, expected[k])] == []


def test_head_rebuilt_from_weights_computes_the_published_function():
    state = {k: v.double() if v.is_floating_point() else v for k, v in _mlp("", DIM, 128, True).items()}
    head = build_head(state).double().eval()  # float64: sums of 512 products near 1e3 lose ~1e-4 in float32
    x = torch.randn(3, DIM, dtype=torch.float64)
    h = (x @ state["0.weight"].T + state["0.bias"] - state["1.running_mean"]) / torch.sqrt(state["1.running_var"] + 1e-5)
    h = torch.relu(h * state["1.weight"] + state["1.bias"])
    torch.testing.assert_close(head(x), h @ state["3.weight"].T + state["3.bias"], rtol=1e-10, atol=1e-9)


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
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.backbone.modules())
    assert torch.allclose(folded(images), reference, atol=1e-4)
    assert not any(p.requires_grad for p in folded.parameters())
    folded.train()
    assert not folded.training


def _numbered(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Tensor i holds the value i everywhere, as a stride-0 view of one number: full-size keys and shapes at no memory cost."""
    return {k: torch.tensor(i).expand(shape) if k.endswith("num_batches_tracked") else torch.tensor(float(i)).expand(shape)
            for i, (k, shape) in enumerate(shapes.items())}


def _shapes(arch: str) -> dict[str, torch.Size]:
    from seed.backbones import create_backbone

    with torch.device("meta"):
        return {k: v.shape for k, v in create_backbone(arch).state_dict().items()}


def _head_shapes(prefix: str, sizes: list[int], batch_norm: bool) -> dict[str, torch.Size]:
    """Linear(sizes[0], sizes[1]) (-BN) - ReLU - Linear(sizes[1], sizes[2]) under ``prefix``."""
    d, hidden, out = sizes
    head = {f"{prefix}0.weight": torch.Size([hidden, d]), f"{prefix}0.bias": torch.Size([hidden])}
    if batch_norm:
        head.update({f"{prefix}1.{n}": torch.Size([hidden]) for n in ("weight", "bias", "running_mean", "running_var")})
        head[f"{prefix}1.num_batches_tracked"] = torch.Size([])
    last = 3 if batch_norm else 2
    return {**head, f"{prefix}{last}.weight": torch.Size([out, hidden]), f"{prefix}{last}.bias": torch.Size([out])}


def _released(name: str) -> tuple[str, dict, str, list[type]]:
    """(arch, file content, format found, head layer types) of each teacher SEED's README links, with the layout its loaders
    (tools/utils.py: load_moco/simclr/swav_teacher_encoder) read: MoCo files hold state_dict/module.encoder_q.*,
    simclr_200.pth model/module.module.module.*, SwAV files module.* with projection_head and prototypes."""
    linear, bn, relu = torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU
    arch, kind = {"moco_v1_200ep_pretrain.pth.tar": ("r50", "v1"), "jianfw_mocov2_ResNet50_epoch200.pth": ("r50", "v2"),
                  "moco_v2_800ep_pretrain.pth.tar": ("r50", "v2"), "res101-moco-v2-checkpoint_0199.pth.tar": ("r101", "v2"),
                  "200-resnet152-moco-v2-checkpoint_0199.pth.tar": ("r152", "v2"), "simclr_200.pth": ("r50", "simclr"),
                  "swav_800ep_pretrain.pth.tar": ("r50", "swav"), "swav_RN50w2_400ep_pretrain.pth.tar": ("r50x2", "swav")}[name]
    backbone = _shapes(arch)
    d = 4096 if arch == "r50x2" else 2048
    if kind == "v1":
        head = {"fc.weight": torch.Size([128, d]), "fc.bias": torch.Size([128])}
        return arch, {"epoch": 200, "arch": "resnet50", "state_dict": _prefixed("module.encoder_q.", _numbered({**backbone, **head}))}, "MoCo v1", [linear]
    if kind == "v2":
        state = _prefixed("module.encoder_q.", _numbered({**backbone, **_head_shapes("fc.", [d, d, 128], False)}))
        return arch, {"epoch": 200, "arch": "resnet", "state_dict": state}, "MoCo v2", [linear, relu, linear]
    if kind == "simclr":
        state = _prefixed("module.module.module.", _numbered({**backbone, **_head_shapes("fc.", [d, d, 128], True)}))
        return arch, {"model": state}, "SimCLR (SEED release)", [linear, bn, relu, linear]
    hidden = 8192 if arch == "r50x2" else 2048  # SEED main.py: swav_mlp
    shapes = {**backbone, **_head_shapes("projection_head.", [d, hidden, 128], True), "prototypes.weight": torch.Size([3000, 128])}
    return arch, _prefixed("module.", _numbered(shapes)), "SwAV", [linear, bn, relu, linear]


@pytest.mark.parametrize("name", ["moco_v1_200ep_pretrain.pth.tar", "jianfw_mocov2_ResNet50_epoch200.pth", "moco_v2_800ep_pretrain.pth.tar",
                                  "res101-moco-v2-checkpoint_0199.pth.tar", "200-resnet152-moco-v2-checkpoint_0199.pth.tar", "simclr_200.pth",
                                  "swav_800ep_pretrain.pth.tar", "swav_RN50w2_400ep_pretrain.pth.tar"])
def test_every_released_seed_teacher_loads_with_its_head(name, tmp_path):
    """Full-size layouts of SEED's teacher downloads: every backbone key lands where its number says, and the head is kept."""
    arch, content, fmt, head_layers = _released(name)
    torch.save(content, tmp_path / name)
    backbone, head, found = load_encoder(tmp_path / name, arch)
    assert found == fmt
    state = next(v for k, v in content.items() if k in ("state_dict", "model")) if fmt != "SwAV" else content
    prefix = next(p for p in ("module.encoder_q.", "module.module.module.", "module.") if any(k.startswith(p) for k in state))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[prefix + key].to(value.dtype)), key
    assert [type(layer) for layer in head] == head_layers
    assert head[-1].out_features == 128 and head[0].in_features == backbone.feature_dim
    assert torch.equal(head[0].weight, state[prefix + ("projection_head.0.weight" if fmt == "SwAV" else "fc.weight" if fmt == "MoCo v1" else "fc.0.weight")])
