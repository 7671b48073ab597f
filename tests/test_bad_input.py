"""Untrusted and broken input: checkpoints carrying pickled code, unreadable or mismatched image folders, bad flags and
config keys. Each stops with one line, exit 2, before anything is written (docs/RELIABILITY.md)."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from pretrain.cli import main as pretrain_main
from seed.backbones import create_backbone
from seed.checkpoints import export_model
from seed.cli import distill_main
from seed.config import TrainConfig, make_config
from seed.data import load_dataset, view_transform
from seed.errors import SeedError
from seed.loaders import make_loader

from .conftest import TINY, image_folder_of
from .test_reliability import Noisy, Toy, _teacher_file

# ---- untrusted files -------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this would create a marker file: the attack weights_only must stop."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path) -> Path:
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Payload(marker), "pytorch-lightning_version": "2.6.0"}, handle)
    return path


@pytest.mark.parametrize("where", ["teacher", "eval", "resume", "auto-resume", "student-init", "meal-teachers"])
def test_pickled_code_is_refused_by_every_command_and_never_runs(where, tmp_path, tiny_args, capsys):
    from downstream.cli import main as eval_main

    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.pt", marker)
    out = tmp_path / "out"
    fast = ["--max-steps", "1", "--output", str(out)]
    main, args = {
        "teacher": (distill_main, [*tiny_args, "--teacher-checkpoint", str(evil), *fast]),
        "eval": (eval_main, ["knn", "--data", "digits", "--checkpoint", str(evil), "--output", str(out)]),
        "resume": (pretrain_main, [*tiny_args, "--resume", str(evil), *fast]),
        "auto-resume": (pretrain_main, [*tiny_args, *fast]),
        "student-init": (distill_main, ["--mode", "meal", *TINY, "--teachers", "r18", "--teacher-checkpoints", str(_classifier(tmp_path)),
                                        "--student-init", str(evil), *fast]),
        "meal-teachers": (distill_main, ["--mode", "meal", *TINY, "--teacher-checkpoints", str(evil), *fast]),
    }[where]
    if where == "auto-resume":
        out.mkdir()
        shutil.copy(evil, out / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "refusing to load" in error and len(error.strip().splitlines()) == 1, error
    assert not marker.exists()


def _classifier(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    backbone = create_backbone("r18", small_images=True)
    path = tmp_path / "classifier.pt"
    export_model(path, "r18", backbone, nn.Linear(512, 10), 10, "supervised", {}, True, extra={"num_classes": 10})
    return path


def test_lightnings_own_resume_path_refuses_pickled_code(tmp_path):
    """Beneath our pre-check, Lightning's ``fit(ckpt_path=..., weights_only=True)`` refuses the file too."""
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.ckpt", marker)
    config = make_config(TrainConfig, {"batch_size": 3, "epochs": 1, "num_workers": 0, "knn_every": 0, "output": str(tmp_path)})
    from seed.engine import build_trainer

    with pytest.raises(pickle.UnpicklingError):
        build_trainer(config, tmp_path).fit(Toy(), make_loader(Noisy(), config, shuffle=True), ckpt_path=str(evil), weights_only=True)
    assert not marker.exists()


