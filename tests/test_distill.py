import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from seed.backbones import create_backbone
from seed.checkpoints import export_model, load_backbone, load_file
from seed.config import DistillConfig, make_config, resolve
from seed.distill import SEED
from seed.engine import build_trainer
from seed.losses import seed_loss
from seed.teacher import FrozenTeacher

from .conftest import run_command


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
    config = resolve(make_config(DistillConfig, {"student": "r18", "image_size": 16, "batch_size": 32, "epochs": 8, "queue_size": 96,
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


def test_seed_distill_cli_exports_student_and_resumes_with_its_queue(tmp_path, tiny_args, teacher_file):
    out = tmp_path / "run"
    args = [*tiny_args, "--teacher-checkpoint", str(teacher_file), "--queue-size", "56", "--output", str(out)]
    first = run_command("seed-distill", *args, "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "seed export (mocov2), 128-d" in first.stdout
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


def test_small_crops_use_a_second_queue(tmp_path, tiny_args, teacher_file):
    result = run_command("seed-distill", *tiny_args, "--teacher-checkpoint", str(teacher_file), "--small-crops", "2",
                         "--max-steps", "2", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    banks = load_file(tmp_path / "last.ckpt")["memory_banks"]
    assert int(banks["queue"]["ptr"]) == 32 and int(banks["small_queue"]["ptr"]) == 64 % 64


def test_two_process_ddp_gathers_into_one_queue(tmp_path, tiny_args, teacher_file):
    result = run_command("seed-distill", *tiny_args, "--teacher-checkpoint", str(teacher_file), "--queue-size", "200",
                         "--devices", "2", "--accelerator", "cpu", "--max-steps", "2", "--output", str(tmp_path))
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
