import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from seed.backbones import create_backbone
from seed.checkpoints import export_model, load_classifier, load_file
from seed.classification import cutmix
from seed.config import DistillConfig, resolve
from seed.engine import build_trainer, fit
from seed.errors import SeedError
from seed.loaders import make_loader
from seed.losses import discriminator_loss, ensemble_target, soft_cross_entropy
from seed.meal import MEAL, Discriminator
from seed.registry import method_config
from seed.runner import run as distill
from seed.sampling import FixedCrops
from seed.teacher import FrozenTeacher
from seed.teacher_cache import FOLDER, TeacherCache

from .conftest import run_command

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAST = ["--data", "digits", "--image-size", "16", "--no-small-images", "--batch-size", "16", "--num-workers", "0", "--knn-query-size", "64"]


def _config(tmp_path, **values) -> DistillConfig:
    base = {"mode": "meal", "student": "r18", "image_size": 16, "small_images": False, "batch_size": 32, "knn_every": 0, "output": str(tmp_path)}
    return resolve(method_config("distill", {**base, **values}), MEAL.DEFAULTS)


def _linear_teacher(seed: int, classes: int = 10, scale: float = 3.0) -> FrozenTeacher:
    """A fixed random classifier of 16px images: pixels -> 32-d projection -> classes."""
    generator = torch.Generator().manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32))
    head = nn.Linear(32, classes)
    with torch.no_grad():
        for parameter in [*backbone.parameters(), *head.parameters()]:
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator) / math.sqrt(max(parameter.shape[-1], 1)))
    backbone.feature_dim, backbone.arch = 32, f"linear{seed}"
    return FrozenTeacher(backbone, head, fold_bn=False, normalize=False)


def _classifier_file(path: Path, classes: int = 10, arch: str = "r18", seed: int = 0) -> Path:
    """Our supervised export (as seed-pretrain --method supervised writes it), random weights."""
    torch.manual_seed(seed)
    backbone = create_backbone(arch, small_images=False)
    head = nn.Linear(backbone.feature_dim, classes)
    export_model(path, arch, backbone, head, classes, "supervised", {}, False, extra={"num_classes": classes})
    return path


# ---- losses ----------------------------------------------------------------------------------------------------

def test_ensemble_target_is_the_mean_of_the_teachers_softmaxes():
    logits = torch.tensor([[[0.0, math.log(3.0)]], [[math.log(4.0), 0.0]]])  # teacher 1: [1/4, 3/4], teacher 2: [4/5, 1/5]
    expected = torch.tensor([[(0.25 + 0.8) / 2, (0.75 + 0.2) / 2]])
    assert torch.allclose(ensemble_target(logits), expected, atol=1e-6)
    assert torch.allclose(ensemble_target(logits, temperature=2.0), (F.softmax(logits[0] / 2, 1) + F.softmax(logits[1] / 2, 1)) / 2)


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_module_trains_on_the_mean_softmax_of_two_teachers_that_disagree(temperature, tmp_path, monkeypatch):
    """A training step with two different teachers: its target is the mean of their softmaxes (worked out here with
    torch.softmax, not the product's function), the discriminator's teacher input the mean of their logits, and the loss
    the KD cross-entropy plus the weighted BCE on those, as the module's docstrings say.

    Seen to fail when the product takes the softmax of the mean logits, and when it uses the first teacher only.
    """
    teachers = [_linear_teacher(1), _linear_teacher(2)]
    module = MEAL(_config(tmp_path, kd_temperature=temperature, discriminator_weight=0.5), teachers, num_classes=10)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = (teacher(images) for teacher in teachers)
    expected = (torch.softmax(first / temperature, 1) + torch.softmax(second / temperature, 1)) / 2
    for wrong in (torch.softmax((first + second) / 2 / temperature, 1), torch.softmax(first / temperature, 1)):
        assert (expected - wrong).abs().max() > 0.05  # the teachers disagree: either mistake moves the target far
    seen = {}
    losses = module.losses

    def spy(student, target, teacher, log_probs=False):
        seen.update(student=student, target=target, teacher=teacher)
        return losses(student, target, teacher, log_probs)

    monkeypatch.setattr(module, "losses", spy)
    module.train()
    loss = module.training_step((images, torch.zeros(8, dtype=torch.long)), 0)
    torch.testing.assert_close(seen["target"], expected)
    torch.testing.assert_close(seen["teacher"], (first + second) / 2)
    student = seen["student"]
    kd = -(expected * torch.log_softmax(student / temperature, 1)).sum(1).mean() * temperature**2
    scores = module.discriminator(torch.cat([student, (first + second) / 2]))
    labels = torch.cat([torch.tensor([[1.0, 0.0]]).expand(8, 2), torch.tensor([[0.0, 1.0]]).expand(8, 2)])  # student rows, teacher rows
    torch.testing.assert_close(loss, kd + 0.5 * F.binary_cross_entropy_with_logits(scores, labels))


