"""MEAL V2 on the offline default data (Fashion-MNIST, 32px): teachers, student before and after,
KD overhead, and what the teacher-target cache saves and costs.

What it runs, in order (the demo's configs, each into runs/bench/meal/):

    seed-pretrain --config configs/demo/meal_teacher_a.yaml       # teacher 1, supervised r18, 450 steps
    seed-pretrain --config configs/demo/meal_teacher_b.yaml       # teacher 2, the same with another seed
    seed-pretrain --config configs/demo/meal_student_init.yaml    # the student's own supervised start, r18
    seed-distill  --config configs/demo/meal.yaml                 # MEAL V2: top-1 table of all of them

then, in this process, the student init trained as many steps on the labels (the control: more
training without teachers), one training step timed with and without the teachers (round-robin), and
two short multi-epoch MEAL runs on a Fashion-MNIST subset written as an ImageFolder, with and
without --cache-teacher-logits. Results: bench/results/meal_bench.json and markdown tables.

    python bench/meal_bench.py                 # about 12 minutes on a shared 2-core CPU
    python bench/meal_bench.py --reuse         # keep finished runs, redo the rest
"""

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seed.config import read_yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUNS = Path("runs/bench/meal")
STAGES = {  # name -> (command, config, file it writes)
    "teacher-a": ("seed-pretrain", "configs/demo/meal_teacher_a.yaml", "teacher.pt"),
    "teacher-b": ("seed-pretrain", "configs/demo/meal_teacher_b.yaml", "teacher.pt"),
    "student-init": ("seed-pretrain", "configs/demo/meal_student_init.yaml", "teacher.pt"),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def run(command: list[str], threads: int) -> float:
    """Run one of our commands, its output streamed to runs/bench/meal/<name>.log; returns the wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    log = RUNS / f"{Path(command[command.index('--output') + 1]).name}.log"
    with open(log, "w") as handle:
        result = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({result.returncode}); see {log}")
    return time.perf_counter() - start


def step_rates(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, images/s) of every logged training step."""
    with open(run_dir / "logs" / "metrics.csv") as handle:
        return [(int(row["epoch"]), float(row["img_s"])) for row in csv.DictReader(handle) if row.get("img_s")]


def write_subset(folder: Path, train_images: int, val_images: int, seed: int = 0) -> None:
    """A seeded subset of Fashion-MNIST as an ImageFolder (class folders 0-9 keep the label order)."""
    from seed.data import load_dataset

    for split, size in (("train", train_images), ("val", val_images)):
        dataset = load_dataset("fashion-mnist", split)
        order = np.random.default_rng(seed).permutation(len(dataset))[:size]
        for index in order:
            path = folder / split / str(dataset.targets[index]) / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(dataset.images[index]).save(path)


def kd_overhead(teacher_files: list[str], init_file: str, batch_size: int, rounds: int) -> dict[str, float]:
    """Median time of one MEAL step with the teachers' forward and without it (the target given)."""
    from seed.checkpoints import load_classifier
    from seed.config import DistillConfig, make_config, resolve
    from seed.data import load_dataset
    from seed.meal import MEAL, load_teacher, train_transform

    config = resolve(make_config(DistillConfig, {"mode": "meal", "student": "r18", "image_size": 32, "small_images": False,
                                                 "batch_size": batch_size, "knn_every": 0}), MEAL.DEFAULTS)
    teachers = [load_teacher(None, path, config)[0] for path in teacher_files]
    module = MEAL(config, teachers, num_classes=10).train()
    backbone, classifier, _, _ = load_classifier(init_file)
    module.backbone.load_state_dict(backbone.state_dict())
    module.head.load_state_dict(classifier.state_dict())
    dataset = load_dataset("fashion-mnist", "train", transform=train_transform(32))
    images = torch.stack([dataset[i][0] for i in range(batch_size)])
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    given = module.teacher_outputs(images)

    def step(with_teachers: bool) -> tuple[float, float]:
        start = time.perf_counter()
        target, teacher = module.teacher_outputs(images) if with_teachers else given
        teachers_done = time.perf_counter()
        loss = module.losses(module(images), target, teacher)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return teachers_done - start, time.perf_counter() - start

    for mode in (True, False):  # warm-up
        step(mode)
    timings: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(rounds):
        for mode in (True, False):
            timings[mode].append(step(mode))
    with_teachers = statistics.median(t for _, t in timings[True])
    without = statistics.median(t for _, t in timings[False])
    teachers_s = statistics.median(t for t, _ in timings[True])
    return {"batch_size": batch_size, "rounds": rounds, "step_with_teachers_s": with_teachers, "step_without_teachers_s": without,
            "teachers_forward_s": teachers_s, "overhead": with_teachers / without - 1, "teacher_share": teachers_s / with_teachers}


def supervised_control(init_file: str, steps: int, lr: float, batch_size: int) -> float:
    """The student init trained ``steps`` more steps on the labels (cross-entropy, MEAL's optimiser and schedule): val top-1.

    Tells the gain of distillation apart from the gain of more training.
    """
    from lightly.utils.scheduler import CosineWarmupScheduler

    from seed.checkpoints import load_classifier
    from seed.config import DistillConfig, make_config
    from seed.data import load_dataset
    from seed.engine import make_loader
    from seed.meal import top1, train_transform, val_loader

    torch.manual_seed(0)
    backbone, classifier, _, _ = load_classifier(init_file)
    model = torch.nn.Sequential(backbone, classifier).train()
    config = make_config(DistillConfig, {"batch_size": batch_size, "num_workers": 2})
    loader = make_loader(load_dataset("fashion-mnist", "train", transform=train_transform(32)), config, shuffle=True, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    schedule = CosineWarmupScheduler(optimizer, warmup_epochs=0, max_epochs=steps, end_value=0.0)
    for step, (images, labels) in enumerate(loader):
        if step == steps:
            break
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return top1({"control": model}, {}, val_loader(make_config(DistillConfig, {"num_workers": 2})))["control"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: fastest on a shared machine)")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    parser.add_argument("--subset-train", type=int, default=768, help="train images of the cache experiment")
    parser.add_argument("--subset-val", type=int, default=2000)
    parser.add_argument("--subset-epochs", type=int, default=6)
    parser.add_argument("--cache-crops", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per variant of the KD overhead")
    parser.add_argument("--output", default="bench/results/meal_bench.json")
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(args.threads)
    RUNS.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    wall: dict[str, float] = {}
    commands: list[str] = []

    def stage(name: str, command: list[str], done: Path) -> None:
        commands.append(" ".join(command))
        if args.reuse and done.is_file():
            print(f"reusing {done}")
            return
        wall[name] = run(command, args.threads)

    for name, (command, config, done) in STAGES.items():
        stage(name, [command, "--config", config, "--output", str(RUNS / name), "--resume", "never"], RUNS / name / done)
    teacher_files = [str(RUNS / name / "teacher.pt") for name in ("teacher-a", "teacher-b")]
    init_file = str(RUNS / "student-init" / "teacher.pt")
    meal = ["--teacher-checkpoints", ",".join(teacher_files), "--student-init", init_file, "--resume", "never"]
    stage("meal", ["seed-distill", "--config", "configs/demo/meal.yaml", *meal, "--output", str(RUNS / "student")], RUNS / "student" / "top1.json")
    scores = json.loads((RUNS / "student" / "top1.json").read_text())

    meal_config = read_yaml("configs/demo/meal.yaml")
    print("control: the student init trained as long on the labels", flush=True)
    start = time.perf_counter()
    control = supervised_control(init_file, meal_config["max_steps"], meal_config["base_lr"] * meal_config["batch_size"] / 256,
                                 meal_config["batch_size"])
    wall["control"] = time.perf_counter() - start
    print("timing one step with and without the teachers", flush=True)
    overhead = kd_overhead(teacher_files, init_file, batch_size=64, rounds=args.rounds)

    subset = RUNS / "fashion-subset"
    if not (args.reuse and (subset / "val").is_dir()):
        write_subset(subset, args.subset_train, args.subset_val)
    cache = {}
    common = ["--mode", "meal", "--data", str(subset), "--image-size", "32", "--batch-size", "64", "--epochs", str(args.subset_epochs),
              "--base-lr", "0.05", "--weight-decay", "0", "--lr-schedule", "cosine", "--knn-every", "0", *meal]
    for name, extra in (("subset-teachers", []), ("subset-cached", ["--cache-teacher-logits", "--cache-crops", str(args.cache_crops)])):
        stage(name, ["seed-distill", *common, *extra, "--output", str(RUNS / name)], RUNS / name / "top1.json")
        rates = step_rates(RUNS / name)
        late = [rate for epoch, rate in rates if epoch >= args.cache_crops]
        cache[name] = {"top1": json.loads((RUNS / name / "top1.json").read_text())["scores"],
                       "img_s_first_epochs": statistics.median(rate for epoch, rate in rates if epoch < args.cache_crops),
                       "img_s_later_epochs": statistics.median(late), "train_s": sum(64 / rate for _, rate in rates)}
    cache["speedup_later_epochs"] = cache["subset-cached"]["img_s_later_epochs"] / cache["subset-teachers"]["img_s_later_epochs"]
    cache["speedup_whole_run"] = cache["subset-teachers"]["train_s"] / cache["subset-cached"]["train_s"]

    result = {"machine": machine(), "threads": args.threads, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "bench_wall_s": time.perf_counter() - started, "stage_wall_s": wall, "commands": commands, "top1": scores,
              "control_top1": control,
              "kd_overhead": overhead, "cache": cache, "args": vars(args)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))

    print(f"\n{result['machine']}, {args.threads} thread(s), load average {load_before[0]:.1f} -> {result['load_average_after'][0]:.1f}, "
          f"{result['bench_wall_s'] / 60:.1f} min")
    print(f"\n| model (Fashion-MNIST val, {scores['val_images']} images) | top-1 % |\n|---|---|")
    for name, value in scores["scores"].items():
        print(f"| {name} | {value:.2f} |")
    print(f"| control: student init + {meal_config['max_steps']} supervised steps, same schedule | {control:.2f} |")
    print(f"\n| step (batch {overhead['batch_size']}) | s |\n|---|---|")
    print(f"| student + discriminator, target given | {overhead['step_without_teachers_s']:.3f} |")
    print(f"| with both teachers' forward | {overhead['step_with_teachers_s']:.3f} |")
    print(f"| KD overhead | {100 * overhead['overhead']:.0f}% (teachers {100 * overhead['teacher_share']:.0f}% of the step) |")
    print(f"\n| subset run ({args.subset_train} images, {args.subset_epochs} epochs) | img/s epochs < {args.cache_crops} | img/s later | train s | "
          "student top-1 % |\n|---|---|---|---|---|")
    for name in ("subset-teachers", "subset-cached"):
        row = cache[name]
        student = next(value for key, value in row["top1"].items() if key.endswith("MEAL V2"))
        print(f"| {name} | {row['img_s_first_epochs']:.0f} | {row['img_s_later_epochs']:.0f} | {row['train_s']:.0f} | {student:.2f} |")
    print(f"cache speed-up: {cache['speedup_later_epochs']:.2f}x on cached epochs, {cache['speedup_whole_run']:.2f}x on the whole run")


if __name__ == "__main__":
    main()
