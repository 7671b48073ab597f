import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.common
from bench.__main__ import SUITE, default_names, main
from bench.common import ROOT, write_result
from bench.render import render
from seed.precision import native_cpu_bf16

RESULT = {
    "title": "Toy speed", "order": 1, "command": "python -m bench.toy",
    "description": "What a toy benchmark measures.",
    "tables": [{"caption": "Step time:", "columns": ["variant", "ms"], "rows": [["plain", "12.5"], ["ours", "8.0"]]}],
    "plots": [{"file": "toy.png", "title": "toy", "xlabel": "K", "ylabel": "ms", "logx": True,
               "series": [{"label": "ours", "x": [1024, 4096], "y": [8.0, 9.0]}]}],
    "notes": ["ours is 1.56x plain"],
}


@pytest.fixture
def results(tmp_path, monkeypatch):
    """write_result pointed at a temporary results folder."""
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench.common, "ROOT", tmp_path)
    return tmp_path / "results"


def test_render_writes_the_table_the_plot_and_the_machine_line(tmp_path, results):
    write_result("toy", RESULT)
    (results / "old_format.json").write_text(json.dumps({"machine": "a string", "rows": []}))  # not in the common format: skipped
    doc, plots = tmp_path / "docs" / "BENCHMARKS.md", tmp_path / "docs" / "bench"
    text = render(results, doc, plots)
    assert doc.read_text() == text
    assert "## Toy speed" in text and "`python -m bench.toy` → `bench/results/toy.json`" in text
    assert "| variant | ms |\n|---|---|\n| plain | 12.5 |\n| ours | 8.0 |" in text
    assert f"Machine: {bench.common.describe_machine(bench.common.machine())}." in text
    assert "![toy](bench/toy.png)" in text and "- ours is 1.56x plain" in text
    assert (plots / "toy.png").read_bytes().startswith(b"\x89PNG")
    assert "## GPU: not yet measured" in text  # no <name>_gpu result in this folder
    assert all(f"- {name}:" in text for name, (_, _, gpu_args) in SUITE.items() if gpu_args is not None)


def test_write_result_rejects_a_result_missing_required_keys(results):
    with pytest.raises(ValueError, match="lacks"):
        write_result("toy", {"title": "no tables, no description"})
    assert not (results / "toy.json").exists()


def test_bench_list_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    assert listed == list(SUITE)
    assert "distill_speed" in listed and "(has --gpu variant)" in done.stdout and "(not in the default suite)" in done.stdout


