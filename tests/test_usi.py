"""USI (``seed-distill --mode usi``): the recipe's settings, what the teacher sees, the parameter groups, the export."""

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from seed.checkpoints import load_classifier, load_file
from seed.cli import distill_main
from seed.config import read_yaml
from seed.engine import build_trainer
from seed.loaders import make_loader
from seed.registry import method_config
from seed.sampling import FixedCrops
from seed.teacher_cache import FOLDER, TeacherCache
from seed.usi import USI, warmup_cosine_lr

from .conftest import TINY, run_command
from .test_meal import _classifier_file, _Images, _linear_teacher

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAST = [*TINY, "--no-small-images", "--knn-query-size", "64"]


def _config(tmp_path: Path, **values):
    base = {"mode": "usi", "student": "r18", "image_size": 16, "small_images": False, "batch_size": 16, "num_workers": 0, "knn_every": 0,
            "data": "digits", "teacher_checkpoint": "x.pt", "output": str(tmp_path)}
    return USI.configure(method_config("distill", {**base, **values}))


def test_the_recipe_is_the_codes():
    """AdamW lr 2e-3 whatever the batch, wd 2e-2, 5 warm-up epochs from 1e-4, min lr 1e-6, KD weight 5, Mixup 0.8 / CutMix 1.0 /
    switch 0.5, RandAugment rand-m7-mstd0.5-inc1, EMA 0.99996, repeated augmentation x3 (train.py of Alibaba-MIIL/Solving_ImageNet)."""
    for batch in (16, 1024):
        config = _config(Path("."), batch_size=batch)
        assert (config.lr, config.weight_decay, config.warmup_epochs, config.warmup_lr, config.min_lr) == (2e-3, 2e-2, 5.0, 1e-4, 1e-6)
    assert (config.kd_weight, config.kd_only, config.mixup_alpha, config.cutmix_alpha, config.mix_switch_prob) == (5.0, False, 0.8, 1.0, 0.5)
    assert (config.rand_augment, config.ema_decay, USI.repeats(config)) == ("rand-m7-mstd0.5-inc1", 0.99996, 3)  # repeated aug. under DDP


def test_the_schedule_warms_up_from_warmup_lr_then_falls_along_a_cosine_to_min_lr():
    lr, warm, total = 2e-3, 10, 110
    factors = [warmup_cosine_lr(step, warm, total, lr, 1e-4, 1e-6) * lr for step in (0, 5, 10, 60, 110)]
    expected = [1e-4, 1e-4 + (lr - 1e-4) / 2, lr, 1e-6 + (lr - 1e-6) / 2, 1e-6]
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(factors, expected, strict=True)), factors


class _Recording(nn.Module):
    """A teacher that remembers its inputs."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = teacher, []
        self.arch, self.embed_dim = teacher.arch, teacher.embed_dim

    def forward(self, images):
        self.seen.append(images.detach().clone())
        return self.inner(images)


def test_the_teacher_sees_the_mixed_images_the_student_sees_and_no_bias_or_norm_weight_decays(tmp_path):
    """Seen to fail when the teacher is given the batch before Mixup/CutMix (the label-only mix of a weaker recipe)."""
    config = _config(tmp_path, max_steps=2, epochs=1)
    teacher = _Recording(_linear_teacher(0))
    module = USI(config, teacher, num_classes=10)
    student_inputs, raw = [], []
    module.backbone.register_forward_pre_hook(lambda _, args: student_inputs.append(args[0].detach().clone()))
    images = torch.randn(32, 3, 16, 16)
    labels = torch.arange(32) % 10
    original_step = module.training_step

    def step(batch, batch_idx):
        raw.append(batch[0].detach().clone())
        return original_step(batch, batch_idx)

    module.training_step = step
    trainer = build_trainer(config, tmp_path)
    trainer.fit(module, DataLoader(list(zip(images, labels, strict=True)), batch_size=16))
    assert len(teacher.seen) == 2 and all(torch.equal(t, s) for t, s in zip(teacher.seen, student_inputs, strict=True))
    assert not torch.equal(teacher.seen[0], raw[0])  # mixed, not the raw batch
    groups = trainer.optimizers[0].param_groups
    assert type(trainer.optimizers[0]).__name__ == "AdamW" and sorted(g["weight_decay"] for g in groups) == [0.0, 2e-2]
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, parameter in [*module.backbone.named_parameters(), *module.head.named_parameters()]:
        assert (id(parameter) in undecayed) == (parameter.ndim <= 1 or name.endswith(".bias")), name
    assert not any(id(p) in undecayed or p.requires_grad for p in module.ema.parameters())  # the EMA is not trained


def test_cli_exports_a_classifier_that_evaluates_and_starts_the_next_student(tmp_path):
    teacher = _classifier_file(tmp_path / "teacher.pt")
    out = tmp_path / "run"
    result = run_command("seed-distill", "--mode", "usi", *FAST, "--teacher-checkpoint", str(teacher), "--max-steps", "3",
                         "--ema-decay", "0.5", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept: the" in result.stdout and "teacher r18" in result.stdout
    student = load_file(out / "student.pt")
    assert student["method"] == "usi" and student["num_classes"] == 10 and student["kept"] in ("model", "ema")
    assert student["head_state_dict"]["weight"].shape == (10, 512)
    ckpt = load_file(out / "last.ckpt")
    assert ckpt["global_step"] == 3 and not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    source = "ema.module.0." if student["kept"] == "ema" else "backbone."
    assert torch.equal(student["state_dict"]["conv1.weight"], ckpt["state_dict"][source + "conv1.weight"])  # the kept weights, exported
    assert len(json.loads((out / "top1.json").read_text())["scores"]) == 2
    backbone, classifier, found, _ = load_classifier(out / "student.pt")
    assert classifier.out_features == 10
    again = run_command("seed-distill", "--mode", "meal", *FAST, "--teacher-checkpoints", str(teacher), "--student-init", str(out / "student.pt"),
                        "--max-steps", "1", "--output", str(tmp_path / "next"))
    assert again.returncode == 0 and f"student init: {out / 'student.pt'}" in again.stdout, again.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--queue-size", "64"], "--queue-size is not a flag of seed-distill --mode usi (USI); it belongs to --mode seed"),
    (["--batch-size", "15"], "--batch-size 15: Mixup and CutMix pair the images of a batch, so it must be even"),
    (["--optimizer", "sgd"], "USI trains with AdamW"),
    (["--kd-weight", "-1"], "--kd-weight must be at least 0, got -1.0"),
    (["--kd-only", "--kd-weight", "0"], "--kd-only with --kd-weight 0 leaves no loss"),
    (["--kd-weight", "0", "--teacher-cache", "--mixup-alpha", "0", "--cutmix-alpha", "0"],
     "--teacher-cache with --kd-weight 0 would fill a cache of teacher outputs that no loss reads"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    teacher = _classifier_file(tmp_path / "teacher.pt")
    with pytest.raises(SystemExit) as exit_info:
        distill_main(["--mode", "usi", *FAST, "--teacher-checkpoint", str(teacher), *args, "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "out").exists()


def test_without_a_teacher_the_error_says_how_to_give_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        distill_main(["--mode", "usi", *FAST, "--output", str(tmp_path / "out")])
    assert "USI needs a teacher classifier: pass --teacher-checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("name, student, top1", [("usi_r50.yaml", "r50", 81.0), ("usi_mbv3l.yaml", "mbv3l", 77.3)])
def test_the_paper_recipes_name_their_students_and_results(name, student, top1):
    path = CONFIGS / "distill" / name
    config = method_config("distill", {"config": str(path)})
    assert (config.mode, config.student, config.teacher) == ("usi", student, "timm:tresnet_l")
    assert (config.image_size, config.epochs, config.batch_size) == (224, 300, 128)
    assert f"{top1}" in path.read_text() and "mode" in read_yaml(str(path))


class _Counting(nn.Module):
    """A teacher that counts the images it sees."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = teacher, 0
        self.arch, self.embed_dim, self.channels_last = teacher.arch, teacher.embed_dim, False

    def forward(self, images):
        self.seen += len(images)
        return self.inner(images)