def test_soft_cross_entropy_equals_its_formula():
    student = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax rows [1/4, 3/4] and [1/2, 1/2]
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expected = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) - math.log(0.5)) / 2
    assert math.isclose(float(soft_cross_entropy(student, target)), expected, rel_tol=1e-6)
    tau = 4.0
    scaled = -(target * F.log_softmax(student / tau, 1)).sum(1).mean() * tau**2
    assert math.isclose(float(soft_cross_entropy(student, target, tau)), float(scaled), rel_tol=1e-6)


def test_discriminator_loss_is_bce_against_one_hot_rows():
    student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    bce = lambda x, y: -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))  # noqa: E731
    expected = (bce(2.0, 1) + bce(0.0, 0) + bce(0.0, 0) + bce(1.0, 1)) / 4  # student rows [1,0], teacher rows [0,1]
    assert math.isclose(float(discriminator_loss(student, teacher)), expected, rel_tol=1e-6)


def test_discriminator_has_the_codes_layers():
    layers = [m for m in Discriminator(1000).layers]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [(1000, 125), (125, 15), (15, 2)]
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU] * 3  # a ReLU after the last layer too, as in the code
    assert (Discriminator(10)(torch.randn(5, 10)) >= 0).all()


# ---- gradients: who learns from what ------------------------------------------------------------------------------

@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_label_weight_adds_the_hard_labels_cross_entropy_and_nothing_else(tmp_path):
    """``--label-weight w`` (the paper's ablation with hard labels): the loss is the no-label loss plus w x the cross-entropy of
    the student's logits to the labels; at 0 the labels are never read. Seen to fail when the weight was ignored, and when the
    CE was taken on the teachers' target instead of the labels."""
    teachers = [_linear_teacher(1), _linear_teacher(2)]
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    plain = MEAL(_config(tmp_path, discriminator="off"), teachers, num_classes=10).train()
    weighted = MEAL(_config(tmp_path, discriminator="off", label_weight=0.5), teachers, num_classes=10).train()
    weighted.load_state_dict(plain.state_dict())
    without = plain.training_step((images, labels), 0)
    assert torch.equal(without, plain.training_step((images, torch.randint(0, 10, (8,))), 0))  # weight 0: labels unread
    expected = without + 0.5 * F.cross_entropy(plain(images), labels)
    torch.testing.assert_close(weighted.training_step((images, labels), 0), expected)


