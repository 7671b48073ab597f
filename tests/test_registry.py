"""The method registry, per-method flags and the layers of the package."""

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from downstream.compare import CompareConfig
from downstream.detection.config import DetectionConfig
from downstream.knn import KnnConfig
from downstream.linear import LinearConfig
from downstream.semi import SemiConfig
from seed.cli import distill_main
from seed.config import RANGE_KEYS, DistillConfig, PretrainConfig, _base_type
from seed.errors import SeedError
from seed.module import TrainModule
from seed.registry import method_config, methods, registered

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def test_every_method_is_registered_with_its_stage_title_and_own_config():
    assert list(methods("pretrain")) == ["mocov2", "simclr", "supervised"]
    assert list(methods("distill")) == ["meal", "seed", "usi"]
    for name, method in registered().items():
        base = PretrainConfig if method.STAGE == "pretrain" else DistillConfig
        assert issubclass(method, TrainModule) and issubclass(method.CONFIG, base) and method.TITLE, name
        assert type(method_config(method.STAGE, {"method" if method.STAGE == "pretrain" else "mode": name})) is method.CONFIG


def test_a_flag_exists_only_under_the_methods_that_use_it():
    fields = {name: {f.name for f in dataclasses.fields(method.CONFIG)} for name, method in registered().items()}
    assert "queue_size" in fields["seed"] and "queue_size" in fields["mocov2"] and "queue_size" not in fields["meal"] | fields["usi"]
    assert "temperature" not in fields["seed"] | fields["meal"] | fields["usi"] | fields["supervised"]
    assert "teachers" in fields["meal"] and "teachers" not in fields["seed"] | fields["usi"]
    assert "kd_weight" in fields["usi"] and "arch" not in fields["seed"]  # a student, not an --arch


def test_every_number_flag_of_every_command_declares_its_range():
    """So that every int and float flag is checked at parse time (one line, exit 2), none forgotten."""
    configs = [method.CONFIG for method in registered().values()] + [KnnConfig, LinearConfig, SemiConfig, CompareConfig, DetectionConfig]
    for config in configs:
        hints = typing.get_type_hints(config)
        for field in dataclasses.fields(config):
            if _base_type(hints[field.name]) in (int, float):
                assert set(field.metadata) & set(RANGE_KEYS), f"{config.__name__}.{field.name} declares no range"


@pytest.mark.parametrize("stage, values, message", [
    ("pretrain", {"image_size": -3}, "--image-size must be at least 1, got -3"),
    ("pretrain", {"num_workers": -1}, "--num-workers must be at least 0, got -1"),
    ("distill", {"knn_k": 0}, "--knn-k must be at least 1, got 0"),
    ("distill", {"crop_min_scale": 1.5}, r"--crop-min-scale must be in \(0, 1\], got 1.5"),
    ("distill", {"crop_min_scale": 0.0}, r"--crop-min-scale must be in \(0, 1\], got 0.0"),
    ("pretrain", {"lr": 0.0}, "--lr must be positive, got 0.0"),
    ("distill", {"mode": "meal", "cache_top_k": 0}, "--cache-top-k must be at least 1, got 0"),
    ("distill", {"mode": "usi", "mix_switch_prob": 2.0}, r"--mix-switch-prob must be in \[0, 1\], got 2.0"),
])
def test_a_number_out_of_range_stops_when_the_config_is_built(stage, values, message):
    with pytest.raises(SeedError, match=message):
        method_config(stage, values)


def test_the_help_of_a_mode_lists_its_flags_and_the_common_ones_only(capsys):
    helps = {}
    for mode in ("seed", "meal", "usi"):
        with pytest.raises(SystemExit):
            distill_main(["--mode", mode, "--help"])
        helps[mode] = capsys.readouterr().out
    assert "--teachers" in helps["meal"] and "--queue-size" not in helps["meal"] and "--tau-s" not in helps["meal"]
    assert "--queue-size" in helps["seed"] and "--teachers" not in helps["seed"] and "--kd-weight" not in helps["seed"]
    assert "--kd-weight" in helps["usi"] and "--discriminator" not in helps["usi"]
    assert all("--batch-size" in text and "--student" in text for text in helps.values())
    assert "This is MEAL V2 (--mode meal); --mode seed, --mode usi --help lists another method's flags." in " ".join(helps["meal"].split())


def test_a_yaml_key_of_another_method_names_its_owner_before_anything_is_written(tmp_path, capsys):
    recipe = tmp_path / "meal.yaml"
    recipe.write_text("mode: meal\nqueue_size: 1024\n")
    with pytest.raises(SystemExit) as stop:
        distill_main([*TINY, "--config", str(recipe), "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert f"config key 'queue_size' in {recipe}: --queue-size is not a flag of seed-distill --mode meal (MEAL V2); it belongs to --mode seed" in error
    assert not (tmp_path / "out").exists()


def _imports(path: Path, packages: tuple[str, ...]) -> set[str]:
    """The modules of ``packages`` that the file imports, at the top or inside a function alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else [a.name for a in getattr(node, "names", [])] \
            if isinstance(node, ast.Import) else []
        found |= {name for name in names if name.split(".")[0] in packages}
    return found


def test_no_import_circles_and_seed_imports_neither_pretrain_nor_downstream():
    """Every import counts, lazy ones inside functions too (the benchmarks' included). Seen to fail with a lazy
    ``from seed.engine import`` in seed/config.py, and with bench/render.py reading the suite from bench/__main__.py."""
    packages = ("seed", "pretrain", "downstream", "bench")
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for package in packages for p in (ROOT / package).rglob("*.py")}
    graph = {name: {m for m in _imports(path, packages) if m in files and m != name} for name, path in files.items()}
    assert not any(m.split(".")[0] in ("pretrain", "downstream", "bench") for name, deps in graph.items() if name.startswith("seed") for m in deps)
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(name):], name]))
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, [*path, name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_every_shipped_training_recipe_is_a_valid_config_of_its_method():
    """configs/ follows the per-method flags: a key of another method (or one that moved) would stop a user's run."""
    import yaml

    recipes = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) if p.parent.name != "eval"]
    assert len(recipes) > 20
    for recipe in recipes:
        values = yaml.safe_load(recipe.read_text()) or {}
        stage = "distill" if "mode" in values or "student" in values else "pretrain"
        config = method_config(stage, {"config": str(recipe)})
        assert type(config) is registered()[getattr(config, "mode" if stage == "distill" else "method")].CONFIG, recipe
