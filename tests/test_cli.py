from pathlib import Path

import pytest

from seed.config import DistillConfig, PretrainConfig, make_config, read_yaml

from .conftest import run_command

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("command", ["seed-pretrain", "seed-distill", "seed-eval"])
def test_console_scripts_answer_help(command):
    result = run_command(command, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_pretrain_help_lists_common_flags():
    text = run_command("seed-pretrain", "--help", timeout=120).stdout
    for flag in ["--config", "--data", "--data-root", "--image-size", "--batch-size", "--epochs", "--max-steps",
                 "--output", "--seed", "--devices", "--num-workers", "--method", "--arch", "--small-images"]:
        assert flag in text, flag


@pytest.mark.parametrize("path", sorted((CONFIGS / "pretrain").glob("*.yaml")) + sorted((CONFIGS / "demo").glob("pretrain*.yaml")), ids=lambda p: p.name)
def test_shipped_pretrain_configs_are_valid(path):
    config = make_config(PretrainConfig, {"config": str(path)})
    assert set(read_yaml(str(path))) <= set(vars(config))


@pytest.mark.parametrize("path", sorted((CONFIGS / "distill").glob("seed_*.yaml")) + sorted((CONFIGS / "demo").glob("distill*.yaml")), ids=lambda p: p.name)
def test_shipped_distill_configs_are_valid(path):
    config = make_config(DistillConfig, {"config": str(path)})
    assert config.mode == "seed"