@pytest.mark.parametrize("mode", ["joint", "minimax", "off"])
def test_each_part_gets_the_gradients_of_its_losses(mode, tmp_path):
    module = MEAL(_config(tmp_path, discriminator=mode, discriminator_weight=0.5), [_linear_teacher(0)], num_classes=10)
    torch.manual_seed(0)
    student = torch.randn(6, 10, requires_grad=True)
    teacher_logits = torch.randn(6, 10)
    target = F.softmax(teacher_logits, 1)
    losses = module.losses(student, target, teacher_logits)
    parts = [student, *(module.discriminator.parameters() if module.discriminator else [])]
    grads = torch.autograd.grad(losses["loss"], parts)
    kd = torch.autograd.grad(soft_cross_entropy(student, target), student)[0]
    if mode == "off":
        assert set(losses) == {"loss", "kd_loss"}
        assert torch.allclose(grads[0], kd)
        return
    disc = module.discriminator
    bce = discriminator_loss(disc(student), disc(teacher_logits))
    bce_student, *bce_disc = torch.autograd.grad(bce, [student, *disc.parameters()])
    sign = 1.0 if mode == "joint" else -1.0  # joint: the code's shared BCE; minimax: reversed into the student
    assert torch.allclose(grads[0], kd + sign * 0.5 * bce_student, atol=1e-6)
    for got, expected in zip(grads[1:], bce_disc, strict=True):  # the discriminator learns from its BCE alone
        assert torch.allclose(got, 0.5 * expected, atol=1e-6)
    target, mean_logits = module.teacher_outputs(torch.randn(6, 3, 16, 16))  # what the module's own teachers give
    module.losses(module(torch.randn(6, 3, 16, 16)), target, mean_logits)["loss"].backward()
    assert not target.requires_grad and not mean_logits.requires_grad  # no graph into the teachers: they never learn
    assert all(p.grad is None for p in module.teachers.parameters()) and any(p.grad is not None for p in module.head.parameters())


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_student_moves_toward_the_ensemble_without_reading_labels(tmp_path):
    pl.seed_everything(0, verbose=False)
    teachers = [_linear_teacher(1), _linear_teacher(2)]
    frozen = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    config = _config(tmp_path, epochs=10, batch_size=16, lr=0.05, lr_schedule="cosine")
    module = MEAL(config, teachers, num_classes=10)
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (32,))
    with torch.no_grad():
        target = ensemble_target(torch.stack([t(images) for t in teachers]))

    def kl() -> float:
        """KL(p_T || p_S) on the whole set, BatchNorm on batch statistics as in training."""
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(module(images), 1), target, reduction="batchmean"))

    module.train()
    loss_right = module.training_step((images[:16], labels[:16]), 0)
    loss_wrong = module.training_step((images[:16], (labels[:16] + 3) % 10), 0)  # wrong labels: the same loss
    assert torch.equal(loss_right, loss_wrong)
    before = kl()
    build_trainer(config, tmp_path).fit(module, DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True))
    after = kl()
    assert after < 0.5 * before, (before, after)
    for teacher, weights in zip(teachers, frozen, strict=True):
        assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items())  # the teachers never move
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# ---- the teacher-target cache -----------------------------------------------------------------------------------

