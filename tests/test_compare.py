import json
import statistics

import pytest
import torch

import downstream.compare as compare
from downstream.compare import CompareConfig, markdown, parse_entries, random_init_file
from seed.backbones import create_backbone
from seed.checkpoints import export_model, load_backbone
from seed.errors import SeedError
from tests.conftest import run_command

TINY = {"data": "digits", "image_size": 16, "batch_size": 64, "num_workers": 0, "epochs": 3}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEED_CACHE", str(tmp_path / "cache"))


def network(path, seed: int, arch: str = "r18"):
    torch.manual_seed(seed + 100)
    export_model(path, arch, create_backbone(arch), None, None, "test", {}, False)
    return str(path)


def test_every_row_gets_the_same_bank_queries_and_recipe(tmp_path, monkeypatch):
    calls = []
    real = compare.cached_features

    def spy(checkpoint, config, split, dataset, indices=None, decoded=None):
        calls.append((checkpoint.sha256, split, id(dataset), indices, id(decoded)))
        return real(checkpoint, config, split, dataset, indices, decoded)

    monkeypatch.setattr(compare, "cached_features", spy)
    entries = [("a", network(tmp_path / "a0.pt", 0)), ("a", network(tmp_path / "a1.pt", 1)), ("b", network(tmp_path / "b.pt", 2))]
    rows, settings = compare.compare(entries, CompareConfig(**TINY, random_init_seeds=2))
    assert [r.label for r in rows] == ["r18 random init", "a", "b"]
    assert [len(r.scores) for r in rows] == [2, 2, 1]
    assert len(calls) == 2 * 5  # train and val for each of the 5 files
    train_sets = {(dataset, decoded) for _, split, dataset, _, decoded in calls if split == "train"}
    val_sets = {(dataset, decoded) for _, split, dataset, _, decoded in calls if split == "val"}
    assert len(train_sets) == 1 and len(val_sets) == 1 and train_sets != val_sets  # one split and one decoded copy of it for all rows
    assert all(indices is None and decoded != id(None) for *_, indices, decoded in calls)  # whole splits, never a subset
    assert settings["bank"] == "train split, 1437 images" and settings["queries"] == "val split, 360 images"
    for row in rows:
        for metric, (mean, std) in row.summary().items():
            values = [s[metric] for s in row.scores]
            assert mean == pytest.approx(statistics.fmean(values))
            assert std == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)


def test_a_network_scores_the_same_as_a_row_of_its_own_and_as_random_init(tmp_path):
    random0 = random_init_file("r18", False, 0)
    again = tmp_path / "copy.pt"
    again.write_bytes(random0.read_bytes())
    rows, _ = compare.compare([("copy of seed 0", str(again))], CompareConfig(**TINY, random_init_seeds=1))
    assert rows[0].scores == rows[1].scores  # same weights, same protocol: the same numbers
    torch.manual_seed(0)
    expected = create_backbone("r18").state_dict()
    loaded = load_backbone(random0).state_dict()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)
    assert random_init_file("r18", False, 0).read_bytes() == random0.read_bytes()


def test_random_init_follows_the_architecture_and_stem(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    export_model(path, "r18", create_backbone("r18", small_images=True), None, None, "test", {}, True)
    rows, _ = compare.compare([("small", str(path))], CompareConfig(**TINY, random_init_seeds=1))
    assert rows[0].label == "r18 (small-image stem) random init"
    assert load_backbone(rows[0].files[0]).conv1.kernel_size == (3, 3)


def test_gains_are_over_random_init_of_the_same_architecture():
    def row(label, arch, knn, random_init=False):
        return compare.Row(label, [{"knn_k200": v, "knn_k20": v, "linear": v} for v in knn], arch=arch, random_init=random_init)

    rows = [row("r18 random init", "r18", [70.0, 72.0], True), row("mbv3l random init", "mbv3l", [60.0], True),
            row("teacher", "r18", [75.0]), row("student", "mbv3l", [62.5, 63.5])]
    assert compare.gains(rows) == ["teacher vs r18 random init: kNN k=200 +4.00, kNN k=20 +4.00, linear (fast) +4.00",
                                   "student vs mbv3l random init: kNN k=200 +3.00, kNN k=20 +3.00, linear (fast) +3.00"]


def test_entries_and_markdown(tmp_path):
    first = network(tmp_path / "x.pt", 0)
    assert parse_entries(f"teacher={first}, {first}") == [("teacher", first), (first, first)]
    with pytest.raises(SeedError, match="is not a file"):
        parse_entries("a=missing.pt")
    row = compare.Row("net", [{"knn_k200": 80.0, "knn_k20": 81.0, "linear": 82.0}, {"knn_k200": 82.0, "knn_k20": 83.0, "linear": 84.0}])
    assert "| net | 2 | 81.00 ± 1.41 | 82.00 ± 1.41 | 83.00 ± 1.41 |" in markdown([row])


def test_cli_writes_the_table(tmp_path):
    first, second = network(tmp_path / "s0.pt", 0), network(tmp_path / "s1.pt", 1)
    out = tmp_path / "out"
    result = run_command("seed-eval", "compare", "--checkpoints", f"student={first},student={second}", "--random-init-seeds", "2",
                         "--data", "digits", "--image-size", "16", "--epochs", "2", "--num-workers", "0", "--output", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in saved["rows"]] == ["r18 random init", "student"]
    assert "| student | 2 |" in (out / "compare.md").read_text() and "| student | 2 |" in result.stdout
    assert "student vs r18 random init: kNN k=200 " in result.stdout
    bad = run_command("seed-eval", "compare", "--checkpoints", "nothing.pt", "--data", "digits")
    assert bad.returncode == 2 and "nothing.pt is not a file" in bad.stderr
