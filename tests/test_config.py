import dataclasses

import pytest
import torch
import yaml

from seed.config import build_parser, make_config, resolve, save_config
from seed.errors import SeedError
from seed.registry import method_config, parse


def test_defaults_yaml_then_flags(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("arch: r50\nbatch_size: 64\nweight_decay: 1.0e-5\nlr: 1e-3\n")
    config = parse("pretrain", ["--config", str(file), "--batch-size", "32", "--no-download"], "")
    assert config.arch == "r50"  # from the file
    assert config.batch_size == 32  # the flag wins
    assert config.weight_decay == 1e-5 and config.lr == 1e-3  # YAML's "1e-3" string becomes a float
    assert config.epochs == 200  # the dataclass default


def test_unknown_key_names_the_closest(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("bach_size: 64\n")
    with pytest.raises(SeedError, match="unknown config key 'bach_size'.*did you mean 'batch_size'"):
        parse("pretrain", ["--config", str(file)], "")


def test_wrong_type_in_yaml(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("batch_size: many\n")
    with pytest.raises(SeedError, match="batch_size.*must be int"):
        parse("pretrain", ["--config", str(file)], "")


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("pretrain", ["--bach-size", "3"], "")
    assert exit_info.value.code == 2


def test_resolve_fills_method_defaults_only_where_unset():
    config = method_config("pretrain", {"base_lr": 0.1, "image_size": 32})
    resolved = resolve(config, {"base_lr": 0.03, "weight_decay": 1e-4})
    assert resolved.base_lr == 0.1 and resolved.weight_decay == 1e-4
    assert resolved.small_images is True  # 32px -> small stem by default
    assert resolve(method_config("pretrain", {"image_size": 224}), {}).small_images is False


def test_saved_config_reads_back(tmp_path):
    config = method_config("pretrain", {"arch": "r34", "max_steps": 5})
    save_config(config, tmp_path / "config.yaml")
    assert "config" not in yaml.safe_load((tmp_path / "config.yaml").read_text())
    again = parse("pretrain", ["--config", str(tmp_path / "config.yaml")], "")
    assert dataclasses.asdict(again) == {**dataclasses.asdict(config), "config": str(tmp_path / "config.yaml")}


def test_every_field_is_declared_once():
    """A field declared twice (in one class, or again in a subclass) lets two help texts and defaults drift apart."""
    import ast
    import inspect

    import seed.config

    tree = ast.parse(inspect.getsource(seed.config))
    declared: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            declared[node.name] = [item.target.id for item in node.body if isinstance(item, ast.AnnAssign)]
    assert {"CommonConfig", "TrainConfig", "PretrainConfig", "DistillConfig"} <= set(declared)
    for name, fields in declared.items():
        assert len(fields) == len(set(fields)), f"{name} declares {sorted(f for f in fields if fields.count(f) > 1)} twice"
        inherited = {f.name for base in getattr(seed.config, name).__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
        assert not inherited & set(fields), f"{name} declares again {sorted(inherited & set(fields))}"


def _cli(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1, error
    return error


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("seed-distill", ["--optimizer", "adam"], "unknown --optimizer 'adam'; choose one of: sgd, lars"),
        ("seed-distill", ["--mode", "kd"], "unknown --mode 'kd'; choose one of: meal, seed, usi"),
        ("seed-distill", ["--mode", "meal", "--discriminator", "gan"], "unknown --discriminator 'gan'; choose one of: joint, minimax, off"),
        ("seed-distill", ["--mode", "meal", "--lr-schedule", "linear"], "unknown --lr-schedule 'linear'; choose one of: step, cosine"),
        ("seed-distill", ["--precision", "8-mixed"], "unknown --precision '8-mixed'; choose one of: auto, 32-true, 16-mixed, bf16-mixed"),
        ("seed-pretrain", ["--method", "byol"], "unknown --method 'byol'; choose one of: mocov2, simclr, supervised"),
        ("seed-pretrain", ["--accelerator", "tpuu"], "unknown --accelerator 'tpuu'; choose one of: auto, cpu, gpu"),
        ("seed-pretrain", ["--resume", "nevr"], "unknown --resume 'nevr'; choose one of: auto, never, or the path of an existing file"),
        ("seed-eval", ["knn", "--index", "hnsw"], "unknown --index 'hnsw'; choose one of: flat, ivf"),
        ("seed-eval", ["knn", "--backend", "numpy"], "unknown --backend 'numpy'; choose one of: auto, faiss, torch"),
        ("seed-eval", ["linear", "--resume", "nevr"], "unknown --resume 'nevr'; choose one of: auto, never, or the path"),
    ],
)
def test_a_value_outside_the_choices_stops_at_parse_time(command, argv, message, capsys, tmp_path, monkeypatch):
    """Before anything is built or written: one line, exit 2 (``--optimizer adam`` used to train with SGD)."""
    from downstream.cli import main as eval_main
    from pretrain.cli import main as pretrain_main
    from seed.cli import distill_main

    monkeypatch.chdir(tmp_path)
    main = {"seed-distill": distill_main, "seed-pretrain": pretrain_main, "seed-eval": eval_main}[command]
    assert message in _cli(main, [*argv, "--output", str(tmp_path / "out")], capsys)
    assert list(tmp_path.iterdir()) == []


def test_choices_hold_for_yaml_files_and_replace_too(tmp_path, capsys):
    from seed.cli import distill_main
    from seed.config import DistillConfig

    file = tmp_path / "run.yaml"
    file.write_text("mode: meal\noptimizer: adam\n")
    assert "unknown --optimizer 'adam'; choose one of: sgd, lars" in _cli(distill_main, ["--config", str(file)], capsys)
    with pytest.raises(SeedError, match="unknown --discriminator 'gan'"):
        dataclasses.replace(method_config("distill", {"mode": "meal"}), discriminator="gan")
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"")
    assert method_config("pretrain", {"resume": str(checkpoint), "optimizer": "lars", "precision": "bf16-mixed"}).resume == str(checkpoint)
    assert "{sgd,lars}" in build_parser(DistillConfig, "t", "").format_help()  # --help lists them


def test_every_enumerated_option_of_every_command_is_a_checked_literal(tmp_path):
    """The choices live in the type (``Literal``), one ``option`` helper for all commands: seed-eval's protocols and
    detection included, whose flags used to be checked by hand or not at all."""
    import typing

    from downstream.detection.config import DetectionConfig
    from downstream.knn import KnnConfig
    from downstream.linear import LinearConfig
    from seed.config import RANGE_KEYS, choices_of
    from seed.distill import SEEDConfig
    from seed.meal import MEALConfig
    from seed.registry import registered

    expected = {(SEEDConfig, "augmentation"): ("mocov2", "mocov1", "swav"), (MEALConfig, "discriminator"): ("joint", "minimax", "off"),
                (KnnConfig, "index"): ("flat", "ivf"),
                (KnnConfig, "backend"): ("auto", "faiss", "torch"), (LinearConfig, "resume"): ("auto", "never"),
                (DetectionConfig, "engine"): ("auto", "detectron2", "torchvision"), (DetectionConfig, "head"): ("c4", "fpn")}
    for (kind, name), values in expected.items():
        assert choices_of(typing.get_type_hints(kind)[name]) == values, name
    for kind in (*(method.CONFIG for method in registered().values()), KnnConfig, LinearConfig, DetectionConfig):
        assert all(set(field.metadata) <= {"help", "or_file", *RANGE_KEYS} for field in dataclasses.fields(kind))  # no second way to list choices
    with pytest.raises(SeedError, match="unknown --head 'c5'; choose one of: c4, fpn"):
        make_config(DetectionConfig, {"head": "c5"})
    with pytest.raises(SeedError, match="unknown --backend 'numpy'; choose one of: auto, faiss, torch"):
        make_config(KnnConfig, {"backend": "numpy"})
    assert make_config(LinearConfig, {"val_every": 2}).validation_every() == (2, None)  # the engine asks the config, no stand-in fields



def test_the_console_script_says_it_in_one_line(tmp_path):
    from .conftest import run_command

    result = run_command("seed-distill", "--optimizer", "adam", "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.strip() == "seed-distill: error: unknown --optimizer 'adam'; choose one of: sgd, lars", result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, argv", [("seed-distill", []), ("seed-pretrain", []), ("seed-eval", ["linear"]),
                                           ("seed-eval", ["detection"])])
def test_bf16_on_a_cpu_without_bf16_units_stops_at_parse_time(command, argv, capsys, tmp_path, monkeypatch):
    """oneDNN emulates bf16 there, 2-26x slower than fp32 (docs/RELIABILITY.md): the run stops with one line before anything loads."""
    import seed.precision
    from downstream.cli import main as eval_main
    from pretrain.cli import main as pretrain_main
    from seed.cli import distill_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(seed.precision, "native_cpu_bf16", lambda: False)
    main = {"seed-distill": distill_main, "seed-pretrain": pretrain_main, "seed-eval": eval_main}[command]
    said = _cli(main, [*argv, "--precision", "bf16-mixed", "--accelerator", "cpu", "--output", str(tmp_path / "out")], capsys)
    assert "--precision bf16-mixed: this CPU has no bf16 units (AVX512-BF16 or AMX)" in said and "use --precision 32-true" in said
    assert list(tmp_path.iterdir()) == []


def test_bf16_passes_where_the_cpu_has_bf16_units_or_on_a_gpu(monkeypatch):
    import seed.precision
    from seed.precision import resolve_precision

    config = method_config("pretrain", {"precision": "bf16-mixed", "accelerator": "cpu"})
    monkeypatch.setattr(seed.precision, "native_cpu_bf16", lambda: True)
    assert resolve_precision(config) == "bf16-mixed"
    monkeypatch.setattr(seed.precision, "native_cpu_bf16", lambda: False)
    with pytest.raises(SeedError, match="no bf16 units"):
        resolve_precision(config)
    assert resolve_precision(dataclasses.replace(config, precision="32-true")) == "32-true"
    assert seed.precision.check_cpu_bf16("bf16-mixed", on_gpu=True) == "bf16-mixed"


def test_a_cpu_bf16_run_whose_strided_convolution_gets_1x1_maps_stops_at_its_first_step(capsys, tmp_path, monkeypatch):
    """torch's oneDNN bf16 weight gradient of a strided 3x3 convolution over 1x1 maps is garbage or nan (a ResNet at 16px:
    layer4.0.conv1); the run stops with one line before that first backward, and writes no checkpoint."""
    import seed.precision
    from pretrain.cli import main as pretrain_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(seed.precision, "native_cpu_bf16", lambda: True)  # so that CI's CPU, which has no bf16 units, gets this far
    said = _cli(pretrain_main, ["--data", "digits", "--image-size", "16", "--batch-size", "8", "--num-workers", "0", "--knn-every", "0",
                                "--max-steps", "2", "--no-small-images", "--precision", "bf16-mixed", "--accelerator", "cpu",
                                "--output", str(tmp_path / "out")], capsys)
    assert "bf16 on the CPU: backbone.layer4.0.conv1, a stride-2 convolution, gets 1x1 maps at this --image-size" in said
    assert not (tmp_path / "out" / "last.ckpt").exists()


def test_the_bf16_guard_passes_what_oneDNN_computes_right():
    """Depthwise, stride 1, 2x2 maps, fp32, frozen weights and no-grad passes go through; a trained 3x3 stride-2 over 1x1 does not."""
    from torch import nn

    from seed.callbacks import guard_cpu_bf16_convolutions

    layers = nn.ModuleDict({"strided": nn.Conv2d(4, 4, 3, 2, 1), "depthwise": nn.Conv2d(4, 4, 3, 2, 1, groups=4), "flat": nn.Conv2d(4, 4, 3, 1, 1)})
    guard_cpu_bf16_convolutions(layers)
    one, two = torch.randn(2, 4, 1, 1), torch.randn(2, 4, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers["strided"](two), layers["depthwise"](one), layers["flat"](one)
        with torch.no_grad():
            layers["strided"](one)
        with pytest.raises(SeedError, match="bf16 on the CPU: strided, a stride-2 convolution, gets 1x1 maps"):
            layers["strided"](one)
    layers["strided"](one)  # fp32
    layers["strided"].requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers["strided"](one)


def test_the_bf16_guard_watches_the_first_step_only_and_only_under_bf16():
    """Later steps have the first one's shapes: the hooks go after it, so the training step carries none."""
    from types import SimpleNamespace

    from torch import nn

    from seed.callbacks import CpuBf16Guard

    layers = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 2, 1, groups=4))
    guard = CpuBf16Guard()
    guard.on_train_start(SimpleNamespace(precision="32-true"), layers)
    assert guard.handles == [] and not layers[0]._forward_pre_hooks
    guard.on_train_start(SimpleNamespace(precision="bf16-mixed"), layers)
    assert len(guard.handles) == 1 and len(layers[0]._forward_pre_hooks) == 1
    guard.on_train_batch_end(SimpleNamespace(), layers, None, None, 0)
    assert guard.handles == [] and not layers[0]._forward_pre_hooks