class _Counting(nn.Module):
    """A teacher that counts the images it sees."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher, self.seen = teacher, 0

    def forward(self, images):
        self.seen += len(images)
        return self.teacher(images)


class _Images(Dataset):
    classes = [str(c) for c in range(10)]

    def __init__(self) -> None:
        self.images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index % 10


def _augment(image):
    """Random flip and noise, drawn from torch's generator as torchvision's transforms are."""
    image = image.flip(-1) if torch.rand(()) < 0.5 else image
    return image + 0.1 * torch.randn(image.shape)


def _cache(folder: Path, top_k: int, **key) -> TeacherCache:
    return TeacherCache(folder / FOLDER, {"run": "test", **key}, images=32, views=2, width=10, top_k=top_k)


def test_cache_holds_each_crop_and_later_epochs_skip_the_teachers(tmp_path):
    pl.seed_everything(0, verbose=False)
    data = FixedCrops(_Images(), _augment, crops=2, seed=0)
    first = data[5, 0]
    assert torch.equal(first[0], data[5, 2][0]) and first[3] == 0  # a crop is the same every time it comes back
    assert data[5, 1][3] == 1 and not torch.equal(data[5, 1][0], first[0])  # the next epoch shows the next crop
    teacher = _Counting(_linear_teacher(4))
    config = _config(tmp_path, epochs=3, batch_size=8, teacher_cache=True, cache_views=2, cache_top_k=10, num_workers=0)
    module = MEAL(config, [teacher], num_classes=10, cache=_cache(tmp_path, top_k=10))
    seen, judged = [], []
    callback = pl.callbacks.LambdaCallback(on_train_epoch_end=lambda *_: seen.append(teacher.seen))
    module.discriminator.register_forward_hook(lambda _, inputs, __: judged.append(inputs[0].detach()))
    trainer = build_trainer(config, tmp_path, callbacks=[callback])
    trainer.fit(module, make_loader(data, config, shuffle=True))
    assert seen == [32, 64, 64]  # epochs 0 and 1 fill crops 0 and 1; epoch 2 reads crop 0 from the cache
    assert bool(module.cache.filled.all())
    # the discriminator sees log-probabilities of student (even calls) and teachers (odd calls) alike, not logits vs log p_T
    assert len(judged) == 2 * 12 and all(torch.allclose(x.exp().sum(1), torch.ones(len(x)), atol=2e-3) for x in judged)
    # the cache is no module buffer (DDP would broadcast it every step) and no part of last.ckpt: it is a file set beside it
    assert not any("cache" in name for name in [*module.state_dict(), *dict(module.named_buffers())])
    assert not any("cache" in name for name in load_file(tmp_path / "last.ckpt")["state_dict"])
    assert np.load(tmp_path / FOLDER / "filled.npy").all()
    index, crop = torch.arange(32), torch.ones(32, dtype=torch.long)
    with torch.no_grad():
        direct = F.softmax(teacher.teacher(torch.stack([_crop(i, 1) for i in range(32)])), 1)
    assert torch.allclose(module.cache.read(index, crop), direct, atol=2e-3)  # fp16 storage


def _crop(index: int, crop: int):
    return FixedCrops(_Images(), _augment, crops=2, seed=0)[index, crop][0]


def _cached_run(out: Path, teacher: nn.Module, **values) -> MEAL:
    """MEAL with a 2-crop cache through the engine (3 epochs of 4 steps), resumed from ``out``'s last.ckpt when there is one."""
    data = FixedCrops(_Images(), _augment, crops=2, seed=0)
    config = _config(out, epochs=3, batch_size=8, teacher_cache=True, cache_views=2, cache_top_k=3, num_workers=0, **values)
    pl.seed_everything(0, verbose=False)  # the same initial weights, as seed-distill draws them
    module = MEAL(config, [teacher], num_classes=10, cache=_cache(out, top_k=3))
    fit(module, make_loader(data, config, shuffle=True, drop_last=True), None, config, out)
    return module


@pytest.mark.filterwarnings(r"ignore:You defined a `validation_step`")
@pytest.mark.parametrize("keep_cache", [True, False])
def test_a_run_resumed_with_or_without_its_cache_ends_as_the_uninterrupted_one(keep_cache, tmp_path):
    """Stopped mid epoch 1 (crop 1 half cached) or mid epoch 2 (all cached) and resumed with the cache it had (the rows written
    before the stop are read back: only the missing ones run the teachers) or with its cache deleted (the teachers recompute
    the rows, which are read back from the cache like every row): the same weights as a run that never stopped, top-3 of 10
    classes cached. Seen to fail when a miss is used as computed instead of read back from the cache (fp16, top-k)."""
    full = _cached_run(tmp_path / "full", _Counting(_linear_teacher(4)))
    for stop, teacher_images_after in ((6, 2 * 8), (9, 0)) if keep_cache else ((6, 2 * 8 + 32), (9, 3 * 8)):
        out = tmp_path / f"stop{stop}"
        _cached_run(out, _Counting(_linear_teacher(4)), max_steps=stop)
        if not keep_cache:
            shutil.rmtree(out / FOLDER)
        teacher = _Counting(_linear_teacher(4))
        resumed = _cached_run(out, teacher)
        assert teacher.seen == teacher_images_after, stop
        for key, value in full.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), (stop, key)
    other = _cache(tmp_path / "stop9", top_k=3, seed=1)  # another key: the cache starts empty
    assert other.prepare() == 0


