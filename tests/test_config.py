import dataclasses

import pytest
import yaml

from seed.config import PretrainConfig, load_config, make_config, resolve, save_config
from seed.errors import SeedError


def test_defaults_yaml_then_flags(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("arch: r50\nbatch_size: 64\nweight_decay: 1.0e-5\nlr: 1e-3\n")
    config = load_config(PretrainConfig, ["--config", str(file), "--batch-size", "32", "--no-download"], "t", "")
    assert config.arch == "r50"  # from the file
    assert config.batch_size == 32  # the flag wins
    assert config.weight_decay == 1e-5 and config.lr == 1e-3  # YAML's "1e-3" string becomes a float
    assert config.epochs == 200  # the dataclass default


def test_unknown_key_names_the_closest(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("bach_size: 64\n")
    with pytest.raises(SeedError, match="unknown config key 'bach_size'.*did you mean 'batch_size'"):
        load_config(PretrainConfig, ["--config", str(file)], "t", "")


def test_wrong_type_in_yaml(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("batch_size: many\n")
    with pytest.raises(SeedError, match="batch_size.*must be int"):
        load_config(PretrainConfig, ["--config", str(file)], "t", "")


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(PretrainConfig, ["--bach-size", "3"], "t", "")
    assert exit_info.value.code == 2


def test_resolve_fills_method_defaults_only_where_unset():
    config = make_config(PretrainConfig, {"base_lr": 0.1, "image_size": 32})
    resolved = resolve(config, {"base_lr": 0.03, "weight_decay": 1e-4})
    assert resolved.base_lr == 0.1 and resolved.weight_decay == 1e-4
    assert resolved.small_images is True  # 32px -> small stem by default
    assert resolve(make_config(PretrainConfig, {"image_size": 224}), {}).small_images is False


def test_saved_config_reads_back(tmp_path):
    config = make_config(PretrainConfig, {"arch": "r34", "max_steps": 5})
    save_config(config, tmp_path / "config.yaml")
    assert "config" not in yaml.safe_load((tmp_path / "config.yaml").read_text())
    again = load_config(PretrainConfig, ["--config", str(tmp_path / "config.yaml")], "t", "")
    assert dataclasses.asdict(again) == {**dataclasses.asdict(config), "config": str(tmp_path / "config.yaml")}
