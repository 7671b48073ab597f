import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from seed.backbones import create_backbone
from seed.checkpoints import export_model, load_backbone, load_file
from seed.cli import distill_main
from seed.config import DistillConfig, resolve
from seed.distill import SEED, default_augmentation
from seed.engine import build_trainer, fit
from seed.loaders import make_loader
from seed.losses import seed_loss
from seed.registry import method_config
from seed.sampling import FixedCrops
from seed.teacher import FrozenTeacher
from seed.teacher_cache import TeacherCache

from .conftest import TINY, image_folder_of, run_command


@pytest.fixture
def teacher_file(tmp_path):
    """A small 'pretrained' teacher in our export format (r34 features + a 128-d head)."""
    torch.manual_seed(0)
    backbone = create_backbone("r34", small_images=True)
    head = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    path = tmp_path / "teacher.pt"
    export_model(path, "r34", backbone, head, 128, "mocov2", {}, True)
    return path


def test_distillation_moves_the_student_toward_the_teacher(tmp_path):
    pl.seed_everything(0, verbose=False)
    config = resolve(method_config("distill", {"student": "r18", "image_size": 16, "batch_size": 32, "epochs": 8, "queue_size": 96,
                                                 "knn_every": 0, "output": str(tmp_path), "base_lr": 0.05, "tau_t": 0.05}), SEED.DEFAULTS)
    # a teacher whose embeddings of noise images are spread out: a fixed random projection of the pixels
    teacher_backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 64))
    teacher_backbone.feature_dim, teacher_backbone.arch = 64, "random-projection"
    teacher = FrozenTeacher(teacher_backbone, None, fold_bn=False)
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = SEED(config, teacher, num_classes=10)
    assert module.head[-1].out_features == 64  # the student's head follows the teacher's dimension
    images = torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        anchors = teacher(images[128:224])  # a fixed queue of other images' teacher embeddings

    def kl_to_teacher() -> float:
        """SEED's loss minus the target's entropy: KL(p_T || p_S) against a fixed queue."""
        module.eval()
        with torch.no_grad():
            target = teacher(images[:64])
            cross_entropy = seed_loss(module.embed(images[:64]), target, anchors, config.tau_s, config.tau_t)
        module.train()
        return float(cross_entropy - seed_loss(target, target, anchors, config.tau_t, config.tau_t))

    before = kl_to_teacher()
    build_trainer(config, tmp_path).fit(module, DataLoader(TensorDataset(images, torch.zeros(256)), batch_size=32, shuffle=True))
    assert kl_to_teacher() < 0.5 * before
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_weights[key]), key  # the teacher never moves
    assert int(module.queue.bank_ptr) == (8 * 8 * 32) % 96  # every teacher embedding was enqueued


@pytest.mark.parametrize("found, augmentation", [
    ("SwAV", "swav"), ("SimCLR (SEED release)", "mocov1"), ("SimCLR (converted)", "mocov1"), ("seed export (simclr)", "mocov1"),
    ("seed Lightning checkpoint (simclr)", "mocov1"), ("MoCo v2", "mocov2"), ("MoCo v1", "mocov2"), ("seed export (mocov2)", "mocov2"),
    ("plain state_dict (torchvision)", "mocov2"),
])
def test_views_follow_the_teacher_method_as_in_the_official_code(found, augmentation):
    """SEED main.py: swav_aug for SwAV teachers, simclr_aug (MoCo v1's set) for SimCLR ones, mocov2_aug for MoCo (with the MLP student)."""
    assert default_augmentation(found) == augmentation


@pytest.mark.parametrize("student, rate", [("mbv3l", 0.2), ("effb0", 0.2), ("r18", 0.0)])
def test_mobilenet_and_efficientnet_students_drop_out_their_features_before_the_head(student, rate):
    """The official MobileNetV3 / EfficientNet students keep Dropout(0.2) between the 1280-d features and their MLP fc."""
    config = resolve(method_config("distill", {"student": student, "image_size": 16, "queue_size": 64}), SEED.DEFAULTS)
    module = SEED(config, _conv_teacher(), num_classes=10)
    assert (module.dropout.p if rate else 0.0) == rate
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    module.head.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    module.train()
    module.backbone.eval()  # fixed features (EfficientNet's stochastic depth is random too): only the head side trains
    features = module.backbone(images)
    module.embed(images)
    if rate:
        dropped = (seen[-1] == 0) & (features != 0)
        assert 0.1 < float(dropped.float().mean()) < 0.3  # about 20% of the 4 x 1280 features
        assert torch.allclose(seen[-1][~dropped], features[~dropped] / (1 - rate))
    else:
        assert torch.equal(seen[-1], features)
    module.eval()
    module.embed(images)
    assert torch.equal(seen[-1], features)  # off in eval mode
    assert "dropout" not in "".join(module.state_dict())  # no weights: exported heads and backbones keep their keys