def test_cache_keeps_top_k_and_spreads_the_rest(tmp_path):
    cache = TeacherCache(tmp_path, {}, images=2, views=1, width=4, top_k=2)
    cache.prepare()
    cache.open()
    target = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.0, 0.0, 0.0, 1.0]])
    cache.write(torch.tensor([0, 1]), torch.tensor([0, 0]), target)
    read = cache.read(torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert torch.allclose(read, torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.0, 0.0, 0.0, 1.0]]), atol=1e-3)
    assert torch.allclose(read.sum(1), torch.ones(2), atol=1e-3)


def test_cutmix_pastes_one_box_of_another_image(monkeypatch):
    """Kept area 0.75 of 8x8 images: a 4x4 box (side 8 x sqrt(0.25)), the same for every image, from another image of the batch."""
    monkeypatch.setattr(torch.distributions.Beta, "sample", lambda self, *_: torch.tensor(0.75))
    torch.manual_seed(0)
    images = torch.arange(8).float().view(8, 1, 1, 1).expand(8, 3, 8, 8).contiguous()  # image i is all i
    mixed = cutmix(images, alpha=1.0)
    changed = (mixed != images).any(1)  # (8, 8, 8)
    masks = [mask for mask in changed if mask.any()]
    assert len(masks) >= 6  # the batch was mixed (a permutation of 8 keeps few images in place)
    rows, cols = masks[0].nonzero().T
    assert (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1, int(masks[0].sum())) == (4, 4, 16)  # one 4x4 box
    assert all(torch.equal(mask, masks[0]) for mask in masks)  # the same box in every image
    for index, (result, mask) in enumerate(zip(mixed, changed, strict=True)):
        if mask.any():
            pasted = result[:, mask].unique()
            assert len(pasted) == 1 and int(pasted) != index  # one other image's pixels
        assert torch.equal(result[:, ~mask], images[index][:, ~mask])  # the rest is the image's own


# ---- end to end --------------------------------------------------------------------------------------------------

