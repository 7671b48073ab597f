import os
import pickle
import random

import pytest
import torch
import torchvision

from seed.backbones import create_backbone
from seed.checkpoints import atomic_save, export_model, load_backbone, load_file
from seed.errors import SeedError

from .conftest import run_command


class _Payload:
    """Unpickling this would create a marker file: the attack weights_only must stop."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Payload(marker)}, handle)
    with pytest.raises(SeedError, match="refusing to load"):
        load_file(path)
    assert not marker.exists()


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(SeedError, match="does not exist"):
        load_file(tmp_path / "nope.pt")
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SeedError, match="cannot be read"):
        load_file(path)


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": torch.tensor(1)}, path)

    def failing_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        atomic_save({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_file(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_export_round_trip_identical_weights(tmp_path):
    backbone = create_backbone("r18", small_images=True)
    head = torch.nn.Linear(512, 8)
    export_model(tmp_path / "teacher.pt", "r18", backbone, head, 8, "mocov2", {"arch": "r18"}, True)
    loaded = load_backbone(tmp_path / "teacher.pt")
    assert loaded.conv1.kernel_size == (3, 3)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_torchvision_state_dict_loads_and_wrong_arch_names_the_key(tmp_path):
    model = torchvision.models.resnet18()
    torch.save(model.state_dict(), tmp_path / "tv.pth")
    loaded = load_backbone(tmp_path / "tv.pth", "r18")
    assert torch.equal(loaded.layer4[1].bn2.weight, model.layer4[1].bn2.weight)
    with pytest.raises(SeedError, match="pass --arch"):
        load_backbone(tmp_path / "tv.pth")
    with pytest.raises(SeedError, match="lacks 'layer1.0.conv3.weight'"):
        load_backbone(tmp_path / "tv.pth", "r50")
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(SeedError, match=r"does not fit r18: 'layer1.0.conv1.weight' has shape \(64, 64, 1, 1\)"):
        load_backbone(tmp_path / "r50.pth", "r18")


def test_unknown_format_lists_keys(tmp_path):
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "odd.pt")
    with pytest.raises(SeedError, match=r"fits no known format \(found keys \['epoch', 'notes'\]\)"):
        load_backbone(tmp_path / "odd.pt", "r18")


@pytest.mark.parametrize("kind", ["text", "random bytes"])
def test_a_file_that_is_no_checkpoint_is_named_so_in_one_line(kind, tmp_path, tiny_args):
    """A text file (``/etc/passwd``) made torch's unpickler raise IndexError; random bytes read as "pickled objects other than tensors"."""
    path = tmp_path / "teacher.pth"
    if kind == "text":
        path.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    else:
        path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    with pytest.raises(SeedError, match=f"^{path} is not a PyTorch checkpoint "):
        load_file(path)
    result = run_command("seed-distill", *tiny_args, "--teacher-checkpoint", str(path), "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"seed-distill: error: {path} is not a PyTorch checkpoint "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
