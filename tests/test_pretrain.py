import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from seed.checkpoints import load_backbone, load_file
from seed.config import resolve
from seed.engine import build_trainer, fit
from seed.registry import method_config, methods

from .conftest import TINY, run_command


class FixedViews(Dataset):
    """Two fixed views (an image and a noisy copy) of each of 256 fixed images."""

    def __init__(self, size: int = 256) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x0 = torch.randn(size, 3, 16, 16, generator=generator)
        self.x1 = self.x0 + 0.3 * torch.randn(size, 3, 16, 16, generator=generator)

    def __len__(self) -> int:
        return len(self.x0)

    def __getitem__(self, i: int):
        return [self.x0[i], self.x1[i]], 0


def _infonce(module, data: FixedViews) -> float:
    """InfoNCE of views 0..31 against their second view, other images' keys as negatives."""
    key_backbone = getattr(module, "backbone_momentum", module.backbone)
    key_head = getattr(module, "projection_head_momentum", module.projection_head)
    module.eval()
    with torch.no_grad():
        query = F.normalize(module.projection_head(module.backbone(data.x0[:32])), dim=1)
        keys = F.normalize(key_head(key_backbone(torch.cat([data.x1[:32], data.x0[32:128]]))), dim=1)
    module.train()
    logits = torch.cat([(query * keys[:32]).sum(1, keepdim=True), query @ keys[32:].T], dim=1) / 0.2
    return float(F.cross_entropy(logits, torch.zeros(32, dtype=torch.long)))


@pytest.mark.parametrize("method", sorted(m for m in methods("pretrain") if m != "supervised"))  # supervised: tests/test_supervised.py
def test_training_lowers_the_contrastive_loss(method, tmp_path):
    """A few epochs on fixed images teach the encoder to tell the images apart."""
    pl.seed_everything(0, verbose=False)
    moco = {"queue_size": 64, "moco_momentum": 0.9} if method == "mocov2" else {}
    config = method_config("pretrain", {"method": method, "arch": "r18", "image_size": 16, "batch_size": 32, "epochs": 4,
                                          "knn_every": 0, "output": str(tmp_path), "base_lr": 0.05, "optimizer": "sgd", "warmup_epochs": 0.0, **moco})
    module = methods("pretrain")[method](resolve(config, methods("pretrain")[method].DEFAULTS), num_classes=10)
    data = FixedViews()
    before = _infonce(module, data)
    build_trainer(module.config, tmp_path).fit(module, DataLoader(data, batch_size=32, shuffle=True))
    after = _infonce(module, data)
    assert after < 0.7 * before, (before, after)
    for bank in module._memory_banks().values():
        assert int(bank.bank_ptr) == (4 * 8 * 32) % 64  # the queue took every key in