def test_meal_cli_with_two_teachers_exports_the_student_and_a_table(tmp_path):
    teachers = [str(_classifier_file(tmp_path / f"t{i}.pt", arch=arch, seed=i)) for i, arch in enumerate(("r18", "r34"))]
    init = _classifier_file(tmp_path / "init.pt", seed=5)
    out = tmp_path / "run"
    result = run_command("seed-distill", "--mode", "meal", *FAST, "--teacher-checkpoints", ",".join(teachers), "--student-init", str(init),
                         "--max-steps", "2", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher 2: r34" in result.stdout and "seed export (supervised)" in result.stdout
    for row in ("student r18 init", "student r18 MEAL V2", "teacher 1 r18", "teacher 2 r34", "ensemble (mean softmax)"):
        assert row in result.stdout, row
    scores = json.loads((out / "top1.json").read_text())["scores"]
    assert len(scores) == 5 and json.loads((out / "top1.json").read_text())["val_images"] == 360
    student = load_file(out / "student.pt")
    assert student["method"] == "meal" and student["num_classes"] == 10 and student["head_state_dict"]["weight"].shape == (10, 512)
    ckpt = load_file(out / "last.ckpt")
    assert ckpt["global_step"] == 2 and not any(k.startswith("teachers.") for k in ckpt["state_dict"])
    assert load_classifier(out / "student.pt")[1].out_features == 10  # a MEAL student can teach the next one
    log = (out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert all(column in log for column in ("loss", "kd_loss", "disc_loss"))


@pytest.mark.parametrize("name, kind", [("meal.yaml", "distill"), ("meal_teacher_a.yaml", "pretrain"), ("meal_teacher_b.yaml", "pretrain"),
                                        ("meal_student_init.yaml", "pretrain")])
def test_the_demos_meal_configs_are_valid(name, kind):

    config = method_config(kind, {"config": str(CONFIGS / "demo" / name)})
    assert config.mode == "meal" if kind == "distill" else config.method == "supervised"  # not the defaults, seed and mocov2
    assert sorted(p.name for p in (CONFIGS / "demo").glob("meal*.yaml")) == ["meal.yaml", "meal_student_init.yaml", "meal_teacher_a.yaml",
                                                                             "meal_teacher_b.yaml"]


PAPER = {"mode": "meal", "teachers": "timm:gluon_senet154,timm:gluon_resnet152_v1s", "image_size": 224, "small_images": False, "batch_size": 512,
         "epochs": 180, "optimizer": "sgd", "base_lr": 0.005, "momentum": 0.9, "weight_decay": 0.0, "warmup_epochs": 0.0, "lr_schedule": "step",
         "lr_milestones": "101", "kd_temperature": 1.0, "discriminator": "joint", "discriminator_weight": 1.0, "cutmix": False}


@pytest.mark.parametrize("student, init", [("r50", "timm:resnet50.ram_in1k"), ("r18", "torchvision")])
def test_the_paper_recipes_hold_the_papers_settings(student, init, tmp_path):
    """configs/distill/meal_v2_<student>.yaml as read: MEAL V2's teachers, schedule and loss; R-50 from timm's 79 % weights
    (the public code's start), R-18 from torchvision's 69.76 %; and the module built from it steps lr 0.01 at batch 512."""
    config = method_config("distill", {"config": str(CONFIGS / "distill" / f"meal_v2_{student}.yaml")})
    assert {key: getattr(config, key) for key in PAPER} == PAPER
    assert (config.student, config.student_init) == (student, init)
    resolved = resolve(dataclasses.replace(config, student="r18", output=str(tmp_path)), MEAL.DEFAULTS)
    optimizer = MEAL(resolved, [_linear_teacher(0)], num_classes=10).configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_the_papers_schedule_and_defaults(tmp_path):
    """The code's regime [0, 100, 0.01, 101, 300, 0.001]: epochs 0-100 (inclusive, counted from 0) at 0.01, then 0.001."""
    config = _config(tmp_path, batch_size=512)
    optimizers = MEAL(config, [_linear_teacher(0)], num_classes=10).configure_optimizers()
    optimizer, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["weight_decay"] == 0.0 and optimizers["lr_scheduler"]["interval"] == "epoch"
    lr = {}
    for epoch in range(103):  # Lightning steps an "epoch" scheduler after each epoch
        lr[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
    assert [lr[e] for e in (0, 99, 100, 101, 102)] == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001])  # lr 0.01 at batch 512
    assert (config.kd_temperature, config.discriminator, config.discriminator_weight, config.cutmix) == (1.0, "joint", 1.0, False)


def test_without_teachers_or_demo_the_error_says_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SeedError, match="no --teacher-checkpoints given and no demo teachers in runs/demo/meal.*meal_teacher_a.yaml"):
        distill(method_config("distill", {"mode": "meal"}))
    with pytest.raises(SeedError, match="--teachers names 2 teachers but --teacher-checkpoints gives 1 file"):
        distill(method_config("distill", {"mode": "meal", "teachers": "r18,r34", "teacher_checkpoints": "a.pt"}))
    with pytest.raises(SeedError, match="r50x2 has no torchvision weights"):
        distill(method_config("distill", {"mode": "meal", "teachers": "r50x2"}))
    with pytest.raises(SeedError, match="unknown --discriminator 'gan'; choose one of: joint, minimax, off"):
        distill(method_config("distill", {"mode": "meal", "discriminator": "gan"}))