def _lr_at(config: DistillConfig, steps: list[int], batches_per_epoch: int) -> list[float]:
    """The lr SEED's scheduler sets at each of ``steps`` (optimiser steps), for a run of ``config.epochs`` epochs."""
    module = SEED(config, _conv_teacher(), num_classes=10)
    module.trainer = SimpleNamespace(estimated_stepping_batches=config.epochs * batches_per_epoch, num_training_batches=batches_per_epoch)
    setup = module.configure_optimizers()
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    found = []
    for step in range(max(steps) + 1):
        if step in steps:
            found.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing, keeps torch's step order
        schedule.step()
    return found


def test_warm_up_from_base_lr_when_the_batch_raises_the_lr():
    """SEED's official schedule: 5 epochs from 0.03 up to 0.03 x B/256, then cosine; at B <= 256 there is nothing to warm up."""
    big = resolve(method_config("distill", {"batch_size": 128, "devices": 4, "epochs": 100, "image_size": 16, "queue_size": 512}), SEED.DEFAULTS)
    assert big.warmup_epochs == 5.0
    # 10 batches an epoch: 50 warm-up steps from 0.03 to 0.06, then lightly's cosine over the other 950 steps
    expected = [0.03, 0.03 + 0.03 * 10 / 50, 0.045, 0.06, 0.06 * 0.5 * (1 + math.cos(math.pi * 475 / 949))]
    assert _lr_at(big, [0, 10, 25, 50, 525], 10) == pytest.approx(expected, rel=1e-9)
    plain = resolve(method_config("distill", {"batch_size": 256, "epochs": 100, "image_size": 16, "queue_size": 512}), SEED.DEFAULTS)
    assert _lr_at(plain, [0, 25, 500], 10) == pytest.approx([0.03, 0.03 * 0.5 * (1 + math.cos(math.pi * 25 / 999)),
                                                             0.03 * 0.5 * (1 + math.cos(math.pi * 500 / 999))], rel=1e-9)


def test_seed_distill_cli_exports_student_and_resumes_with_its_queue(tmp_path, tiny_args, teacher_file):
    out = tmp_path / "run"
    args = [*tiny_args, "--teacher-checkpoint", str(teacher_file), "--queue-size", "56", "--output", str(out)]
    first = run_command("seed-distill", *args, "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "seed export (mocov2), 128-d" in first.stdout
    assert "views: --augmentation mocov2" in first.stdout and "augmentation: mocov2" in (out / "config.yaml").read_text()
    assert "student r18 distilled" in first.stdout and "teacher r34" in first.stdout
    ckpt = load_file(out / "last.ckpt")
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])  # the teacher stays in its own file
    assert int(ckpt["memory_banks"]["queue"]["ptr"]) == 48
    student = load_file(out / "student.pt")
    assert student["arch"] == "r18" and student["method"] == "seed" and student["embed_dim"] == 128
    assert load_backbone(out / "student.pt").feature_dim == 512

    second = run_command("seed-distill", *args, "--max-steps", "5")
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = load_file(out / "last.ckpt")
    assert resumed["global_step"] == 5
    assert int(resumed["memory_banks"]["queue"]["ptr"]) == (5 * 16) % 56
    # steps 4-5 wrote rows 48..55 and 0..23; rows 24..47 are still those of steps 2-3
    assert not torch.equal(resumed["memory_banks"]["queue"]["bank"][:24], ckpt["memory_banks"]["queue"]["bank"][:24])
    assert torch.equal(resumed["memory_banks"]["queue"]["bank"][24:48], ckpt["memory_banks"]["queue"]["bank"][24:48])


def _conv_teacher() -> FrozenTeacher:
    """A fixed random conv + pooling: embeds images of any size (big views and small crops)."""
    torch.manual_seed(1)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    backbone.feature_dim, backbone.arch = 16, "conv"
    return FrozenTeacher(backbone, None, fold_bn=False)