def test_the_teacher_cache_serves_usi_too_and_later_epochs_run_no_teacher(tmp_path):
    """The one cache of every distiller: the teacher's softmax under 2 fixed views, top-3 of 10 classes, read back for the KL."""
    config = _config(tmp_path, epochs=3, teacher_cache=True, cache_views=2, cache_top_k=3, mixup_alpha=0.0, cutmix_alpha=0.0, ema_decay=0.0)
    data = FixedCrops(_Images(), lambda image: image + 0.1 * torch.randn(image.shape), 2, 0)
    teacher = _Counting(_linear_teacher(0))
    cache = TeacherCache(tmp_path / FOLDER, {"run": "test"}, images=32, views=2, width=10, top_k=3)
    module = USI(config, teacher, num_classes=10, cache=cache)
    seen = []
    trainer = build_trainer(config, tmp_path, callbacks=[pl.callbacks.LambdaCallback(on_train_epoch_end=lambda *_: seen.append(teacher.seen))])
    trainer.fit(module, make_loader(data, config, shuffle=True, drop_last=True))
    assert seen == [32, 64, 64] and bool(module.cache.filled.all())  # epoch 2 shows view 0 again: all cached
    read = module.cache.read(torch.arange(32), torch.zeros(32, dtype=torch.long))
    assert torch.allclose(read.sum(1), torch.ones(32), atol=2e-3) and int((read > 1e-3).sum(1).max()) <= 10


def test_a_cache_with_mixing_is_refused_in_one_line(tmp_path, capsys):
    teacher = _classifier_file(tmp_path / "teacher.pt")
    with pytest.raises(SystemExit):
        distill_main(["--mode", "usi", *FAST, "--teacher-checkpoint", str(teacher), "--teacher-cache", "--output", str(tmp_path / "out")])
    assert "--teacher-cache keeps fixed views, Mixup and CutMix mix new images every step" in capsys.readouterr().err


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_without_kd_the_recipe_runs_no_teacher_and_its_loss_is_the_mixed_labels_cross_entropy(tmp_path):
    """``--kd-weight 0``, USI's own control: the same recipe, no teacher forward, the loss the cross-entropy to the (mixed)
    labels alone. Seen to fail when the teacher still ran (its recording filled) and when the KD term was left in (weight 5)."""
    teacher = _Recording(_linear_teacher(0))
    module = USI(_config(tmp_path, kd_weight=0.0, mixup_alpha=0.0, cutmix_alpha=0.0), teacher, num_classes=10).train()
    images, labels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    loss = module.training_step((images, labels), 0)
    assert teacher.seen == []
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(module(images), labels))
    with_kd = USI(_config(tmp_path, mixup_alpha=0.0, cutmix_alpha=0.0), teacher, num_classes=10).train()
    with_kd.load_state_dict(module.state_dict(), strict=False)
    assert float(with_kd.training_step((images, labels), 0).detach()) > float(loss.detach()) + 1e-3 and len(teacher.seen) == 1
