"""What SEED's step must mean, pinned through the real training path: the loss reads the queue as it was before
the step's own enqueue, the teacher (BatchNorm included) never moves, and both queues resume bit for bit."""

import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from seed.backbones import create_backbone
from seed.callbacks import LastCheckpoint
from seed.checkpoints import export_model, load_file
from seed.cli import distill_main
from seed.config import resolve
from seed.data import dataset_for
from seed.distill import SEED, SEEDConfig, build_teacher, train_transform
from seed.engine import build_trainer, fit
from seed.loaders import make_loader
from seed.losses import seed_loss
from seed.registry import method_config

from .test_distill import _conv_teacher


def _seed_config(out: Path, **fields) -> SEEDConfig:
    """The tiny SEED set-up of these tests (TINY's sizes, CPU, no kNN monitor), with ``fields`` on top."""
    tiny = {"student": "r18", "image_size": 16, "batch_size": 16, "queue_size": 64, "knn_every": 0, "num_workers": 0, "accelerator": "cpu",
            "output": str(out)}
    return resolve(method_config("distill", {**tiny, **fields}), SEED.DEFAULTS)


class _LossWitness(pl.Callback):
    """At every step: copies of the queues before the step, the student and teacher embeddings its loss was made of,
    and the loss recomputed from them against the queues before and after the step's enqueue."""

    def __init__(self, module: SEED) -> None:
        self.students: list[torch.Tensor] = []
        self.teachers: list[torch.Tensor] = []
        self.checked: list[tuple[float, float, float]] = []
        module.head.register_forward_hook(lambda _, __, out: self.students.append(F.normalize(out.detach(), dim=1)))
        module.teacher.register_forward_hook(lambda _, __, out: self.teachers.append(out))

    def queues(self, module: SEED) -> list:
        return [q for q in (module.queue, module.small_queue) if q is not None]

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.students.clear()
        self.teachers.clear()
        self.before = [q.bank.clone() for q in self.queues(module)]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        after = [q.bank.clone() for q in self.queues(module)]
        assert len(self.students) == len(self.teachers) == len(after)  # one seed_step per queue
        assert all(not torch.equal(a, b) for a, b in zip(after, self.before, strict=True))  # this step did enqueue
        tau_s, tau_t = module.config.tau_s, module.config.tau_t
        parts = list(zip(self.students, self.teachers, strict=True))
        expected = sum(seed_loss(s, t, bank, tau_s, tau_t) for (s, t), bank in zip(parts, self.before, strict=True))
        enqueued_first = sum(seed_loss(s, t, bank, tau_s, tau_t) for (s, t), bank in zip(parts, after, strict=True))
        self.checked.append((float(outputs["loss"]), float(expected), float(enqueued_first)))


@pytest.mark.filterwarnings(r"ignore:You defined a `validation_step`")
@pytest.mark.parametrize("small_crops", [0, 2])
def test_the_loss_reads_the_queue_before_this_steps_enqueue(small_crops, tmp_path):
    """Each step's loss is seed_loss(student, teacher, queue before the step): a batch is never its own negative (after
    its enqueue, its own teacher rows sit in the queue and take half of the near one-hot target). With small crops the
    second term reads the small queue before its enqueue too. Seen to fail when the enqueue is moved before the loss
    in SEED.seed_step."""
    config = _seed_config(tmp_path, max_steps=4, small_crops=small_crops)
    module = SEED(config, _conv_teacher(), num_classes=1)
    witness = _LossWitness(module)
    generator = torch.Generator().manual_seed(0)

    def item():
        big = torch.randn(3, 16, 16, generator=generator)
        return ([big, *torch.randn(small_crops, 3, 8, 8, generator=generator)] if small_crops else big), 0

    trainer = build_trainer(config, tmp_path, callbacks=[witness])
    trainer.fit(module, torch.utils.data.DataLoader([item() for _ in range(64)], batch_size=16))
    assert len(witness.checked) == 4
    for step, (logged, before, enqueued_first) in enumerate(witness.checked):
        assert logged == pytest.approx(before, rel=1e-6, abs=1e-6), step
        assert abs(logged - enqueued_first) > 0.01, step  # the other order gives another loss (by 0.1-1.3 here)


def _bn_teacher_file(path: Path) -> Path:
    """A small 'pretrained' r18 teacher (BatchNorm after every conv) with a 32-d head, in our export format; its
    BatchNorm statistics are made non-trivial so that any update of them shows."""
    torch.manual_seed(0)
    backbone = create_backbone("r18", small_images=True)
    for layer in backbone.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.num_batches_tracked.fill_(1000)
    head = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 32))
    export_model(path, "r18", backbone, head, 32, "mocov2", {}, True)
    return path


def _train_on_digits(config: SEEDConfig, teacher) -> list[list[bool]]:
    """SEED through seed.engine.fit on ``config``'s data and views, after module.train(); at each teacher forward, the
    training flag of every teacher module."""
    modes: list[list[bool]] = []
    teacher.register_forward_pre_hook(lambda layer, _: modes.append([m.training for m in layer.modules()]))
    pl.seed_everything(0, verbose=False)
    module = SEED(config, teacher, num_classes=10)
    module.train()
    loader = make_loader(dataset_for(config, "train", train_transform(config)), config, shuffle=True, drop_last=True)
    assert fit(module, loader, None, config, Path(config.output)).global_step == config.max_steps
    return modes


