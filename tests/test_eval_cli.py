import json
import shutil
from pathlib import Path

import pytest
import torch

from downstream import cli
from downstream.knn import KnnConfig
from downstream.linear import LinearConfig, default_lr, parse_milestones
from downstream.semi import LINEAR_NOTE, SIMCLR_FINETUNE, SemiConfig, resolve_finetune
from downstream.transfer import TransferConfig
from seed.backbones import create_backbone
from seed.checkpoints import export_model
from seed.config import load_config

from .conftest import run_command

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "eval"
CONFIG_CLASSES = {"knn": KnnConfig, "linear": LinearConfig, "semi": SemiConfig, "transfer": TransferConfig}
DIGITS = ["--data", "digits", "--image-size", "16", "--num-workers", "0"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with a random r18 export (stride-4 stem: fast at 16px) and its own feature cache, shared by this module.
    Tests only read the export; each writes its runs to its own tmp_path, so what one test counts or reads there
    (results.json, report rows) does not depend on which other tests ran before it."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    export_model(root / "student.pt", "r18", create_backbone("r18"), None, None, "seed", {}, small_images=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEED_CACHE", str(root / "cache"))
        patch.setenv("OMP_NUM_THREADS", "1")
        yield root
    torch.set_num_threads(threads)


def seed_eval(*args: str) -> None:
    cli.main(list(args))


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_knn_linear_semi_report_end_to_end(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint = str(workspace / "student.pt")
    seed_eval("knn", "--checkpoint", checkpoint, *DIGITS)
    knn = results(tmp_path / "runs/eval/knn-student-digits")
    assert knn["protocol"] == "knn" and knn["primary"] == "top1_k200" and knn["data"] == "digits" and knn["image_size"] == 16
    assert knn["metrics"]["top1_k200"] > 50  # random r18 features of digits: far above the 10% of chance
    assert len(knn["checkpoint"]["sha256"]) == 64 and knn["checkpoint"]["arch"] == "r18"
    assert knn["settings"]["train_images"] == 1437 and knn["settings"]["val_images"] == 360 and knn["seed_version"]
    assert "weighted k=200" in capsys.readouterr().out

    seed_eval("linear", "--fast", "--checkpoint", checkpoint, *DIGITS, "--epochs", "30")
    linear = results(tmp_path / "runs/eval/linear-student-digits")
    assert linear["metrics"]["top1"] > 80 and linear["settings"]["lr"] == 0.1
    assert (tmp_path / "runs/eval/linear-student-digits/classifier.pt").is_file()
    assert "train features: (1437, 512) from the cache" in capsys.readouterr().out  # knn extracted them

    seed_eval("semi", "--checkpoint", checkpoint, *DIGITS, "--fraction", "0.1", "--epochs", "30", "--output", "semi")
    semi = results(tmp_path / "semi")
    assert semi["settings"]["recipe"] == LINEAR_NOTE and "NOT the fine-tuning protocol" in LINEAR_NOTE
    assert f"recipe: {LINEAR_NOTE}" in capsys.readouterr().out
    split = (tmp_path / "semi/split.txt").read_text().split()
    assert semi["settings"]["labelled_images"] == len(split) == 145  # round(0.1 x ~144 per class) per class
    seed_eval("semi", "--checkpoint", checkpoint, *DIGITS, "--split-file", "semi/split.txt", "--epochs", "30", "--output", "semi-again")
    again = results(tmp_path / "semi-again")
    assert again["settings"]["labelled_images"] == 145 and again["metrics"] == semi["metrics"]

    seed_eval("transfer", "--checkpoint", checkpoint, *DIGITS, "--epochs", "5")
    assert results(tmp_path / "runs/eval/transfer-student-digits")["protocol"] == "transfer"

    capsys.readouterr()
    seed_eval("report", ".", "--png", "chart.png")
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "| run | protocol | metric | value | checkpoint | data |"
    assert len(lines) == 2 + 5
    assert any(line.startswith("| runs/eval/knn-student-digits | knn | top1_k200 |") for line in lines)
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "chart.png" in captured.err
    seed_eval("report", "runs", "--all-metrics")
    assert len(capsys.readouterr().out.splitlines()) == 2 + 8 + 2 + 2
    assert (tmp_path / "runs/report.png").is_file()


def test_linear_and_finetune_through_the_engine(workspace, tmp_path, capsys):
    checkpoint = str(workspace / "student.pt")
    out = tmp_path / "engine"
    seed_eval("linear", "--checkpoint", checkpoint, *DIGITS, "--batch-size", "32", "--max-steps", "2", "--output", str(out / "linear"))
    linear = results(out / "linear")
    assert linear["settings"]["lr"] == 30.0 and linear["settings"]["mode"].startswith("full")
    assert {"last.ckpt", "config.yaml", "classifier.pt"} <= {p.name for p in (out / "linear").iterdir()}
    seed_eval("semi", "--finetune", "--checkpoint", checkpoint, *DIGITS, "--batch-size", "16", "--max-steps", "2",
              "--fraction", "0.1", "--output", str(out / "semi"))
    semi = results(out / "semi")
    settings = semi["settings"]
    assert settings["mode"].startswith("fine-tune") and settings["labelled_images"] == 145
    assert "top1" in semi["metrics"]
    # SimCLR's recipe by default: 145 of 1437 labels (>= 10%) -> 30 epochs; lr 0.05 x 16 / 256 for backbone and classifier
    assert settings["recipe"] == SIMCLR_FINETUNE and settings["differs_from_simclr"] == []
    assert (settings["epochs"], settings["lr"], settings["backbone_lr"], settings["momentum"], settings["weight_decay"]) == (30, 0.003125, 0.003125, 0.9, 0.0)
    saved = torch.load(out / "semi" / "last.ckpt", weights_only=True, map_location="cpu")
    groups = saved["optimizer_states"][0]["param_groups"]
    assert [g["nesterov"] for g in groups] == [True, True] and [g["initial_lr"] for g in groups] == [0.003125, 0.003125]
    assert saved["lr_schedulers"][0]["T_max"] == 2 and [g["lr"] for g in groups] == [0.0, 0.0]  # cosine to zero over the 2 steps
    seed_eval("semi", "--finetune", "--checkpoint", checkpoint, *DIGITS, "--batch-size", "16", "--max-steps", "1", "--lr", "0.1",
              "--fraction", "0.1", "--output", str(out / "semi-own"))
    own = results(out / "semi-own")["settings"]
    assert own["differs_from_simclr"] == ["lr"] and own["recipe"].startswith("own fine-tuning recipe") and own["recipe"].endswith("except lr")


def test_console_script_runs_a_protocol(workspace, tmp_path):
    result = run_command("seed-eval", "knn", "--checkpoint", str(workspace / "student.pt"), *DIGITS, "--k", "20",
                         "--backend", "torch", "--output", str(tmp_path / "script"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert results(tmp_path / "script")["primary"] == "top1_k20"
    assert "results:" in result.stdout


def test_default_checkpoint_is_the_demos(workspace, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/demo/pretrain").mkdir(parents=True)
    shutil.copy(workspace / "student.pt", tmp_path / "runs/demo/pretrain/teacher.pt")
    seed_eval("knn", *DIGITS, "--k", "20")
    assert results(tmp_path / "runs/eval/knn-teacher-digits")["checkpoint"]["path"] == "runs/demo/pretrain/teacher.pt"
    (tmp_path / "runs/demo/distill").mkdir(parents=True)
    shutil.copy(workspace / "student.pt", tmp_path / "runs/demo/distill/student.pt")
    seed_eval("knn", *DIGITS, "--k", "20")
    assert results(tmp_path / "runs/eval/knn-student-digits")["checkpoint"]["path"] == "runs/demo/distill/student.pt"


def image_folder(root: Path, splits: dict[str, list[str]]) -> Path:
    from PIL import Image

    for split, classes in splits.items():
        (root / split).mkdir(parents=True)
        for cls in classes:
            (root / split / cls).mkdir()
            Image.new("RGB", (8, 8)).save(root / split / cls / "x.png")
    return root


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "unknown protocol 'nope'; choose one of: knn, linear, semi, transfer, detection, compare, report"),
        ([], "no protocol given"),
        (["knn", "--arch", "r50"], "of a r50 backbone (198 keys missing); check --arch"),
        (["knn", "--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
        (["knn", "--data", "no-val"], "has no val/ folder"),
        (["linear", "--fast", "--data", "mismatch"], "train/ has 2 classes and val/ has 2, and they differ"),
        (["semi", "--data", "empty"], "Couldn't find any class folder"),
        (["semi", "--fraction", "2"], "--fraction must be in (0, 1]"),
        (["knn", "--index", "hnsw"], "unknown --index 'hnsw'"),
        (["report", "."], "no results.json below ."),
        (["report", "nothing"], "nothing is not a folder"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "no-val", {"train": ["a"]})
    image_folder(tmp_path / "mismatch", {"train": ["a", "b"], "val": ["a", "c"]})
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    if args and args[0] != "report" and "--checkpoint" not in args:
        args = [args[0], "--checkpoint", str(workspace / "student.pt"), "--image-size", "16", "--num-workers", "0", *args[1:]]
    with pytest.raises(SystemExit) as exit_info:
        seed_eval(*args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_no_checkpoint_and_no_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        seed_eval("knn", "--data", "digits")
    assert capsys.readouterr().err.strip() == "seed-eval: error: no checkpoint given and no demo run found; pass --checkpoint or run make demo"


def test_help_lists_protocols_and_common_flags(capsys):
    seed_eval("--help")
    text = capsys.readouterr().out
    assert text.startswith("usage: seed-eval") and all(f"  {name} " in text for name in cli.PROTOCOLS)
    with pytest.raises(SystemExit) as exit_info:
        seed_eval("knn", "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--config", "--data", "--data-root", "--image-size", "--batch-size", "--epochs", "--max-steps", "--output", "--seed",
                 "--devices", "--num-workers", "--checkpoint", "--arch", "--k", "--temperature"]:
        assert flag in text, flag


#: What each shipped recipe must give once loaded as a user does (``--config FILE`` through the flag parser) and resolved the way
#: its protocol resolves it: the numbers of the papers it names.
RECIPES = {
    "knn_imagenet.yaml": {"k": "200,20", "temperature": 0.07, "index": "flat", "image_size": 224, "batch_size": 256},
    "linear_imagenet.yaml": {"fast": False, "epochs": 100, "milestones": [60, 80], "lr_r50": 30.0, "lr_mbv3l": 3.0, "momentum": 0.9,
                             "weight_decay": 0.0, "batch_size": 256, "image_size": 224},
    "linear_fast.yaml": {"fast": True, "epochs": 100, "milestones": [60, 80], "lr": 0.1, "batch_size": 256},
    "semi_imagenet_1percent.yaml": {"fraction": 0.01, "finetune_epochs": 60, "finetune_lr": 0.05, "differs": [], "linear_epochs": 100},
    "semi_imagenet_10percent.yaml": {"fraction": 0.1, "finetune_epochs": 30, "finetune_lr": 0.05, "differs": [], "linear_epochs": 100},
    "transfer_cifar10.yaml": {"data": "cifar10", "epochs": 100, "milestones": [60, 80], "image_size": 224},
}


def resolved(name: str, config) -> dict:
    """The protocol values of a loaded config, resolved as the protocol does."""
    values = {key: getattr(config, key) for key in ("k", "temperature", "index", "image_size", "batch_size", "fast", "momentum",
                                                    "weight_decay", "fraction", "data") if hasattr(config, key)}
    if isinstance(config, SemiConfig):
        finetune, differs = resolve_finetune(config, config.fraction)
        values.update(finetune_epochs=finetune.epochs, finetune_lr=finetune.lr, differs=differs,
                      linear_epochs=100 if config.epochs is None else config.epochs)
    elif isinstance(config, (LinearConfig, TransferConfig)):
        values.update(epochs=config.epochs, milestones=parse_milestones(config.milestones, config.epochs), lr=config.lr,
                      lr_r50=default_lr("r50"), lr_mbv3l=default_lr("mbv3l"))
    return values


def test_every_shipped_eval_recipe_is_checked():
    assert sorted(RECIPES) == sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.split("_")[0] in CONFIG_CLASSES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_eval_recipes_give_the_papers_numbers(name):
    path = CONFIGS / name
    config = load_config(CONFIG_CLASSES[name.split("_")[0]], ["--config", str(path)], "seed-eval", "")
    values = resolved(name, config)
    assert {key: values[key] for key in RECIPES[name]} == RECIPES[name]
    typed = load_config(CONFIG_CLASSES[name.split("_")[0]], ["--config", str(path), "--batch-size", "7"], "seed-eval", "")
    assert typed.batch_size == 7 and typed.image_size == config.image_size  # a typed flag wins over the file, the rest stays