def test_small_crop_queue_takes_one_patch_per_image(tmp_path):
    """The official small_patch_builder enqueues each image's first small patch only: B rows per step, not N x B."""
    config = resolve(method_config("distill", {"student": "r18", "image_size": 16, "batch_size": 8, "queue_size": 40, "small_crops": 3,
                                                 "knn_every": 0, "max_steps": 1, "output": str(tmp_path)}), SEED.DEFAULTS)
    teacher = _conv_teacher()
    module = SEED(config, teacher, num_classes=10)
    generator = torch.Generator().manual_seed(0)
    items = [([torch.randn(3, 16, 16, generator=generator), *torch.randn(3, 3, 8, 8, generator=generator)], 0) for _ in range(8)]
    small_before = module.small_queue.bank.clone()
    build_trainer(config, tmp_path).fit(module, DataLoader(items, batch_size=8))
    first_patches = torch.stack([views[1] for views, _ in items])
    assert int(module.queue.bank_ptr) == 8 and int(module.small_queue.bank_ptr) == 8  # not 3 x 8 = 24
    assert torch.allclose(module.small_queue.bank[:8], teacher(first_patches), atol=1e-6)
    assert torch.equal(module.small_queue.bank[8:], small_before[8:])  # the other patches are not queued
    assert torch.allclose(module.queue.bank[:8], teacher(torch.stack([views[0] for views, _ in items])), atol=1e-6)