@pytest.mark.filterwarnings(r"ignore:.*module\(s\) in eval mode", r"ignore:You defined a `validation_step`")
def test_a_batchnorm_teacher_stays_frozen_and_in_eval_mode_through_training(tmp_path):
    """SEED on digits (16 px, batch 16, 4 steps through seed.engine.fit) with an r18 teacher built as seed-distill builds
    it: with --teacher-fold-bn off its 20 BatchNorm layers are in eval mode from the start and at every training_step,
    even after module.train() (which Lightning before 2.2 called at fit start), and its running_mean / running_var /
    num_batches_tracked and weights end bit-identical; folded, it has no BatchNorm left and embeds the same images bit
    for bit after training. Seen to fail when FrozenTeacher.train passes ``mode`` on instead of False (BatchNorm then
    moves its statistics), and when FrozenTeacher.__init__ drops its ``.eval()`` calls."""
    path = _bn_teacher_file(tmp_path / "teacher.pt")
    probe = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for fold in (False, True):
        config = _seed_config(tmp_path / f"fold{fold}", data="digits", max_steps=4, teacher_fold_bn=fold, augmentation="mocov2")
        teacher, _ = build_teacher(config, str(path))
        norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == (0 if fold else 20), fold  # r18: stem + 2 per block x 8 + 3 downsample
        assert not any(m.training for m in teacher.modules()), fold  # eval from the start, before anything calls train()
        before = {key: value.clone() for key, value in teacher.state_dict().items()}
        embedded = teacher(probe)
        modes = _train_on_digits(config, teacher)
        assert len(modes) == 4 and not any(any(step) for step in modes), fold  # every teacher module in eval mode at every step
        after = teacher.state_dict()
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), (fold, key)
        if not fold:
            assert int(norms[0].num_batches_tracked) == 1000
            assert not torch.equal(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))  # the file's statistics, not defaults
        assert torch.equal(teacher(probe), embedded), fold


def test_both_queues_resume_bit_for_bit_with_small_crops(tmp_path, tiny_args, monkeypatch, capsys):
    """seed-distill --small-crops 2 for 6 steps (last.ckpt every 3), and a run stopped after its step-3 checkpoint then
    started again with the same command: the big and the small queue (bank and pointer), the student weights, the
    optimiser state and the exported student are bit-identical to the uninterrupted run's. 6 x 16 rows over K = 64:
    rows 32-47 are those of step 3, which only a restored bank holds. Seen to fail when TrainModule.on_load_checkpoint
    skips the small queue's bank."""
    teacher = _bn_teacher_file(tmp_path / "teacher.pt")
    args = [*tiny_args, "--teacher-checkpoint", str(teacher), "--small-crops", "2", "--max-steps", "6", "--checkpoint-every", "3",
            "--knn-every", "0", "--accelerator", "cpu", "--seed", "3"]
    save, copies = LastCheckpoint.save, {}

    def keep_a_copy(self, trainer, epoch, batches):
        save(self, trainer, epoch, batches)
        copies[trainer.global_step] = shutil.copy(self.path, self.path.with_name(f"step{trainer.global_step}.ckpt"))

    monkeypatch.setattr(LastCheckpoint, "save", keep_a_copy)
    distill_main([*args, "--output", str(tmp_path / "whole")])
    monkeypatch.undo()
    assert sorted(copies) == [3, 6]
    halfway = load_file(copies[3])["memory_banks"]
    (tmp_path / "resumed").mkdir()
    shutil.copy(copies[3], tmp_path / "resumed" / "last.ckpt")  # a run stopped just after its step-3 checkpoint
    capsys.readouterr()
    distill_main([*args, "--output", str(tmp_path / "resumed")])  # the same command again: --resume auto continues it
    assert f"resuming from {tmp_path / 'resumed' / 'last.ckpt'}" in capsys.readouterr().out  # a fresh run would match too

    whole, resumed = load_file(tmp_path / "whole" / "last.ckpt"), load_file(tmp_path / "resumed" / "last.ckpt")
    assert resumed["global_step"] == whole["global_step"] == 6
    assert whole["memory_banks"].keys() == resumed["memory_banks"].keys() == {"queue", "small_queue"}
    for name in ("queue", "small_queue"):
        got, expected = resumed["memory_banks"][name], whole["memory_banks"][name]
        assert int(expected["ptr"]) == 6 * 16 % 64, name
        assert torch.equal(got["ptr"], expected["ptr"]) and torch.equal(got["bank"], expected["bank"]), name
        assert torch.equal(expected["bank"][32:48], halfway[name]["bank"][32:48]), name  # untouched by steps 4-6
        assert not torch.equal(expected["bank"][:32], halfway[name]["bank"][:32]), name
    assert not torch.equal(whole["memory_banks"]["queue"]["bank"], whole["memory_banks"]["small_queue"]["bank"])
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert str(resumed["optimizer_states"]) == str(whole["optimizer_states"])
    exported = load_file(tmp_path / "resumed" / "student.pt")["state_dict"]
    for key, value in load_file(tmp_path / "whole" / "student.pt")["state_dict"].items():
        assert torch.equal(exported[key], value), key
