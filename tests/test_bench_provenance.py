"""Provenance of benchmark results: what a result file records of the code it ran, when a finished run may be reused,
and the page rendered from the committed results alone."""

import datetime
import json
import subprocess

import pytest

import bench.common
from bench.common import finished_marker, provenance, reusable, source_hash, write_result

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A tiny repository root: one module per package, a config, and the results folder; bench.common points at it."""
    for package in ("seed", "pretrain", "downstream"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "core.py").write_text(f"NAME = {package!r}\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "recipe.yaml").write_text("epochs: 1\n")
    monkeypatch.setattr(bench.common, "ROOT", tmp_path)
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "bench" / "results")
    return tmp_path


def test_source_hash_changes_with_a_source_or_config_file_and_only_with_what_it_hashes(tree):
    """Seen to fail when the file name was left out of the digest (the rename below then hashed alike)."""
    first = source_hash()
    assert first == source_hash() and len(first) == 64
    module = tree / "seed" / "core.py"
    module.write_text("NAME = 'changed'\n")
    assert source_hash() != first
    module.write_text("NAME = 'seed'\n")
    assert source_hash() == first  # the same bytes again: the same hash
    (tree / "seed" / "notes.txt").write_text("not a source\n")
    (tree / "seed" / "__pycache__").mkdir()
    (tree / "seed" / "__pycache__" / "core.py").write_text("stale\n")
    assert source_hash() == first
    (tree / "configs" / "recipe.yaml").write_text("epochs: 2\n")
    changed_config = source_hash()
    assert changed_config != first and source_hash([]) == source_hash([tree / "configs" / "other.yaml"])  # no configs, or a missing one
    module.rename(tree / "seed" / "renamed.py")
    assert source_hash() != changed_config  # the same contents under another name


def test_write_result_records_provenance_without_git_then_in_a_checkout(tree):
    """Seen to fail when git_state kept the commit of a failed `git rev-parse` (the tree is no checkout at first), and when
    a rendered page counted as a dirty tree."""
    result = {"title": "t", "description": "d", "tables": []}
    saved = json.loads(write_result("toy", result).read_text())
    kept = saved["provenance"]
    assert kept["commit"] is None and kept["dirty"] is None  # not a git checkout: no commit, no crash
    assert kept["source_hash"] == source_hash() and kept["machine"] == saved["machine"]
    assert kept["sources"] == ["seed/**/*.py", "pretrain/**/*.py", "downstream/**/*.py", "configs"]
    date = datetime.datetime.fromisoformat(kept["date"])
    assert date.utcoffset() == datetime.timedelta(0) and abs(datetime.datetime.now(datetime.UTC) - date) < datetime.timedelta(minutes=5)

    (tree / ".gitignore").write_text("bench/results/\n")
    (tree / "docs").mkdir(exist_ok=True)
    (tree / "docs" / "BENCHMARKS.md").write_text("the page\n")
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "tiny"]):
        subprocess.run([*GIT, "-C", str(tree), *command], check=True, capture_output=True)
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    kept = json.loads(write_result("toy", result, configs=[tree / "configs" / "recipe.yaml"]).read_text())["provenance"]
    assert (kept["commit"], kept["dirty"]) == (head, False) and kept["sources"][-1] == "configs/recipe.yaml"
    (tree / "docs" / "BENCHMARKS.md").write_text("the page, rendered again\n")  # a benchmark's own output: still clean
    assert provenance()["dirty"] is False
    (tree / "pretrain" / "core.py").write_text("NAME = 'edited'\n")
    assert provenance()["dirty"] is True


def test_without_git_the_commit_is_null(tree, monkeypatch):
    """Seen to fail when git_state caught only CalledProcessError (a missing git binary raises FileNotFoundError)."""
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(bench.common.subprocess, "run", no_git)
    assert bench.common.git_state() == (None, None)
    assert provenance([])["commit"] is None


def test_a_finished_run_is_reused_only_with_the_same_command_and_sources(tree):
    """Seen to fail when reusable compared the command but not the source hash."""
    marker = tree / "run.done"
    source = source_hash()
    marker.write_text(json.dumps(finished_marker(source, command="seed-distill --seed 0", recipe="epochs: 1\n")))
    kept = reusable(marker, source, command="seed-distill --seed 0", recipe="epochs: 1\n")
    assert kept is not None and kept["source_hash"] == source and kept["date"].endswith("+00:00")
    (tree / "downstream" / "core.py").write_text("NAME = 'new code'\n")
    assert reusable(marker, source_hash(), command="seed-distill --seed 0", recipe="epochs: 1\n") is None
    assert reusable(marker, source, command="seed-distill --seed 1", recipe="epochs: 1\n") is None
    assert reusable(marker, source, command="seed-distill --seed 0", recipe="epochs: 2\n") is None
    marker.write_text("seed-distill --seed 0\nepochs: 1\n")  # the marker of before provenance: rerun
    assert reusable(marker, source, command="seed-distill --seed 0", recipe="epochs: 1\n") is None
    assert reusable(tree / "missing.done", source, command="seed-distill --seed 0") is None


def test_quality_keeps_a_finished_student_only_on_the_same_sources_and_teacher(tree, monkeypatch):
    """bench.common.run_or_keep (the quality and labelled benchmarks'): the first call runs and marks the run; the same call
    again keeps it and hands back its own date and commit; a changed source, recipe or teacher runs it again. Seen to fail
    when finished_run dropped the teacher argument."""
    from bench import common as quality

    ran = []

    def fake_run(argv, log, threads, quiet=False):
        ran.append(argv)
        (tree / "runs" / "s").mkdir(parents=True, exist_ok=True)
        (tree / "runs" / "s" / "student.pt").write_bytes(b"weights")
        return 1.0

    monkeypatch.setattr(quality, "run", fake_run)
    recipe, folder = tree / "configs" / "recipe.yaml", tree / "runs" / "s"
    argv = ["seed-distill", "--config", str(recipe), "--seed", "0", "--output", str(folder)]
    assert quality.run_or_keep(argv, folder, "student.pt", recipe, "teacher-sha", 1) is None and len(ran) == 1
    marker = json.loads(folder.with_suffix(".done").read_text())
    assert marker["source_hash"] == source_hash([recipe]) and marker["teacher"] == "teacher-sha"
    kept = quality.run_or_keep(argv, folder, "student.pt", recipe, "teacher-sha", 1)
    assert len(ran) == 1 and (kept["date"], kept["commit"]) == (marker["date"], marker["commit"])
    assert quality.run_or_keep(argv, folder, "student.pt", recipe, "another teacher", 1) is None and len(ran) == 2
    (tree / "seed" / "core.py").write_text("NAME = 'new code'\n")
    assert quality.run_or_keep(argv, folder, "student.pt", recipe, "another teacher", 1) is None and len(ran) == 3
    recipe.write_text("epochs: 3\n")
    assert quality.run_or_keep(argv, folder, "student.pt", recipe, "another teacher", 1) is None and len(ran) == 4
    assert quality.run_or_keep(argv, folder, "student.pt", recipe, "another teacher", 1) is not None and len(ran) == 4


def test_reused_rows_and_missing_provenance_are_said_on_the_page():
    """Seen to fail when section() left out the reused line."""
    from bench.render import section

    base = {"name": "toy", "title": "Toy", "machine": {"cpu": "cpu", "cores": 2, "torch": "2"}, "description": "d", "tables": []}
    assert "Provenance: not recorded (run before provenance was kept)." in section(base, "bench")
    kept = {"date": "2026-12-04T18:00:00+00:00", "commit": "0123456789abcdef0123", "dirty": False, "source_hash": "ab" * 32}
    reused = [{"row": "r18 SimCLR alone, seed 0", "date": "2026-12-01T10:00:00+00:00", "commit": "fedcba9876543210"}]
    text = section({**base, "provenance": kept, "reused": reused}, "bench")
    assert "Provenance: run 2026-12-04T18:00:00+00:00, commit `0123456789ab` (clean tree), sources sha256 `abababababab`." in text
    assert ("Reused runs, finished by an earlier invocation on the same source hash: r18 SimCLR alone, seed 0 (finished "
            "2026-12-01T10:00:00+00:00, commit `fedcba987654`).") in text
    assert "commit not known (no git checkout)" in section({**base, "provenance": {**kept, "commit": None, "dirty": None}}, "bench")
    assert "Reused" not in section({**base, "provenance": kept, "reused": []}, "bench")


def test_meal_names_its_reused_runs_with_their_own_dates(tmp_path):
    """bench.meal_bench.to_result from a real run's raw numbers with two stages reused: the description dates them and the result
    lists them for the page. Seen to fail when reused_text printed the measured date instead of each run's."""
    from bench.common import ROOT
    from bench.meal_bench import to_result

    raw = json.loads((ROOT / "tests" / "data" / "meal_result.json").read_text())
    assert "reused" not in raw and "except the runs kept" not in to_result(raw)["description"]
    raw["measured"] = "2026-12-05"
    raw["reused"] = [{"row": "teacher-a", "run": "runs/bench/meal/teacher-a", "date": "2026-12-01T09:00:00+00:00", "commit": "abc"},
                     {"row": "meal", "run": "runs/bench/meal/student", "date": "2026-12-02T09:00:00+00:00", "commit": "abc"}]
    result = to_result(raw)
    assert ("Measured 2026-12-05, except the runs kept from earlier invocations on the same sources: teacher-a (2026-12-01), "
            "meal (2026-12-02).") in result["description"]
    assert result["reused"] == raw["reused"] and "; this invocation alone, the reused runs not counted), one torch thread" in result["description"]


def test_eval_speed_headline_is_between_measured_runs_and_the_extrapolation_is_labelled():
    """From the stored run's measured seconds (bench/results/eval_speed.json): the headline ratio is the measured standard epoch
    over the measured --fast runs; the 100 epochs are labelled extrapolated in the table and the notes.
    Seen to fail when the headline divided the extrapolated 100 epochs by the --fast run (59x / 196x)."""
    from bench.common import RESULTS
    from bench.eval_speed import derived, linear_notes, linear_table

    stored = json.loads((RESULTS / "eval_speed.json").read_text())["data"]["linear"]
    linear = {key: stored[key] for key in ("fast_empty_cache_s", "fast_cached_s", "fast_top1", "standard_one_step_s", "standard_measured_s",
                                           "standard_epochs_measured")} | {"train_images": 60000}
    linear |= derived(linear)
    assert linear["standard_100_epochs_extrapolated_s"] == pytest.approx(stored["standard_100_epochs_extrapolated_s"])
    assert linear["measured_ratios"]["standard_epochs_over_fast_cached"] == pytest.approx(stored["standard_measured_s"] / stored["fast_cached_s"])
    headline, extra = linear_notes(linear, "a randomly initialised r18")
    cached, empty = stored["standard_measured_s"] / stored["fast_cached_s"], stored["standard_measured_s"] / stored["fast_empty_cache_s"]
    assert (f"(all three measured): that standard command ran {cached:.1f}x as long as a whole `--fast` run on cached features and "
            f"{empty:.2f}x") in headline
    over_cached = f"{stored['standard_100_epochs_extrapolated_s'] / stored['fast_cached_s']:.0f}x"
    assert "extrapolated" not in headline and over_cached not in headline
    hours = stored["standard_100_epochs_extrapolated_s"] / 3600
    assert extra.startswith(f"Extrapolated, not measured: the standard protocol's 100 epochs would take about {hours:.1f} h") and over_cached in extra
    rows = linear_table(linear)
    assert [row[1] for row in rows[:4]] == ["measured"] * 4
    assert "extrapolated" in rows[-1][0] and rows[-1][1].startswith("**extrapolated**") and rows[-1][2].endswith("extrapolated")
    assert not any("extrapolated" in " ".join(row) for row in rows[:-1])


def test_the_committed_page_is_what_the_committed_results_render_to(tmp_path):
    """docs/BENCHMARKS.md comes from bench/results/*.json alone: rendering them into a temporary folder gives the committed page,
    byte for byte (plots not drawn: their links are the same). Seen to fail when the provenance line was added to the render
    before the page was regenerated."""
    from bench.render import DOC, render

    doc = tmp_path / "docs" / "BENCHMARKS.md"
    text = render(bench.common.RESULTS, doc, tmp_path / "docs" / "bench", draw_plots=False)
    assert doc.read_text() == text
    assert text == DOC.read_text(), "docs/BENCHMARKS.md is not what bench/results/*.json render to: run `python -m bench.render`"
    assert not (tmp_path / "docs" / "bench").exists()