def test_small_crops_use_a_second_queue(tmp_path, tiny_args, teacher_file):
    result = run_command("seed-distill", *tiny_args, "--teacher-checkpoint", str(teacher_file), "--small-crops", "2",
                         "--max-steps", "2", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    banks = load_file(tmp_path / "last.ckpt")["memory_banks"]
    assert int(banks["queue"]["ptr"]) == 32 and int(banks["small_queue"]["ptr"]) == 32  # one small patch per image and step


def test_two_process_ddp_gathers_into_one_queue(tmp_path, tiny_args, teacher_file, ddp_env):
    result = run_command("seed-distill", *tiny_args, "--teacher-checkpoint", str(teacher_file), "--queue-size", "200",
                         "--devices", "2", "--accelerator", "cpu", "--max-steps", "2", "--output", str(tmp_path), env=ddp_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(load_file(tmp_path / "last.ckpt")["memory_banks"]["queue"]["ptr"]) == 2 * 2 * 16  # both ranks' embeddings


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tau-t", "0"], "--tau-t must be positive"),
        (["--queue-size", "8"], "--queue-size 8 is smaller than the global batch 16"),
        (["--student", "r19"], "unknown architecture 'r19'"),
        (["--teacher-checkpoint", "/no/such.pth"], "checkpoint /no/such.pth does not exist"),
        (["--teacher", "r50"], "lacks 'layer1.0.conv3.weight' of a r50 backbone"),
        (["--mode", "kd"], "unknown --mode 'kd'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, tiny_args, teacher_file):
    result = run_command("seed-distill", *tiny_args, "--teacher-checkpoint", str(teacher_file), *args, "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


# ---- --teacher-cache ---------------------------------------------------------------------------------------------

class _Pictures(Dataset):
    """24 fixed random 16x16 images."""

    classes = ["only"]

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(index)), 0


def _jitter(image):
    """Random flip and noise, drawn from torch's generator as torchvision's transforms are."""
    image = image.flip(-1) if torch.rand(()) < 0.5 else image
    return image + 0.1 * torch.randn(image.shape)


def _cached_seed(out: Path, always_miss: bool = False) -> tuple[SEED, list[int]]:
    """SEED with a 2-view teacher cache through the engine, 3 epochs of 3 steps; the batch sizes the teacher saw.
    ``always_miss``: the cache reports no hit, so the teacher embeds every batch (the same fixed views, live)."""
    config = resolve(method_config("distill", {"student": "r18", "image_size": 16, "batch_size": 8, "epochs": 3, "queue_size": 32, "knn_every": 0,
                                                 "num_workers": 0, "output": str(out), "teacher_cache": True, "cache_views": 2}), SEED.DEFAULTS)
    data = FixedCrops(_Pictures(), _jitter, crops=2, seed=0)
    teacher, seen = _conv_teacher(), []
    teacher.register_forward_hook(lambda _, inputs, __: seen.append(len(inputs[0])))
    pl.seed_everything(0, verbose=False)
    module = SEED(config, teacher, num_classes=1, cache=TeacherCache(out / "teacher_cache", {"run": "test"}, len(data), 2, teacher.embed_dim))
    if always_miss:
        module.cache.hits = lambda index, view: torch.zeros(len(index), dtype=torch.bool)
    fit(module, make_loader(data, config, shuffle=True, drop_last=True), None, config, out)
    return module, seen


def _step_losses(run: Path) -> list[str]:
    with open(run / "logs" / "metrics.csv") as handle:
        return [row["loss"] for row in csv.DictReader(handle) if row.get("loss")]


@pytest.mark.filterwarnings(r"ignore:You defined a `validation_step`")
def test_teacher_cache_equals_the_teacher_on_the_same_fixed_views_and_skips_it_after_n_epochs(tmp_path):
    cached, seen = _cached_seed(tmp_path / "cached")
    assert seen == [8] * 6  # epochs 0 and 1 embed views 0 and 1; epoch 2 reads view 0 back and runs no teacher
    live, seen_live = _cached_seed(tmp_path / "live", always_miss=True)
    assert seen_live == [8] * 9
    assert _step_losses(tmp_path / "cached") == _step_losses(tmp_path / "live") and len(_step_losses(tmp_path / "live")) == 9
    for key, value in live.state_dict().items():  # student, head and queue, bit for bit
        assert torch.equal(cached.state_dict()[key], value), key
    data, index = FixedCrops(_Pictures(), _jitter, crops=2, seed=0), torch.arange(24)
    for view in (0, 1):
        direct = cached.teacher(torch.stack([data[i, view][0] for i in range(24)]))
        stored = cached.cache.read(index, torch.full((24,), view))
        assert torch.allclose(stored, direct, atol=1e-3) and not torch.equal(stored, direct)  # the fp16 form
    # beside the run, not in it: no module buffer (DDP would broadcast it) and nothing in last.ckpt
    assert not any("cache" in name for name in [*cached.state_dict(), *load_file(tmp_path / "cached" / "last.ckpt")["state_dict"]])
    assert json.loads((tmp_path / "cached" / "teacher_cache" / "key.json").read_text()) == {"run": "test", "images": 24, "views": 2, "width": 16, "top_k": None}


def test_teacher_cache_is_kept_for_its_key_and_emptied_for_another(tmp_path):
    cache = TeacherCache(tmp_path, {"teacher_sha256": "a"}, images=4, views=2, width=3)
    assert cache.prepare() == 0
    cache.open()
    cache.write(torch.tensor([1, 3]), torch.tensor([0, 1]), torch.ones(2, 3))
    assert TeacherCache(tmp_path, {"teacher_sha256": "a"}, images=4, views=2, width=3).prepare() == 2  # the same key: kept
    other = TeacherCache(tmp_path, {"teacher_sha256": "b"}, images=4, views=2, width=3)
    assert other.prepare() == 0
    other.open()
    assert not other.hits(torch.arange(4), torch.zeros(4, dtype=torch.long)).any() and not other.filled.any()


def test_two_process_ddp_ranks_read_each_others_cached_views(tmp_path, tiny_args, teacher_file, ddp_env):
    """64 images, 2 ranks of 16: each rank embeds its half of epoch 0; in epoch 1 it draws images of the other's half too,
    and finds them all cached."""
    data = image_folder_of(tmp_path / "data", train=32, val=8)
    result = run_command("seed-distill", *tiny_args, "--data", str(data), "--teacher-checkpoint", str(teacher_file), "--devices", "2",
                         "--accelerator", "cpu", "--epochs", "2", "--teacher-cache", "--cache-views", "1", "--knn-bank-size", "40",
                         "--knn-query-size", "16", "--output", str(tmp_path / "run"), env=ddp_env)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "logs" / "metrics.csv") as handle:
        hits = [row["cache_hits"] for row in csv.DictReader(handle) if row.get("cache_hits")]
    assert hits == ["0.0", "0.0", "1.0", "1.0"]  # rank 0's log
    assert np.load(tmp_path / "run" / "teacher_cache" / "filled.npy").all()


@pytest.mark.parametrize("args, message", [
    (["--teacher-cache", "--small-crops", "2"], "--teacher-cache keeps fixed views, --small-crops draws new patches every step"),
    (["--teacher-cache", "--cache-views", "0"], "--cache-views must be at least 1"),
    (["--mode", "meal", "--cache-teacher-logits"], "--cache-teacher-logits is now --teacher-cache"),
    (["--mode", "meal", "--teacher-cache", "--cutmix"], "--cutmix mixes new images every step, which no cache holds"),
    (["--mode", "meal", "--no-teacher-head"], "--no-teacher-head is not a flag of seed-distill --mode meal (MEAL V2); it belongs to --mode seed"),
    (["--mode", "meal", "--queue-size", "1024"], "--queue-size is not a flag of seed-distill --mode meal (MEAL V2); it belongs to --mode seed and to "
                                                 "seed-pretrain --method mocov2"),
    (["--temperature", "0.5"], "--temperature is not a flag of seed-distill --mode seed (SEED); it belongs to seed-pretrain --method mocov2, simclr"),
])
def test_cache_options_that_cannot_work_stop_in_one_line_before_anything_runs(args, message, tmp_path, capsys):
    """In-process (the console script's one-line exit 2 is shown by test_bad_input_is_one_line_exit_2); a flag of another
    method names the method it belongs to."""
    with pytest.raises(SystemExit) as stop:
        distill_main([*TINY, *args, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