def test_no_unsafe_load_in_the_code():
    root = Path(__file__).resolve().parent.parent
    for folder in ("seed", "pretrain", "downstream"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for line in text.splitlines():
                if "torch.load(" in line:
                    assert "weights_only=True" in line, f"{path}: {line.strip()}"
                assert "pickle.load(" not in line and "allow_pickle=True" not in line, f"{path}: {line.strip()}"


# ---- bad data ------------------------------------------------------------------------------------------------------

def _bad_folder(root: Path, good: int = 12) -> Path:
    """An ImageFolder whose class 'a' also holds the six odd files of the issue."""
    image_folder_of(root, train=good, val=4, size=12)
    folder = root / "train" / "class0"
    Image.new("RGB", (12, 12), (200, 10, 10)).save(folder / "whole.jpg")
    cut = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(cut[: len(cut) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    Image.new("L", (12, 12), 128).save(folder / "gray.jpg")
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (1, 1), (0, 0, 255)).save(folder / "tiny.png")
    return root


UNREADABLE = {"truncated.jpg", "empty.jpg", "text.jpg"}


def test_odd_images_are_converted_and_unreadable_ones_skipped(tmp_path):
    root = _bad_folder(tmp_path / "data")
    train = load_dataset(str(root), "train", transform=None, strict=False)
    train.skip_log = tmp_path / "skipped.txt"
    names = [Path(path).name for path, _ in train.samples]
    items = [train[i] for i in range(len(train))]
    assert all(image.mode == "RGB" for image, _ in items) and len(items) == len(train)
    by_name = dict(zip(names, items, strict=True))
    assert by_name["gray.jpg"][0].getpixel((0, 0)) == (128, 128, 128)
    assert by_name["cmyk.jpg"][0].getpixel((0, 0))[0] > 200  # CMYK (0, 255, 255, 0) is red
    assert by_name["tiny.png"][0].size == (1, 1)
    view_transform("mocov2", 16)(by_name["tiny.png"][0])  # a 1x1 image goes through the augmentation
    for name in UNREADABLE:  # replaced by the next readable file of the folder
        following = names[(names.index(name) + 1) % len(names)]
        following = following if following not in UNREADABLE else names[(names.index(following) + 1) % len(names)]
        assert by_name[name][0].tobytes() == by_name[following][0].tobytes()
    logged = (tmp_path / "skipped.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in logged) == sorted(UNREADABLE)
    with pytest.raises(SeedError, match=r"empty.jpg cannot be read .*drop --strict-data"):
        strict = load_dataset(str(root), "train", strict=True)
        [strict[i] for i in range(len(strict))]


def test_training_skips_unreadable_files_and_lists_them_once(tmp_path, capsys):
    """Two epochs with two loader processes: the three unreadable files are listed once; --strict-data stops at the first, in one line."""
    root = _bad_folder(tmp_path / "data")
    args = ["--data", str(root), "--image-size", "16", "--batch-size", "5", "--num-workers", "2", "--epochs", "2", "--arch", "mbv3s",
            "--queue-size", "10", "--knn-bank-size", "30", "--knn-query-size", "8", "--knn-k", "3"]
    pretrain_main([*args, "--output", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert out.count(f"skipped 3 unreadable files, see {tmp_path / 'run' / 'skipped.txt'}") == 1, out
    listed = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert {Path(line.split("\t")[0]).name for line in listed} == UNREADABLE
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main([*args, "--strict-data", "--output", str(tmp_path / "strict")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith("seed-pretrain: error: /") and "cannot be read" in error and "drop --strict-data" in error, error


def _mismatched(root: Path) -> Path:
    image_folder_of(root, train=3, val=2, size=8)
    (root / "val" / "class1").rename(root / "val" / "other")
    return root


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "train").mkdir(parents=True) or (root / "val").mkdir() or root, "Couldn't find any class folder"),
        (lambda root: (root / "train" / "a").mkdir(parents=True) or (root / "val" / "a").mkdir(parents=True) or root, "Found no valid file for the classes a"),
        (_mismatched, "only in train: ['class1'], only in val: ['other']"),
    ],
    ids=["missing path", "empty folder", "no images", "train/val classes differ"],
)
@pytest.mark.parametrize("command", ["seed-pretrain", "seed-distill"])
def test_bad_dataset_folders_stop_before_any_model_is_built(make, message, command, tmp_path, capsys, monkeypatch):
    root = make(tmp_path / "data")
    main = pretrain_main if command == "seed-pretrain" else distill_main
    built = []
    for where in ("seed.module.create_backbone", "seed.checkpoints.create_backbone"):
        monkeypatch.setattr(where, lambda *a, **k: built.append(a))
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(root), "--batch-size", "1", "--teacher-checkpoint" if command == "seed-distill" else "--arch",
              str(_teacher_file(tmp_path / "t.pt")) if command == "seed-distill" else "r18", "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error
    assert not built and not (tmp_path / "out").exists()


# ---- bad configuration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "command, args, message",
    [
        ("seed-pretrain", ["--arch", "resnet18"], "unknown architecture 'resnet18'; choose one of: r18"),
        ("seed-pretrain", ["--method", "byol"], "unknown --method 'byol'; choose one of: mocov2, simclr, supervised"),
        ("seed-distill", ["--mode", "kd"], "unknown --mode 'kd'; choose one of: meal, seed, usi"),
        ("seed-distill", ["--teacher", "r50"], "of a r50 backbone"),
        ("seed-pretrain", ["--batch-size", "2000", "--queue-size", "4096"], "--batch-size 2000 x 1 devices exceeds the 1437 training images"),
        ("seed-pretrain", ["--queue-size", "8"], "--queue-size 8 is smaller than the global batch 16"),
        ("seed-distill", ["--queue-size", "8"], "--queue-size 8 is smaller than the global batch 16"),
        ("seed-pretrain", ["--temperature", "0"], "--temperature must be positive, got 0.0"),
        ("seed-distill", ["--tau-s", "-0.1"], "--tau-s must be positive, got -0.1"),
        ("seed-distill", ["--mode", "meal", "--kd-temperature", "0"], "--kd-temperature must be positive"),
        ("seed-pretrain", ["--bach-size", "8"], "unknown flag '--bach-size'; did you mean '--batch-size'?"),
        ("seed-pretrain", ["--temp", "0.1"], "unknown flag '--temp'; did you mean '--temperature'?"),
        ("seed-pretrain", ["--config", "{yaml}"], "unknown config key 'bach_size' in {yaml}; did you mean 'batch_size'?"),
        ("seed-pretrain", ["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    ],
)
def test_bad_configuration_is_one_line_exit_2_and_writes_nothing(command, args, message, tmp_path, capsys, tiny_args):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("bach_size: 8\n")
    args = [arg.replace("{yaml}", str(yaml)) for arg in args]
    message = message.replace("{yaml}", str(yaml))
    meal = args[:2] == ["--mode", "meal"]
    extra = ["--teacher-checkpoint", str(_teacher_file(tmp_path / "t.pt"))] if command == "seed-distill" and not meal else []
    main = pretrain_main if command == "seed-pretrain" else distill_main
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main([*(TINY if meal else tiny_args), *extra, *args, "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error, error
    assert len(error.strip().splitlines()) == 1, error
    assert set(tmp_path.rglob("*")) == before  # no run folder, no file
