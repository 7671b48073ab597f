"""Installed, not only cloned: the wheel ships the recipes and the method registry, ``--config NAME`` finds a shipped
recipe from any folder, and the metadata builds without a deprecation warning."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from seed.config import find_config, recipe_folder
from seed.errors import SeedError
from seed.registry import method_config

from .conftest import TINY, run_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["distill/seed_r50_r18", "configs/distill/seed_r50_r18.yaml", "distill/seed_r50_r18.yaml"])
def test_a_recipe_is_found_by_name_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config(name) == recipe_folder() / "distill" / "seed_r50_r18.yaml"
    config = method_config("distill", {"config": name})
    assert (config.mode, config.student) == ("seed", "r18")


def test_a_mistyped_recipe_is_one_line_with_close_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SeedError, match=r"config file distill/seed_r50_r81 does not exist, nor a shipped recipe of that name; .*distill/seed_r50_r18"):
        find_config("distill/seed_r50_r81")


def test_every_recipe_folder_ships_in_the_wheel():
    """pyproject.toml lists each folder of configs/ as a package of seed.recipes: a folder left out would not be installed."""
    text = (ROOT / "pyproject.toml").read_text()
    for folder in sorted(p for p in (ROOT / "configs").rglob("*") if p.is_dir()):
        package = "seed.recipes." + ".".join(folder.relative_to(ROOT / "configs").parts)
        assert f'"{package}"' in text, f"{package} missing from [tool.setuptools] packages"


def test_the_wheel_holds_the_recipes_and_the_registry_and_builds_without_warnings(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "Warning" not in built.stdout + built.stderr, built.stdout + built.stderr  # setuptools' deprecation and build warnings
    wheel = zipfile.ZipFile(next(tmp_path.glob("seed_distill-*.whl")))
    names = wheel.namelist()
    shipped = {n.removeprefix("seed/recipes/") for n in names if n.startswith("seed/recipes/") and n.endswith(".yaml")}
    assert shipped == {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert all(f"{name} = " in points for name in ("mocov2", "simclr", "supervised", "seed", "meal", "usi"))


def test_a_command_runs_from_outside_the_repository_with_a_shipped_recipe(tmp_path):
    out = tmp_path / "run"
    result = run_command("seed-pretrain", "--config", "pretrain/mocov2_r18_cifar", *TINY, "--queue-size", "64", "--max-steps", "1",
                         "--epochs", "1", "--knn-every", "0", "--precise-bn-images", "16", "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "teacher.pt").is_file() and "temperature: 0.1" in (out / "config.yaml").read_text()  # the recipe's, not the default
