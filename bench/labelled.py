"""Labelled distillation against the same student trained on labels: MEAL V2 and USI on the offline default data.

The papers' claims, in their shape, on Fashion-MNIST at 32px (2 cores): MEAL V2's student, taught by the mean softmax of
two strong teachers without reading a label, beats the same network trained on the labels for the same steps from the same
init; USI's recipe with KD beats the same recipe without it. Every student row has the same budget (the ``max_steps`` and
``batch_size`` of the recipes ``configs/bench/labelled_*.yaml``), and every row is a command a user can run, whose exported
file (``student.pt`` / ``teacher.pt``, with its classifier) this benchmark scores on the whole val split:

- the teachers: two supervised ResNet-18s (``configs/teacher/labelled_{a,b}.yaml``; ``make teachers-labelled`` builds
  them in ``$SEED_CACHE/labelled-teachers``, resumable; this benchmark builds them when they are missing);
- per student architecture, one student init (``labelled_init.yaml``, a short supervised start, the first seed's) that
  every seed's rows start from, so the seeds vary the runs and not their starting point; then, per seed:
- the label control: ``seed-pretrain --method supervised --init INIT`` for the students' budget, at the best lr of a sweep
  over ``--control-lrs`` on the first seed (picked on the val split, which can only favour the control);
- MEAL V2 (``labelled_meal.yaml``) from the init with both teachers; from random weights (the init claim); with one
  teacher (the ensemble claim); with ``--label-weight 1`` (the hard labels added: the no-labels claim);
- USI (``labelled_usi.yaml``) from random weights with teacher A; the same with ``--kd-weight 0`` (USI's own control);
  with ``--kd-only``;
- for the second student family (``--students``, default mbv3s): init, control, MEAL V2 and USI with and without KD,
  from the same recipes (one recipe, any backbone).

Then, on a quiet machine, USI's cost figure: one distillation step with one teacher, with two, and reading the
teacher-output cache, each as a ratio to the student's step alone (teachers BatchNorm-folded in inference mode, student
and teachers channels_last), median of interleaved rounds. The comparisons land in ``bench/results/labelled.json`` under
``data.claims`` (rows a and b, the difference of their means, the larger of their stds, the target, whether it holds), which
the notes and the README read.

Runs go two at a time (``--jobs``), one torch thread each; a finished run is kept when its ``.done`` marker holds the same
command, recipe, source hash and input files (teachers, init), and the result lists it under ``reused``.

    python -m bench.labelled                       # 3 seeds, students r18 and mbv3s (about 3 h on 2 cores, teachers included)
    python -m bench.labelled --seeds 0 --quick     # a smoke run: minutes, not a result
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import ROOT, cache_dir, mean_std, relative_name, reused_entry, run, run_or_keep, training_minutes, write_result
from seed.checkpoints import file_sha256

RUNS = ROOT / "runs" / "bench" / "labelled"
CONFIGS = ROOT / "configs" / "bench"
TEACHER_CONFIGS = {"a": ROOT / "configs" / "teacher" / "labelled_a.yaml", "b": ROOT / "configs" / "teacher" / "labelled_b.yaml"}
MAKE_TEACHERS = "make teachers-labelled"
QUICK = ["--max-steps", "4", "--precise-bn-images", "64"]
#: name -> (recipe, command, exported file, flags, from the init): each row of a student architecture.
ROWS: dict[str, tuple[str, str, str, list[str], bool]] = {
    "meal": ("labelled_meal.yaml", "seed-distill", "student.pt", ["--teacher-checkpoints", "{a},{b}"], True),
    "meal_random": ("labelled_meal.yaml", "seed-distill", "student.pt", ["--teacher-checkpoints", "{a},{b}"], False),
    "meal_one": ("labelled_meal.yaml", "seed-distill", "student.pt", ["--teacher-checkpoints", "{a}"], True),
    "meal_labels": ("labelled_meal.yaml", "seed-distill", "student.pt", ["--teacher-checkpoints", "{a},{b}", "--label-weight", "1"], True),
    "usi": ("labelled_usi.yaml", "seed-distill", "student.pt", ["--teacher-checkpoint", "{a}"], False),
    "usi_no_kd": ("labelled_usi.yaml", "seed-distill", "student.pt", ["--teacher-checkpoint", "{a}", "--kd-weight", "0"], False),
    "usi_kd_only": ("labelled_usi.yaml", "seed-distill", "student.pt", ["--teacher-checkpoint", "{a}", "--kd-only"], False),
}
LABELS = {"init": "{arch} init (supervised, {steps} steps)", "control": "{arch} label control (init + cross-entropy)",
          "meal": "{arch} MEAL V2 (2 teachers, from the init)", "meal_random": "{arch} MEAL V2 from random weights",
          "meal_one": "{arch} MEAL V2, one teacher (A)", "meal_labels": "{arch} MEAL V2 + hard labels (--label-weight 1)",
          "usi": "{arch} USI (teacher A, from random weights)", "usi_no_kd": "{arch} USI recipe without KD (--kd-weight 0)",
          "usi_kd_only": "{arch} USI, KD only (--kd-only)"}
#: The rows of the second student family: the two comparisons, one recipe for any backbone.
SECOND_ROWS = ("meal", "usi", "usi_no_kd")
#: name, row a, row b, target (points; None: reported as measured). Rows by key; "{main}" / "{second}" the architectures.
CLAIMS: list[tuple[str, str, str, float | None]] = [
    ("MEAL V2 beats the label control", "{main} meal", "{main} control", 1.0),
    ("USI beats its recipe without KD", "{main} usi", "{main} usi_no_kd", 1.0),
    ("The ensemble teaches better than one teacher", "{main} meal", "{main} meal_one", 0.0),
    ("A supervised init beats random weights", "{main} meal", "{main} meal_random", None),
    ("Hard labels add nothing to MEAL V2", "{main} meal_labels", "{main} meal", None),
    ("KD alone keeps USI's accuracy", "{main} usi_kd_only", "{main} usi", None),
    ("{second}: MEAL V2 beats the label control", "{second} meal", "{second} control", None),
    ("{second}: USI beats its recipe without KD", "{second} usi", "{second} usi_no_kd", None),
]


def labelled_teacher_dir() -> Path:
    """``$SEED_CACHE/labelled-teachers``, where ``make teachers-labelled`` trains."""
    return cache_dir() / "labelled-teachers"


@dataclass
class Job:
    """One run of ours: its folder (``RUNS/<key>``), the row it belongs to, what it needs first, and its command, made when it
    starts (the control's lr is known only after the sweep)."""

    key: str
    row: str
    recipe: Path
    exported: str
    command: Callable[[dict[str, dict[str, Any]]], list[str]]
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()  # keys of the jobs whose exported files this run reads (their sha256 gates its reuse)


def plan(students: list[str], seeds: list[int], lrs: list[float], teachers: dict[str, Path], quick: bool) -> list[Job]:
    """Every run of the benchmark, in an order that starts the long ones early."""
    extra = QUICK if quick else []
    jobs = []

    def job(key: str, row: str, recipe: str, command: str, exported: str, flags: Callable[[dict], list[str]], needs: tuple[str, ...] = (),
            arch_flag: str = "--student") -> Job:
        arch, seed = key.split("/")[0], int(key.split("/")[1].removeprefix("seed"))
        folder = RUNS / key

        def argv(done: dict[str, dict[str, Any]]) -> list[str]:
            return [command, "--config", relative_name(CONFIGS / recipe), arch_flag, arch, "--seed", str(seed), "--output", relative_name(folder),
                    "--resume", "never", "--num-workers", "1", *flags(done), *extra]
        return Job(key, row, CONFIGS / recipe, exported, argv, needs, needs)

    teacher_needs = tuple(f"teacher-{name}" for name in teachers)
    for number, arch in enumerate(students):
        rows = list(ROWS) if number == 0 else list(SECOND_ROWS)
        init = f"{arch}/seed{seeds[0]}/init"
        jobs.append(job(init, "init", "labelled_init.yaml", "seed-pretrain", "teacher.pt", lambda done: [], arch_flag="--arch"))
        for seed in seeds:
            for row in rows:
                recipe, command, exported, flags, from_init = ROWS[row]

                def row_flags(done: dict, flags: list[str] = flags, from_init: bool = from_init, init: str = init) -> list[str]:
                    given = [flag.format(a=relative_name(teachers["a"]), b=relative_name(teachers["b"])) for flag in flags]
                    return [*given, *(["--student-init", done[init]["file"]] if from_init else [])]
                jobs.append(job(f"{arch}/seed{seed}/{row}", row, recipe, command, exported, row_flags,
                                teacher_needs + ((init,) if from_init else ())))
        sweep = [f"{arch}/seed{seeds[0]}/control-lr{lr:g}" for lr in lrs]
        for lr, key in zip(lrs, sweep, strict=True):
            jobs.append(job(key, "control", "labelled_control.yaml", "seed-pretrain", "teacher.pt",
                            lambda done, lr=lr, init=init: ["--init", done[init]["file"], "--lr", f"{lr:g}"], (init,), arch_flag="--arch"))
        for seed in seeds[1:]:
            jobs.append(job(f"{arch}/seed{seed}/control", "control", "labelled_control.yaml", "seed-pretrain", "teacher.pt",
                            lambda done, init=init, sweep=sweep: ["--init", done[init]["file"], "--lr", best_lr(done, sweep)],
                            (init, *sweep), arch_flag="--arch"))
    return jobs


def best_lr(done: dict[str, dict[str, Any]], sweep: list[str]) -> str:
    """The lr of the sweep's best run (val top-1)."""
    best = max(sweep, key=lambda key: done[key]["top1"])
    return best.rsplit("control-lr", 1)[1]


@cache
def val_images() -> Any:
    """The whole val split under the eval transform, loaded once for every score."""
    from seed.classification import val_loader
    from seed.registry import method_config

    return val_loader(method_config("distill", {"num_workers": 0, "batch_size": 500}))


def score(path: Path) -> float:
    """Top-1 (%) of an exported classifier on the whole val split, read back from the file as anyone would."""
    from seed.checkpoints import load_classifier
    from seed.classification import top1

    backbone, classifier, _, _ = load_classifier(path)
    return top1({"model": torch.nn.Sequential(backbone, classifier)}, {}, val_images())["model"]


def teacher_scores(teachers: dict[str, Path]) -> dict[str, float]:
    """Top-1 of teacher A, B and their ensemble (mean softmax), as MEAL V2 reads them (BatchNorm folded)."""
    from seed.classification import top1
    from seed.classifiers import load_teacher
    from seed.registry import method_config

    config = method_config("distill", {})
    frozen = {f"teacher {name.upper()}": load_teacher(None, str(path), config)[0] for name, path in teachers.items()}
    return top1({}, frozen, val_images())


def complete(job: Job, done: dict[str, dict[str, Any]], threads: int) -> dict[str, Any]:
    """Run (or keep) one job and score what it exported."""
    folder = RUNS / job.key
    argv = job.command(done)
    inputs = ",".join(file_sha256(done[key]["file"]) for key in job.reads) or None
    kept = run_or_keep(argv, folder, job.exported, job.recipe, inputs, threads)
    file = folder / job.exported
    result = {"file": relative_name(file), "top1": score(file), "kept": kept, "argv": argv,
              "minutes": max(training_minutes(folder).values(), default=0.0)}
    print(f"{job.key}: top-1 {result['top1']:.2f}{' (kept)' if kept else ''}", flush=True)
    return result


def build_teacher(name: str, threads: int) -> dict[str, Any]:
    """``make teachers-labelled``'s run of one teacher, continued from its last.ckpt when interrupted; nothing when it exists.
    In float32: on a CPU with AMX bf16 units, two side by side ran 2.60 it/s each in float32 and 2.01 in bf16-mixed."""
    folder = labelled_teacher_dir() / name
    built = not (folder / "teacher.pt").is_file()
    if built:
        run(["seed-pretrain", "--config", relative_name(TEACHER_CONFIGS[name]), "--precision", "32-true", "--num-workers", "1",
             "--output", str(folder)], folder.with_suffix(".log"), threads)
    return {"file": str(folder / "teacher.pt"), "kept": None, "built": built, "minutes": max(training_minutes(folder).values(), default=0.0)}


def execute(jobs: list[Job], workers: int, threads: int, teachers: list[str]) -> dict[str, dict[str, Any]]:
    """Run the jobs ``workers`` at a time, each once what it needs is done; the teachers first."""
    done: dict[str, dict[str, Any]] = {}
    pending = [Job(f"teacher-{name}", "teacher", TEACHER_CONFIGS[name], "teacher.pt", lambda done: []) for name in teachers] + jobs
    with ThreadPoolExecutor(workers) as pool:
        running: dict[Future, Job] = {}
        while pending or running:
            ready = [job for job in pending if all(need in done for need in job.needs)]
            for job in ready[: workers - len(running)]:
                pending.remove(job)
                if job.row == "teacher":
                    running[pool.submit(build_teacher, job.key.removeprefix("teacher-"), threads)] = job
                else:
                    running[pool.submit(complete, job, done, threads)] = job
            if not running:
                raise RuntimeError(f"jobs that wait on nothing that runs: {[job.key for job in pending]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done[running.pop(future).key] = future.result()
    return done


def row_results(done: dict[str, dict[str, Any]], students: list[str], seeds: list[int], lrs: list[float]) -> dict[str, list[dict[str, Any]]]:
    """``"<arch> <row>"`` -> the seed runs of that row (the control of the first seed: its sweep's best run)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for arch in students:
        sweep = [f"{arch}/seed{seeds[0]}/control-lr{lr:g}" for lr in lrs]
        for key, result in done.items():
            if key.startswith(f"{arch}/") and "control-lr" not in key:
                rows.setdefault(f"{arch} {key.rsplit('/', 1)[1]}", []).append(result)
        rows.setdefault(f"{arch} control", []).insert(0, done[f"{arch}/seed{seeds[0]}/control-lr{best_lr(done, sweep)}"])
    order = ["init", "control", *ROWS]
    return dict(sorted(rows.items(), key=lambda item: (students.index(item[0].split(" ")[0]), order.index(item[0].split(" ", 1)[1]))))


def claims(rows: dict[str, list[dict[str, Any]]], main: str, second: str | None) -> list[dict[str, Any]]:
    """Each comparison as data: rows a and b, the difference of their mean top-1, the larger of their stds, the target and
    whether it holds (the difference reaches the target and, for a positive target, exceeds twice the std); a claim whose
    rows did not run is left out."""
    out = []
    for name, a, b, target in CLAIMS:
        a, b = a.format(main=main, second=second), b.format(main=main, second=second)
        if a not in rows or b not in rows:
            continue
        (mean_a, std_a), (mean_b, std_b) = (mean_std([r["top1"] for r in rows[key]]) for key in (a, b))
        difference, std = mean_a - mean_b, max(std_a, std_b)
        holds = None if target is None else bool(difference >= target and (target == 0 or difference > 2 * std))
        out.append({"name": name.format(second=second), "a": a, "b": b, "difference": round(difference, 2), "std": round(std, 2),
                    "target": target, "holds": holds})
    return out


def claim_sentence(claim: dict[str, Any], labels: dict[str, str]) -> str:
    """One sentence per comparison, from its data."""
    verdict = {True: "holds", False: "does not hold", None: "reported as measured"}[claim["holds"]]
    target = "" if claim["target"] is None else f" (target: at least {claim['target']:+.1f}" + (
        ", more than twice the std)" if claim["target"] else ")")
    return (f"{claim['name']}: {labels[claim['a']]} minus {labels[claim['b']]} = "
            f"{claim['difference']:+.2f} points (larger std {claim['std']:.2f}){target}: {verdict}.")


# ---- USI's cost figure: what the teachers add to a step ----

ALONE, ONE, TWO, CACHED = ("student step alone (target given)", "+ one teacher's forward", "+ two teachers' forward",
                           "+ the target read from the teacher-output cache")


def kd_overhead(batch_size: int, image_size: int, rounds: int, device: str = "cpu") -> dict[str, Any]:
    """Median time of one MEAL V2 step of an r18 student (forward, loss, backward, SGD step) with its target given (the
    student's step alone), with one r18 teacher's forward, with two, and with the target read from the teacher-output cache;
    teachers BatchNorm-folded under inference mode, student and teachers channels_last; interleaved rounds. The weights are
    random (they do not change the time), so the figure needs no teacher file and runs on any machine."""
    from seed.backbones import create_backbone
    from seed.config import resolve
    from seed.meal import MEAL
    from seed.registry import method_config
    from seed.teacher import FrozenTeacher
    from seed.teacher_cache import TeacherCache

    torch.manual_seed(0)
    config = resolve(method_config("distill", {"mode": "meal", "student": "r18", "image_size": image_size, "batch_size": batch_size,
                                                 "small_images": False, "knn_every": 0, "channels_last": True, "discriminator": "off"}), MEAL.DEFAULTS)

    def teacher() -> FrozenTeacher:
        backbone = create_backbone("r18", small_images=False)
        return FrozenTeacher(backbone, torch.nn.Linear(backbone.feature_dim, 10), channels_last=True, normalize=False).to(device)

    teachers = [teacher(), teacher()]
    student = MEAL(config, teachers, num_classes=10).to(device, memory_format=torch.channels_last).train()
    one = torch.nn.ModuleList(teachers[:1])
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    index, view = torch.arange(batch_size, device=device), torch.zeros(batch_size, dtype=torch.long, device=device)
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    given = student.teacher_outputs(images)[0]

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as folder:
        cache = TeacherCache(Path(folder), {"bench": "kd_overhead"}, batch_size, 1, 10, top_k=10)
        cache.prepare()
        cache.open()
        cache.write(index, view, given)
        targets: dict[str, Callable[[], torch.Tensor]] = {
            ALONE: lambda: given,
            ONE: lambda: torch.stack([t(images) for t in one]).softmax(2).mean(0),
            TWO: lambda: student.teacher_outputs(images)[0],
            CACHED: lambda: cache.lookup(index, view, lambda miss: given[miss])[0],
        }

        def step(target: Callable[[], torch.Tensor]) -> float:
            sync()
            start = time.perf_counter()
            loss = student.losses(student(images), target(), None)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            return time.perf_counter() - start

        for target in targets.values():  # warm-up
            step(target)
        timings: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, target in targets.items():
                timings[name].append(step(target))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {"batch_size": batch_size, "image_size": image_size, "rounds": rounds, "device": device, "seconds": medians,
            "ratios": {name: value / medians[ALONE] for name, value in medians.items()}}


def overhead_table(overhead: dict[str, Any]) -> dict[str, Any]:
    return {"caption": f"KD overhead (one MEAL V2 step of an r18 student, {overhead['image_size']}px, batch {overhead['batch_size']}, "
                       f"{overhead['device']}, median of {overhead['rounds']} interleaved rounds; r18 teachers, BatchNorm folded, "
                       "inference mode, channels_last):",
            "columns": ["step", "ms", "ratio to the student's step"],
            "rows": [[name, f"{overhead['seconds'][name] * 1000:.1f}", f"{ratio:.2f}x"] for name, ratio in overhead["ratios"].items()]}


def overhead_note(ratios: dict[str, float]) -> str:
    return (f"KD overhead (USI reports 10-20 % for its teacher): one teacher's forward adds {100 * (ratios[ONE] - 1):.0f} % to the "
            f"student's step, two add {100 * (ratios[TWO] - 1):.0f} %, reading the cache {100 * (ratios[CACHED] - 1):.0f} %.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--students", default="r18,mbv3s", help="student architectures: the first gets every row, the others "
                                                              "init, control, MEAL V2 and USI with and without KD")
    parser.add_argument("--control-lrs", default="0.02,0.05,0.1", help="the label control's lr sweep (first seed; the best is used)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds of the KD overhead figure")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps per run (not a result)")
    parser.add_argument("--teachers-only", action="store_true", help="only build the two teachers (make teachers-labelled)")
    parser.add_argument("--overhead-only", action="store_true", help="only the KD overhead figure (make bench-gpu: with --device cuda)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=32, help="--overhead-only: the figure's input size")
    parser.add_argument("--batch-size", type=int, default=128, help="--overhead-only: the figure's batch")
    args = parser.parse_args()
    if args.overhead_only:
        overhead = kd_overhead(args.batch_size, args.image_size, args.rounds, args.device)
        name = "labelled_gpu" if args.device.startswith("cuda") else "labelled_overhead"
        write_result(name, {"title": "KD overhead of labelled distillation" + (" (GPU)" if name == "labelled_gpu" else ""), "order": 56,
                            "command": " ".join(["python -m bench.labelled", *sys.argv[1:]]),
                            "description": "USI's cost figure: what the teachers' forward adds to a distillation step.",
                            "tables": [overhead_table(overhead)], "notes": [overhead_note(overhead["ratios"])], "data": {"kd_overhead": overhead}},
                     args.device.split(":")[0], configs=[])
        return
    seeds, students = [int(s) for s in args.seeds.split(",")], [s for s in args.students.split(",") if s]
    lrs = [float(lr) for lr in args.control_lrs.split(",")]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    teachers = {name: labelled_teacher_dir() / name / "teacher.pt" for name in TEACHER_CONFIGS}
    done = execute([] if args.teachers_only else plan(students, seeds, lrs, teachers, args.quick), args.jobs, args.threads, list(teachers))
    if args.teachers_only:
        scores = teacher_scores(teachers)
        print("\n".join(f"teacher {name.upper()}: {teachers[name]}, val top-1 {scores[f'teacher {name.upper()}']:.2f}" for name in teachers))
        return
    runs_minutes = (time.perf_counter() - started) / 60
    torch.set_num_threads(args.threads)  # the figure on one core, as the runs (the ratios hold per core)
    overhead = kd_overhead(128, 32, args.rounds)
    write_result("labelled", to_result(done, students, seeds, lrs, teachers, overhead, args, runs_minutes, time.perf_counter() - started),
                 configs=[*TEACHER_CONFIGS.values(), *sorted(CONFIGS.glob("labelled_*.yaml"))])


def teacher_runs(done: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The teachers' entries of ``done``, by name (``a``, ``b``)."""
    return {key.removeprefix("teacher-"): result for key, result in done.items() if key.startswith("teacher-")}


def teacher_time(done: dict[str, dict[str, Any]]) -> str:
    """How long the teachers trained (from their logs), and whether this run built them or found them in the cache."""
    teachers = teacher_runs(done)
    minutes = ", ".join(f"{name.upper()} {result['minutes']:.0f} min" for name, result in teachers.items())
    where = "built in this run" if all(result["built"] for result in teachers.values()) else f"kept in the cache (`{MAKE_TEACHERS}`)"
    return f"the teachers, {where}, trained side by side ({minutes})"


def to_result(done: dict[str, dict[str, Any]], students: list[str], seeds: list[int], lrs: list[float], teachers: dict[str, Path],
              overhead: dict[str, Any], args: argparse.Namespace, runs_minutes: float, seconds: float) -> dict[str, Any]:
    """The result file: the table, the claims as data and as sentences, the overhead table."""
    scores = teacher_scores(teachers)
    steps = {name: yaml.safe_load((CONFIGS / f"labelled_{name}.yaml").read_text())["max_steps"] for name in ("init", "control", "meal", "usi")}
    rows = row_results(done, students, seeds, lrs)
    labels = {key: LABELS[key.split(" ", 1)[1]].format(arch=key.split(" ", 1)[0], steps=steps["init"]) for key in rows}
    best = {arch: best_lr(done, [f"{arch}/seed{seeds[0]}/control-lr{lr:g}" for lr in lrs]) for arch in students}
    table = [[f"teacher {name} (r18 supervised, `configs/teacher/labelled_{name.lower()}.yaml`)", "1", f"{scores[f'teacher {name.upper()}']:.2f}",
              "", f"`{MAKE_TEACHERS}`"] for name in ("A", "B")]
    table.append(["ensemble of A and B (mean softmax)", "1", f"{scores['ensemble (mean softmax)']:.2f}", "", ""])
    for key, results in rows.items():
        arch, row = key.split(" ", 1)
        top1s = [r["top1"] for r in results]
        mean, std = mean_std(top1s)
        recipe = {"init": "init", "control": "control"}.get(row, "meal" if row.startswith("meal") else "usi")
        budget = f"{steps[recipe]} steps" + (f", lr {best[arch]} (best of {', '.join(f'{lr:g}' for lr in lrs)})" if row == "control" else "")
        where = row if row != "control" else f"control (seed {seeds[0]}: control-lr{best[arch]})"
        folder = RUNS.relative_to(ROOT) / arch / f"seed{{{','.join(map(str, seeds))}}}" / where
        table.append([labels[key], str(len(top1s)), f"{mean:.2f} ± {std:.2f}" if len(top1s) > 1 else f"{mean:.2f}", budget, f"`{folder}`"])
    found = claims(rows, students[0], students[1] if len(students) > 1 else None)
    reused = [reused_entry(key, result["kept"], RUNS / key) for key, result in done.items() if result.get("kept")]
    notes = [claim_sentence(claim, labels) for claim in found] + [overhead_note(overhead["ratios"])]
    return {
        "title": "Labelled distillation: MEAL V2 and USI against the same student trained on labels",
        "order": 55,
        "command": " ".join(["python -m bench.labelled", *sys.argv[1:]]),
        "description": (f"Fashion-MNIST 32px (ResNet stride-4 stem), batch 128, top-1 on the whole val split (10,000 images) of each "
                        f"exported file, mean ± std over seeds {', '.join(map(str, seeds))} (n). Every student row of an architecture "
                        "has the same steps; the rows from the init start from one file (the first seed's init) whatever their seed. Recipes: "
                        "`configs/bench/labelled_{init,control,meal,usi}.yaml`; the run folders are under `runs/bench/labelled/`. "
                        f"{args.jobs} runs at a time, {args.threads} torch thread each; the runs took {runs_minutes:.0f} min, "
                        f"the whole benchmark {seconds / 60:.0f} min; {teacher_time(done)}."
                        + (" **Smoke run (--quick): not a result.**" if args.quick else "")),
        "tables": [{"caption": "", "columns": ["network", "n", "top-1 %", "budget", "run folder"], "rows": table},
                   overhead_table(overhead)],
        "notes": notes,
        "reused": reused,
        "data": {"claims": found, "rows": {key: [{"file": r["file"], "top1": r["top1"], "command": " ".join(r["argv"])} for r in results]
                                           for key, results in rows.items()},
                 "teachers": scores, "control_lr": best, "kd_overhead": overhead, "minutes": runs_minutes,
                 "teacher_minutes": {name: result["minutes"] for name, result in teacher_runs(done).items()}},
    }


if __name__ == "__main__":
    main()