def test_make_bench_gpu_runs_the_speed_benchmarks_and_leaves_quality_to_only():
    """`make bench-gpu` is one script of speed benchmarks (the distill step, queue, kNN up to 1M, data loading, the labelled
    benchmark's KD overhead alone)."""
    assert default_names(gpu=True) == ["distill_speed", "queue", "knn", "data_loading", "labelled"]
    assert SUITE["labelled"][2][0] == "--overhead-only"
    assert SUITE["knn"][2][-2:] == ["--sizes", "10000,100000,1000000"] and "quality" in default_names(gpu=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_suite_without_a_gpu_stops_with_one_line(capsys):
    assert main(["--gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err


def test_the_suite_records_each_benchmarks_last_wall_time(results, monkeypatch):
    """bench/results/suite.json: minutes per benchmark from its last run, failures marked; the total is the wall time of one
    invocation that ran every default benchmark, and after a partial rerun the sum of the last runs, labelled so, with the
    complete run kept on its own row. Seen to fail when the partial rerun was passed a wall time (it then claimed one run)."""
    import bench.__main__ as suite

    monkeypatch.setattr(suite, "SUITE", {"fast": ("bench/fast.py", [], None), "broken": ("bench/broken.py", [], None),
                                         "long": ("bench/long.py", [], None)})
    monkeypatch.setattr(suite, "OPTIONAL", {"long"})
    monkeypatch.setattr(suite, "render", lambda: None)
    failing, real_run = {"bench.broken"}, subprocess.run

    def fake_run(command, **kwargs):  # the benchmarks; other commands (git for the provenance, uname for the machine) run for real
        if command[:1] != [sys.executable]:
            return real_run(command, **kwargs)
        return subprocess.CompletedProcess(command, int(bool(failing & set(command))))

    monkeypatch.setattr(suite.subprocess, "run", fake_run)
    clock = iter([0.0, 0.0, 60.0, 100.0, 220.0, 230.0])  # the suite's start, each benchmark's start and end, the suite's end
    monkeypatch.setattr(suite.time, "perf_counter", lambda: next(clock))
    assert suite.main([]) == 1
    saved = json.loads((results / "suite.json").read_text())
    rows, caption = saved["tables"][0]["rows"], saved["tables"][0]["caption"]
    assert [row[:3] for row in rows] == [["fast", "1.0", "ok"], ["broken", "2.0", "failed"],
                                         ["**make bench: one run** (2 benchmarks in one invocation)", "**3.8**", "1 failed"]]
    assert caption.startswith("Total: the wall time of one `make bench` run") and saved["data"]["total"]["kind"] == "one run"
    failing.clear()  # mended
    clock = iter([0.0, 0.0, 600.0, 1000.0, 1030.0, 1040.0])
    assert suite.main(["--only", "long,broken"]) == 0
    saved = json.loads((results / "suite.json").read_text())
    rows, caption = saved["tables"][0]["rows"], saved["tables"][0]["caption"]
    assert [row[:3] for row in rows] == [["fast", "1.0", "ok"], ["broken", "0.5", "ok"], ["long", "10.0", "ok"],
                                         ["**sum of the last runs** (not one `make bench` run)", "**1.5**", ""],
                                         ["the last complete `make bench` run (one invocation; some rows above are newer)", "3.8", "1 failed"]]
    assert rows[2][4] == "no (--only)" and rows[3][3] == rows[0][3]  # one date: both invocations ran today
    assert caption.startswith("Total: the sum of each benchmark's last run") and saved["data"]["total"]["kind"] == "sum of the last runs"


def test_the_benchmarked_seed_step_enqueues_as_training_does():
    """bench.speed.ours_step is the whole step the Trainer runs: after it the queue holds the batch's teacher embeddings
    (the enqueue lives in SEED.optimizer_step; a step without it would time a queue that never changes)."""
    from bench.speed import ours_step, seed_module, teacher_parts, teacher_variant
    from seed.queue import TeacherQueue

    backbone, head = teacher_parts("r18")
    teacher = teacher_variant(backbone, head, "cpu", fold_bn=True, channels_last=False)
    module = seed_module("r18", teacher, queue_size=64, image_size=16)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(images)
    for queue in (module.queue, TeacherQueue(32, 128)):
        before = queue.bank.clone()
        step = ours_step(module, images, "cpu", queue=queue)
        assert "teacher_s" in step()
        assert torch.allclose(queue.bank[:8], expected, atol=1e-5) and torch.equal(queue.bank[8:], before[8:])
        assert int(queue.bank_ptr) == 8 and module._pending == []
        step()
        assert int(queue.bank_ptr) == 16 and torch.allclose(queue.bank[8:16], expected, atol=1e-5)


def test_meal_bench_reports_the_cache_over_seeds_with_top_k_below_the_classes():
    """bench/meal_bench.py renders mean ± std over --seeds and names --cache-top-k (below the 10 classes: the top-k path),
    from the raw numbers of a real run (tests/data/meal_result.json: its ``data``)."""
    import copy
    import statistics

    from bench.meal_bench import meal_score, to_result

    raw = json.loads((ROOT / "tests" / "data" / "meal_result.json").read_text())
    result = to_result(raw)
    table = result["tables"][2]
    assert "--cache-top-k 3" in table["caption"] and "mean ± std over seeds 0, 1, 2" in table["caption"]
    assert table["rows"][1][0] == "cached, top-3 of 10 classes"
    seconds = [run["train_s"] for run in raw["cache"]["subset-cached"]]
    assert table["rows"][1][3] == f"{statistics.mean(seconds):.1f} ± {statistics.stdev(seconds):.1f}"
    changes = [meal_score(c["top1"]) - meal_score(t["top1"]) for t, c in zip(raw["cache"]["subset-teachers"], raw["cache"]["subset-cached"], strict=True)]
    assert f"{statistics.mean(changes):+.2f} ± {statistics.stdev(changes):.2f} points" in result["notes"][-1]
    one = copy.deepcopy(raw)
    one["args"].update(seeds="0", cache_top_k=10)
    for name in ("subset-teachers", "subset-cached"):
        one["cache"][name] = one["cache"][name][:1]
    table = to_result(one)["tables"][2]
    assert "one seed" in table["caption"] and table["rows"][1][0] == "cached, top-10 of 10 classes" and "±" not in table["rows"][1][3]


def test_teacher_curve_scores_each_kept_epoch_against_random_init(tmp_path, results, monkeypatch, tiny_args):
    """A 2-epoch SimCLR run with --keep-checkpoints, scored per epoch under compare's protocol (whole digits splits)."""
    from bench import teacher_curve
    from tests.conftest import TINY, run_command

    monkeypatch.setenv("SEED_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    done = run_command("seed-pretrain", "--method", "simclr", *TINY, "--batch-size", "256", "--epochs", "2", "--knn-every", "0",
                       "--keep-checkpoints", "--precise-bn-images", "64", "--output", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setattr(sys, "argv", ["teacher_curve", "--run", str(run), "--epochs", "1,2", "--seeds", "2"])
    teacher_curve.main()
    saved = json.loads((results / "teacher_curve.json").read_text())
    curve = saved["data"]["curves"][f"r18 simclr ({run.name})"]
    assert list(curve) == ["1", "2"] and all(0 < s["knn_k200"] <= 100 for s in curve.values())
    assert curve["1"] != curve["2"]  # two different networks
    assert len(saved["data"]["random_init"]["r18 small stem"]) == 2
    rows = saved["tables"][0]["rows"]
    assert rows[0][0] == "r18 random init (2 seeds)" and [r[1] for r in rows[1:]] == ["1", "2"]
    assert "digits 16px" in saved["description"]


def test_quality_table_has_random_init_teachers_and_students_under_one_protocol(tmp_path, results, monkeypatch):
    """bench.quality end to end on digits: a 2-epoch teacher trained in the run, its epoch-1 self, r18 students for a few steps;
    each student's .done marker holds the teacher it learned from (seen to fail, KeyError, when the marker left it out)."""
    from bench import quality

    monkeypatch.setenv("SEED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(quality, "RUNS", tmp_path / "runs")
    # 20px, not 16: through the ImageNet stem 16px leaves layer4 1x1 maps, which seed.engine refuses to train in bf16 on a CPU
    common = "data: digits\nimage_size: 20\nsmall_images: false\nnum_workers: 0\nknn_every: 0\nprecise_bn_images: 64\n"
    (tmp_path / "teacher.yaml").write_text("method: simclr\narch: r18\nbatch_size: 256\nepochs: 2\n" + common)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "quality_r18_simclr.yaml").write_text("method: simclr\narch: r18\nbatch_size: 32\nepochs: 1\n" + common)
    (configs / "quality_r18_seed.yaml").write_text("mode: seed\nstudent: r18\nbatch_size: 32\nepochs: 1\nqueue_size: 64\n" + common)
    monkeypatch.setattr(sys, "argv", ["quality", "--teacher-config", str(tmp_path / "teacher.yaml"), "--configs", str(configs),
                                      "--students", "r18", "--seeds", "0", "--weak-epoch", "1", "--quick", "--threads", "1", "--name", "q"])
    quality.main()
    saved = json.loads((results / "q.json").read_text())
    labels = [row[0] for row in saved["tables"][0]["rows"]]
    bf16 = native_cpu_bf16()  # seed-distill refuses emulated bf16, so on a CPU without bf16 units the bench leaves that row out
    assert labels == ["r18 random init", "teacher: r18 SimCLR", "teacher: the same run after 1 epochs", "r18 SimCLR alone",
                      "r18 SEED from the reference teacher", "r18 SEED from the teacher at epoch 1",
                      "r18 SEED from the reference teacher, --teacher-cache --cache-views 1",
                      *(["r18 SEED from the reference teacher, --precision bf16-mixed"] if bf16 else [])]
    assert [row[1] for row in saved["tables"][0]["rows"]] == ["3", "1", "1", "1", "1", "1", "1", *(["1"] if bf16 else [])]
    assert saved["notes"][1].startswith("r18: SEED vs SimCLR alone on the same budget: kNN ") and "--teacher-cache vs the exact step: kNN " in saved["notes"][1]
    assert ("--precision bf16-mixed vs fp32: kNN " in saved["notes"][1]) == bf16
    assert (tmp_path / "runs" / "r18" / "seed0" / "seed_bf16").is_dir() == bf16
    if bf16:
        assert "bf16-mixed" in (tmp_path / "runs" / "r18" / "seed0" / "seed_bf16" / "config.yaml").read_text()
    else:
        assert saved["notes"][-1].startswith("No --precision bf16-mixed row: this CPU has no bf16 units")
    assert (tmp_path / "runs" / "r18" / "seed0" / "seed_cached" / "teacher_cache" / "key.json").is_file()
    assert "digits 20px" in saved["description"] and "Smoke run" in saved["description"]
    assert (tmp_path / "runs" / "teacher" / "teacher-epoch001.pt").is_file()
    marker = json.loads((tmp_path / "runs" / "r18" / "seed0" / "seed.done").read_text())  # what a rerun on the same code would keep
    assert marker["teacher"] == hashlib.sha256((tmp_path / "runs" / "teacher" / "teacher.pt").read_bytes()).hexdigest()
    assert marker["source_hash"] and saved["reused"] == [] and saved["provenance"]["source_hash"]


def test_detection_bench_on_fashion_scenes_compares_teacher_student_and_random_init(tmp_path, results, monkeypatch):
    """bench.detection_bench --scenes fashion end to end on a Fashion-MNIST stand-in: one seed, one iteration per backbone."""
    from bench import detection_bench
    from seed.backbones import create_backbone
    from seed.checkpoints import export_model
    from tests.conftest import garment_fashion_mnist

    garment_fashion_mnist(tmp_path / "data")
    monkeypatch.setenv("SEED_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("SEED_CACHE", str(tmp_path / "cache"))
    for name, seed in (("teacher", 1), ("student", 2)):
        torch.manual_seed(seed)
        export_model(tmp_path / f"{name}.pt", "r18", create_backbone("r18"), None, None, "seed", {}, False)
    monkeypatch.setattr(sys, "argv", ["detection_bench", "--scenes", "fashion", "--teacher", str(tmp_path / "teacher.pt"), "--student",
                                      str(tmp_path / "student.pt"), "--train-images", "4", "--test-images", "2", "--image-size", "64",
                                      "--max-iter", "1", "--batch-size", "2", "--roi-per-image", "8", "--seeds", "0", "--threads", "1"])
    detection_bench.main()
    saved = json.loads((results / "detection_fashion.json").read_text())
    assert [row[0] for row in saved["tables"][0]["rows"]] == [f"r18 teacher ({tmp_path.name}/teacher.pt)", f"r18 student ({tmp_path.name}/student.pt)",
                                                              "r18 random init"]
    assert set(saved["data"]["runs"]) == {"teacher", "student", "random"} and all(len(runs) == 1 for runs in saved["data"]["runs"].values())
    assert saved["notes"][0].startswith("The teacher ") and saved["notes"][1].startswith("The student ")
    assert "12-32px" in saved["description"] and saved["plots"][0]["file"] == "detection_fashion.png"


def test_detection_bench_names_the_command_that_builds_a_missing_student(tmp_path, monkeypatch, capsys):
    from bench import detection_bench

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "teacher.pt").write_bytes(b"")
    monkeypatch.setattr(detection_bench, "reference_teacher_dir", lambda: tmp_path / "teacher")
    monkeypatch.setattr(detection_bench, "QUALITY_STUDENT", tmp_path / "quality" / "student.pt")
    monkeypatch.setattr(sys, "argv", ["detection_bench", "--scenes", "fashion"])
    with pytest.raises(SystemExit) as stop:
        detection_bench.main()
    assert str(stop.value) == (f"no checkpoint at {tmp_path / 'quality' / 'student.pt'}: distil the quality benchmark's r18 student (about 5 min on "
                               f"2 cores): `seed-distill --config configs/bench/quality_r18_seed.yaml --seed 0 --teacher-checkpoint "
                               f"{tmp_path / 'teacher' / 'teacher.pt'} --output {tmp_path / 'quality'}`, or pass --student PATH")
    monkeypatch.setattr(sys, "argv", ["detection_bench", "--scenes", "fashion", "--checkpoint", "x.pt"])
    with pytest.raises(SystemExit) as stop:
        detection_bench.main()
    assert stop.value.code == 2 and "--checkpoint goes with --scenes shapes" in capsys.readouterr().err


def test_the_detection_bench_states_what_the_student_learned_from_its_knn_table():
    from bench.detection_bench import learned_note

    note = learned_note({"teacher r18": [80.0], "student r18 random init": [50.0, 52.0, 54.0], "student r18 distilled": [70.25]})
    assert note.endswith("teacher r18 80.0, student r18 random init 52.0 ± 2.0, student r18 distilled 70.2.")


def test_a_failed_bench_command_is_quoted_by_its_error_line(tmp_path, monkeypatch):
    """CI deletes the log a failed quality run points at: the message carries the command's own error line, even when a
    progress bar shares that line or output follows it."""
    from bench import common as quality

    monkeypatch.setattr(quality, "BIN", Path("/bin"))
    monkeypatch.setattr(quality, "ROOT", tmp_path)
    script = "printf 'Epoch 0: 7%%|x| 3/44\\r'; echo 'sh: error: weights became non-finite at step 4' >&2; echo 'later output'; exit 2"
    with pytest.raises(SystemExit, match=r"^sh failed \(exit 2\): weights became non-finite at step 4; see .*q\.log$"):
        quality.run(["sh", "-c", script], tmp_path / "q.log", 1)
    with pytest.raises(SystemExit, match=r"^sh failed \(exit 3\): last words; see "):
        quality.run(["sh", "-c", "echo first; echo 'last words'; exit 3"], tmp_path / "q.log", 1)


def test_backbone_speed_compares_each_door_with_the_first_student():
    """bench.backbone_speed: ratios of median steps over the reference's (r18), registered outside the default suites.
    Seen to fail: with the reference taken as the last student, the ratios were over timm:resnet18's step."""
    from bench.backbone_speed import STUDENTS, ratios

    timings = {"r18": {"step_s": 2.0}, "tv:resnet18": {"step_s": 2.1}, "timm:resnet18": {"step_s": 1.9}}
    assert ratios(timings) == pytest.approx({"r18": 1.0, "tv:resnet18": 1.05, "timm:resnet18": 0.95})
    assert STUDENTS[0] == "r18" and SUITE["backbone_speed"][0] == "bench/backbone_speed.py"
    assert "backbone_speed" not in default_names(gpu=False) and "backbone_speed" not in default_names(gpu=True)