def test_channels_last_trains_the_same_network_in_nhwc(tmp_path):
    """--channels-last changes the memory layout only: the same steps give the same weights (to float rounding),
    held NHWC in the query and the momentum encoder alike, and exported weights load into any layout."""
    trained = {}
    for channels_last in (False, True):
        pl.seed_everything(0, verbose=False)
        config = method_config("pretrain", {"method": "mocov2", "arch": "r18", "image_size": 16, "batch_size": 32, "max_steps": 3,
                                              "queue_size": 64, "knn_every": 0, "base_lr": 0.05, "channels_last": channels_last})
        module = methods("pretrain")["mocov2"](resolve(config, methods("pretrain")["mocov2"].DEFAULTS), num_classes=10)
        fit(module, DataLoader(FixedViews(96), batch_size=32), None, module.config, tmp_path / str(channels_last))
        trained[channels_last] = module
    convolutions = [p for p in trained[True].parameters() if p.dim() == 4]
    assert len(convolutions) == 2 * 20 and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert not trained[False].backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for (name, a), b in zip(trained[False].state_dict().items(), trained[True].state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert load_file(tmp_path / "True" / "last.ckpt")["global_step"] == 3


def test_pretrain_cli_writes_run_folder_and_resumes(tmp_path, tiny_args):
    out = tmp_path / "run"
    first = run_command("seed-pretrain", *tiny_args, "--max-steps", "3", "--knn-every-steps", "3", "--output", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert {"config.yaml", "last.ckpt", "teacher.pt", "knn.json"} <= {p.name for p in out.iterdir()}
    log = (out / "logs" / "metrics.csv").read_text()
    assert all(column in log.splitlines()[0] for column in ("loss", "lr", "img_s", "knn_top1"))  # the online kNN monitor ran
    ckpt = load_file(out / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert int(ckpt["memory_banks"]["criterion.memory_bank"]["ptr"]) == 3 * 16 % 64
    exported = load_file(out / "teacher.pt")
    assert exported["arch"] == "r18" and exported["method"] == "mocov2" and exported["embed_dim"] == 128
    assert exported["small_images"] is True  # 16px -> small-image stem by default
    teacher = load_backbone(out / "teacher.pt")
    from_ckpt = load_backbone(out / "last.ckpt")
    for key, value in teacher.state_dict().items():
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(value, from_ckpt.state_dict()[key]), key
    # teacher.pt holds the BatchNorm statistics recomputed over the monitor bank's images (PreciseBN), last.ckpt the running ones
    assert not torch.equal(teacher.bn1.running_mean, from_ckpt.bn1.running_mean)
    assert "r18 random init" in first.stdout and "r18 mocov2" in first.stdout and "n=3" in first.stdout

    second = run_command("seed-pretrain", *tiny_args, "--max-steps", "5", "--output", str(out))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stdout
    assert load_file(out / "last.ckpt")["global_step"] == 5


def test_kept_checkpoints_are_the_epoch_ends(tmp_path, tiny_args):
    """--keep-checkpoints: each epoch's last.ckpt stays as checkpoints/epoch-E.ckpt (1,437 digits at batch 256: 5 steps an epoch)."""
    result = run_command("seed-pretrain", "--method", "simclr", *TINY, "--batch-size", "256", "--epochs", "2", "--knn-every", "0",
                         "--keep-checkpoints", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    kept = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["epoch-001.ckpt", "epoch-002.ckpt"]
    assert [load_file(p)["global_step"] for p in kept] == [5, 10]
    assert kept[-1].read_bytes() == (tmp_path / "last.ckpt").read_bytes()


def test_simclr_runs(tmp_path, tiny_args):
    result = run_command("seed-pretrain", "--method", "simclr", *TINY, "--max-steps", "2", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_file(tmp_path / "teacher.pt")["method"] == "simclr"


def test_epochs_that_end_before_max_steps_are_announced(tmp_path, tiny_args):
    """One epoch of digits at batch 512 is 2 steps: --max-steps 5 cannot be reached, and the run says so up front."""
    result = run_command("seed-pretrain", "--method", "simclr", *TINY, "--batch-size", "512", "--epochs", "1", "--max-steps", "5",
                         "--knn-every", "0", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: --epochs 1 is 2 steps, so the run ends before --max-steps 5; raise --epochs to reach it" in result.stdout
    assert load_file(tmp_path / "last.ckpt")["global_step"] == 2


def test_two_process_ddp_on_cpu(tmp_path, tiny_args, ddp_env):
    """The multi-GPU/multi-node path (Lightning DDP) exercised with 2 CPU processes over gloo, on a port of its own."""
    result = run_command("seed-pretrain", *tiny_args, "--devices", "2", "--accelerator", "cpu", "--max-steps", "3", "--output", str(tmp_path),
                         env=ddp_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_file(tmp_path / "last.ckpt")["global_step"] == 3
    ckpt_files = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert ckpt_files == ["last.ckpt"]  # rank 0 alone writes, and no temporary file is left
    assert sorted(p.name for p in tmp_path.glob(".*")) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "r19"], "unknown architecture 'r19'"),
        (["--method", "byol"], "unknown --method 'byol'; choose one of: mocov2, simclr"),
        (["--batch-size", "5000", "--queue-size", "8192"], "exceeds the 1437 training images"),
        (["--data", "/no/such/folder"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, tiny_args):
    result = run_command("seed-pretrain", *tiny_args, *args, "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_moco_key_encoder_normalises_shuffled_groups_separately():
    """Single-device shuffle-BN: with --bn-splits 4 each of the 4 groups (sample n in group n % 4) gets its own statistics."""
    from lightly.models.batchnorm import SplitBatchNorm

    from pretrain.mocov2 import MoCoV2

    config = method_config("pretrain", {"method": "mocov2", "arch": "r18", "image_size": 16, "batch_size": 8, "bn_splits": 4, "queue_size": 64})
    module = MoCoV2(resolve(config, MoCoV2.DEFAULTS), num_classes=10)
    norm = module.backbone_momentum.bn1
    assert isinstance(norm, SplitBatchNorm) and norm.num_splits == 4
    assert not any(isinstance(m, SplitBatchNorm) for m in module.backbone.modules())  # the exported query encoder keeps plain BN
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(8, 64, 4, 4) * 3 + 1
    out = norm.train()(x)
    for group in range(4):
        members = x[group::4]
        mean, var = members.mean(dim=(0, 2, 3), keepdim=True), members.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        expected = (members - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]
        torch.testing.assert_close(out[group::4], expected, atol=1e-5, rtol=1e-5)
    # parameters stay shared with the query encoder's shape, so the momentum update pairs them one to one
    assert [p.shape for p in module.backbone.parameters()] == [p.shape for p in module.backbone_momentum.parameters()]


def test_moco_head_bn_is_split_in_the_key_encoder_only():
    """--moco-head-bn: both heads get BatchNorm1d; the key head's normalises the shuffled groups separately, like its backbone's."""
    from lightly.models.batchnorm import SplitBatchNorm

    from pretrain.mocov2 import MoCoV2, SplitBatchNorm1d

    values = {"method": "mocov2", "arch": "r18", "image_size": 16, "batch_size": 8, "bn_splits": 2, "queue_size": 64, "moco_head_bn": True}
    module = MoCoV2(resolve(method_config("pretrain", values), MoCoV2.DEFAULTS), num_classes=10)
    key_norms = [m for m in module.projection_head_momentum.modules() if isinstance(m, SplitBatchNorm)]
    assert key_norms and all(isinstance(m, SplitBatchNorm1d) for m in key_norms)
    query_norms = [m for m in module.projection_head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(query_norms) == len(key_norms) and not any(isinstance(m, SplitBatchNorm) for m in module.projection_head.modules())
    x = torch.randn(8, 512) * 2 + 3
    out = key_norms[0].train()(x)
    for group in range(2):
        members = x[group::2]
        expected = (members - members.mean(0)) / torch.sqrt(members.var(0, unbiased=False) + key_norms[0].eps)
        torch.testing.assert_close(out[group::2], expected, atol=1e-5, rtol=1e-5)
    without = MoCoV2(resolve(method_config("pretrain", {**values, "moco_head_bn": False}), MoCoV2.DEFAULTS), num_classes=10)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in without.projection_head.modules())


@pytest.mark.parametrize(("devices", "batch", "flag", "expected"),
                         [(1, 256, None, 8), (1, 12, None, 6), (1, 4, None, 2), (1, 1, None, 1), (2, 256, None, 1), (1, 256, 1, 1)])
def test_bn_splits_default_follows_devices_and_divides_the_batch(devices, batch, flag, expected):
    from pretrain.mocov2 import bn_splits

    config = method_config("pretrain", {"devices": devices, "batch_size": batch, "bn_splits": flag})
    assert bn_splits(config) == expected


def test_simclr_loss_is_float32_under_bf16_autocast():
    """Under bf16 autocast the NT-Xent logits are still computed in float32: the step's loss equals the loss of the head's
    outputs in float64 to 1e-5. Seen to fail with the loss's ``autocast(enabled=False)`` block removed (off by 3e-4)."""
    from lightly.loss import NTXentLoss

    pl.seed_everything(0, verbose=False)
    config = method_config("pretrain", {"method": "simclr", "arch": "r18", "image_size": 16, "batch_size": 32, "knn_every": 0})
    module = methods("pretrain")["simclr"](resolve(config, methods("pretrain")["simclr"].DEFAULTS), num_classes=10)
    module.log = lambda *args, **kwargs: None  # no trainer to log to
    heads = []
    module.projection_head.register_forward_hook(lambda _module, _inputs, output: heads.append(output))
    data = FixedViews(32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(([data.x0, data.x1], torch.zeros(32)), 0)
    z0, z1 = heads[0].double().chunk(2)
    assert heads[0].dtype == torch.bfloat16  # the network did run in bf16
    expected = NTXentLoss(module.config.temperature)(z0, z1)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(expected)) < 1e-5, (float(loss), float(expected))
