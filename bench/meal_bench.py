"""MEAL V2 on the offline default data (Fashion-MNIST, 32px): teachers, student before and after,
KD overhead, and what the teacher-target cache saves and costs.

What it runs, in order (the demo's configs, each into runs/bench/meal/):

    seed-pretrain --config configs/demo/meal_teacher_a.yaml       # teacher 1, supervised r18, 450 steps
    seed-pretrain --config configs/demo/meal_teacher_b.yaml       # teacher 2, the same with another seed
    seed-pretrain --config configs/demo/meal_student_init.yaml    # the student's own supervised start, r18
    seed-distill  --config configs/demo/meal.yaml                 # MEAL V2: top-1 table of all of them
    seed-distill  --config configs/demo/meal.yaml --discriminator off|minimax   # the two other discriminator modes

then, in this process, the student init trained as many steps on the labels (the control: more
training without teachers), one training step timed with and without the teachers (round-robin), and
short multi-epoch MEAL runs on a Fashion-MNIST subset written as an ImageFolder, with and without
--teacher-cache (top --cache-top-k of the 10 classes kept), once per --seeds seed. Writes
bench/results/meal.json in the common format (bench/common.py).

It takes 12+ minutes on a shared 2-core CPU, so ``make bench`` leaves it out: ``python -m bench --only meal``.

    python -m bench.meal_bench                 # the whole benchmark
    python -m bench.meal_bench --reuse         # keep finished runs, redo the rest

With --reuse a run is kept only when the ``<run>.provenance.json`` it wrote beside its folder on
finishing holds the same command, the current source hash (the packages and configs/demo) and,
for the MEAL runs, the same teacher and init files;
the result names each kept run, with its own date and commit, under ``reused``.
"""

import argparse
import csv
import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import ROOT, finished_marker, machine, reusable, reused_entry, source_hash, utc_now, write_result
from bench.common import run as run_command
from seed.config import read_yaml
from seed.registry import method_config

RUNS = Path("runs/bench/meal")
CONFIGS = Path("configs/demo")  # the recipes every stage reads
STAGES = {  # name -> (command, config, file it writes)
    "teacher-a": ("seed-pretrain", "configs/demo/meal_teacher_a.yaml", "teacher.pt"),
    "teacher-b": ("seed-pretrain", "configs/demo/meal_teacher_b.yaml", "teacher.pt"),
    "student-init": ("seed-pretrain", "configs/demo/meal_student_init.yaml", "teacher.pt"),
}


def run(command: list[str], threads: int) -> float:
    """Run one of our commands, its output in runs/bench/meal/<name>.log (:func:`bench.common.run`); returns the wall time."""
    return run_command(command, RUNS / f"{Path(command[command.index('--output') + 1]).name}.log", threads)


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
    from seed.classification import train_transform
    from seed.classifiers import load_teacher
    from seed.config import resolve
    from seed.data import load_dataset
    from seed.meal import MEAL

    config = resolve(method_config("distill", {"mode": "meal", "student": "r18", "image_size": 32, "small_images": False,
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
    from seed.classification import top1, train_transform, val_loader
    from seed.data import load_dataset
    from seed.loaders import make_loader

    torch.manual_seed(0)
    backbone, classifier, _, _ = load_classifier(init_file)
    model = torch.nn.Sequential(backbone, classifier).train()
    config = method_config("distill", {"batch_size": batch_size, "num_workers": 2})
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
    return top1({"control": model}, {}, val_loader(method_config("distill", {"num_workers": 2})))["control"]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage; the raw numbers (the result's ``data``)."""
    torch.set_num_threads(args.threads)
    RUNS.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    wall: dict[str, float] = {}
    commands: list[str] = []
    reused: list[dict[str, Any]] = []
    source = source_hash([ROOT / CONFIGS])

    def stage(name: str, command: list[str], done: Path, **inputs: Any) -> None:
        """Run ``command`` unless --reuse and it finished before on the same sources (``inputs``: what else its marker must match)."""
        commands.append(" ".join(command))
        folder = Path(command[command.index("--output") + 1])
        marker = provenance_file(folder)
        kept = reusable(marker, source, command=" ".join(command), **inputs) if args.reuse and done.is_file() else None
        if kept is not None:
            print(f"reusing {folder}: finished {kept['date']} at commit {kept['commit']} on the same sources")
            reused.append(reused_entry(name, kept, folder))
            return
        if args.reuse and done.is_file():
            print(f"not reusing {folder}: its command or the sources changed since (or it kept no provenance)")
        marker.unlink(missing_ok=True)
        wall[name] = run(command, args.threads)
        marker.write_text(json.dumps(finished_marker(source, command=" ".join(command), **inputs), indent=2) + "\n")

    for name, (command, config, done) in STAGES.items():
        stage(name, [command, "--config", config, "--output", str(RUNS / name), "--resume", "never"], RUNS / name / done)
    teacher_files = [str(RUNS / name / "teacher.pt") for name in ("teacher-a", "teacher-b")]
    init_file = str(RUNS / "student-init" / "teacher.pt")
    networks = {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in [*teacher_files, init_file]}  # a rerun teacher: rerun what follows
    meal = ["--teacher-checkpoints", ",".join(teacher_files), "--student-init", init_file, "--resume", "never"]
    stage("meal", ["seed-distill", "--config", "configs/demo/meal.yaml", *meal, "--output", str(RUNS / "student")], RUNS / "student" / "top1.json",
          networks=networks)
    scores = json.loads((RUNS / "student" / "top1.json").read_text())
    variants = {}
    for mode in ("off", "minimax"):
        folder = RUNS / f"student-discriminator-{mode}"
        stage(f"meal-{mode}", ["seed-distill", "--config", "configs/demo/meal.yaml", *meal, "--discriminator", mode, "--output", str(folder)],
              folder / "top1.json", networks=networks)
        variants[mode] = meal_score(json.loads((folder / "top1.json").read_text())["scores"])

    meal_config = read_yaml("configs/demo/meal.yaml")
    print("control: the student init trained as long on the labels", flush=True)
    start = time.perf_counter()
    control = supervised_control(init_file, meal_config["max_steps"], meal_config["base_lr"] * meal_config["batch_size"] / 256,
                                 meal_config["batch_size"])
    wall["control"] = time.perf_counter() - start
    print("timing one step with and without the teachers", flush=True)
    overhead = kd_overhead(teacher_files, init_file, batch_size=64, rounds=args.rounds)

    subset = RUNS / "fashion-subset"
    sizes = [args.subset_train, args.subset_val]
    if not (args.reuse and (subset / "val").is_dir() and reusable(provenance_file(subset), source, images=sizes)):
        provenance_file(subset).unlink(missing_ok=True)
        write_subset(subset, args.subset_train, args.subset_val)
        provenance_file(subset).write_text(json.dumps(finished_marker(source, images=sizes), indent=2) + "\n")
    cache: dict[str, Any] = {"subset-teachers": [], "subset-cached": []}
    common = ["--mode", "meal", "--data", str(subset), "--image-size", "32", "--batch-size", "64", "--epochs", str(args.subset_epochs),
              "--base-lr", "0.05", "--weight-decay", "0", "--lr-schedule", "cosine", "--knn-every", "0", *meal]
    cached = ["--teacher-cache", "--cache-views", str(args.cache_crops), "--cache-top-k", str(args.cache_top_k)]
    for seed in seeds(args):
        for name, extra in (("subset-teachers", []), ("subset-cached", cached)):
            folder = RUNS / f"{name}-seed{seed}"
            stage(folder.name, ["seed-distill", *common, *extra, "--seed", str(seed), "--output", str(folder)], folder / "top1.json", images=sizes,
                  networks=networks)
            rates = step_rates(folder)
            late = [rate for epoch, rate in rates if epoch >= args.cache_crops]
            cache[name].append({"seed": seed, "top1": json.loads((folder / "top1.json").read_text())["scores"],
                                "img_s_first_epochs": statistics.median(rate for epoch, rate in rates if epoch < args.cache_crops),
                                "img_s_later_epochs": statistics.median(late), "train_s": sum(64 / rate for _, rate in rates)})
    pairs = list(zip(cache["subset-teachers"], cache["subset-cached"], strict=True))
    cache["speedup_later_epochs"] = statistics.mean(c["img_s_later_epochs"] / t["img_s_later_epochs"] for t, c in pairs)
    cache["speedup_whole_run"] = statistics.mean(t["train_s"] / c["train_s"] for t, c in pairs)
    return {"measured": utc_now()[:10], "reused": reused, "threads": args.threads, "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "bench_wall_s": time.perf_counter() - started, "stage_wall_s": wall, "commands": commands,
            "top1": scores, "discriminator_variants": variants, "control_top1": control, "control_steps": meal_config["max_steps"],
            "kd_overhead": overhead, "cache": cache, "args": vars(args)}


def provenance_file(folder: Path) -> Path:
    """Beside a run's folder, what the run wrote when it finished (bench.common.finished_marker)."""
    return folder.parent / f"{folder.name}.provenance.json"


def meal_score(scores: dict[str, float]) -> float:
    """The distilled student's top-1 in a ``top1.json`` table."""
    return next(value for key, value in scores.items() if key.endswith("MEAL V2"))


def seeds(args: argparse.Namespace) -> list[int]:
    """``--seeds 0,1,2`` as a list."""
    return [int(seed) for seed in str(args.seeds).split(",") if seed.strip()]


def signed_mean_std(values: list[float]) -> str:
    """``+mean ± std`` with two decimals (the mean alone for one value)."""
    return f"{statistics.mean(values):+.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def mean_std(values: list[float], digits: int) -> str:
    """``mean ± std`` over seeds (the mean alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def reused_text(reused: list[dict[str, Any]]) -> str:
    """", except ..." naming the runs kept from earlier invocations, with their own dates ("" when none was)."""
    if not reused:
        return ""
    return ", except the runs kept from earlier invocations on the same sources: " + ", ".join(f"{r['row']} ({r['date'][:10]})" for r in reused)


def to_result(raw: dict[str, Any]) -> dict[str, Any]:
    """The common result format (tables, plot, notes computed from the numbers) of one run's raw numbers."""
    args, scores, overhead, cache = raw["args"], raw["top1"]["scores"], raw["kd_overhead"], raw["cache"]
    student = next(key for key in scores if key.endswith("MEAL V2"))
    init = next(key for key in scores if key.endswith(" init"))
    arch = student.split()[1]
    teachers = [key for key in scores if key.startswith("teacher")]
    ensemble = scores.get("ensemble (mean softmax)")
    gain = scores[student] - scores[init]
    variants = raw["discriminator_variants"]
    rows = [[f"student {arch}, its supervised init", f"{scores[init]:.2f}"],
            [f"**student {arch} after MEAL V2** (joint discriminator, the code's default)", f"**{scores[student]:.2f}**"],
            *[[key, f"{scores[key]:.2f}"] for key in teachers],
            *([["ensemble (mean softmax)", f"{ensemble:.2f}"]] if ensemble is not None else []),
            [f"control: student init + {raw['control_steps']} supervised steps, same schedule", f"{raw['control_top1']:.2f}"],
            *[[f"MEAL V2, `--discriminator {mode}`" + (" (gradient reversal)" if mode == "minimax" else ""), f"{value:.2f}"]
              for mode, value in variants.items()]]
    top1 = {"caption": f"Top-1 on the Fashion-MNIST val split ({raw['top1']['val_images']:,} images):", "columns": ["model", "top-1 %"], "rows": rows}
    kd = {"caption": f"KD overhead (one MEAL step, batch {overhead['batch_size']}, median of {overhead['rounds']} interleaved rounds):",
          "columns": ["step", "s"],
          "rows": [["student forward/backward + discriminator, target given", f"{overhead['step_without_teachers_s']:.3f}"],
                   ["the same with both teachers' forward (inference mode, BN folded)", f"{overhead['step_with_teachers_s']:.3f}"],
                   ["KD overhead", f"+{100 * overhead['overhead']:.0f}% (the teachers are {100 * overhead['teacher_share']:.0f}% of the step)"]]}
    crops = args["cache_crops"]
    runs = {name: cache[name] for name in ("subset-teachers", "subset-cached")}
    top_k = args["cache_top_k"]
    cache_rows = [[label, mean_std([r["img_s_first_epochs"] for r in runs[name]], 0), mean_std([r["img_s_later_epochs"] for r in runs[name]], 0),
                   mean_std([r["train_s"] for r in runs[name]], 1), mean_std([meal_score(r["top1"]) for r in runs[name]], 2)]
                  for name, label in (("subset-teachers", "teachers every step"), ("subset-cached", f"cached, top-{top_k} of 10 classes"))]
    subset_init = next(value for key, value in runs["subset-teachers"][0]["top1"].items() if key.endswith(" init"))
    seed_text = f"mean ± std over seeds {', '.join(str(r.get('seed', 0)) for r in runs['subset-teachers'])}" if len(runs["subset-teachers"]) > 1 \
        else "one seed"
    cache_table = {"caption": f"Teacher-target cache (`--teacher-cache --cache-top-k {top_k}`, {crops} fixed crops per image, so epochs "
                              f"0-{crops - 1} run the teachers and epochs {crops}-{args['subset_epochs'] - 1} read the cache; {args['subset_train']} "
                              f"train images, {args['subset_epochs']} epochs, the same init and teachers, {seed_text}; the subset is written as an "
                              "ImageFolder):",
                   "columns": ["run", f"img/s, epochs 0-{crops - 1}", f"img/s, epochs {crops}-{args['subset_epochs'] - 1}", "training s",
                               f"student top-1 % ({args['subset_val']:,} val images; init {subset_init:.2f})"],
                   "rows": cache_rows}

    control = raw["control_top1"]
    best_teacher = max(scores[key] for key in teachers)
    notes = [f"The student gains {gain:.1f} points over its init without reading a label"
             + (f", and stays below the ensemble it learns from ({ensemble:.2f})." if ensemble is not None and scores[student] < ensemble else ".")]
    if control >= scores[student]:
        notes.append(f"It does not beat the control ({control:.2f}): on this budget the init is far from converged and the teachers are only "
                     f"{(ensemble or best_teacher) - control:.0f} points above what the student reaches from labels in the same "
                     f"{raw['control_steps']} steps, so correct labels are worth more than {best_teacher:.0f}%-accurate soft targets. "
                     "MEAL V2's setting is a student trained to convergence and teachers well above it (ImageNet: 76.15 → 80.67); this CPU "
                     "bench checks the mechanics, not the paper's numbers, which need ImageNet and GPUs.")
    else:
        notes.append(f"It beats the control ({control:.2f}), the same init trained as long on the labels, by {scores[student] - control:.1f} points.")
    if variants:
        values = [scores[student], *variants.values()]
        spread = max(values) - min(values)
        notes.append(("The discriminator changes nothing measurable here" if spread < 0.5 else f"The discriminator modes differ by {spread:.2f} points")
                     + f" ({' / '.join(f'{v:.2f}' for v in values)} for joint / " + " / ".join(variants)
                     + "), whether it is trained jointly (the code) or adversarially" + (", within run-to-run noise." if spread < 0.5 else "."))
    ceiling = overhead["step_with_teachers_s"] / overhead["step_without_teachers_s"]
    changes = [meal_score(c["top1"]) - meal_score(t["top1"]) for t, c in zip(runs["subset-teachers"], runs["subset-cached"], strict=True)]
    change = statistics.mean(changes)
    notes.append(f"The cache makes the cached epochs {cache['speedup_later_epochs']:.2f}x faster (the ceiling is the step without teachers: "
                 f"{overhead['step_with_teachers_s']:.3f} / {overhead['step_without_teachers_s']:.3f} = {ceiling:.2f}x) and this short run "
                 f"{cache['speedup_whole_run']:.2f}x; the longer the run, the closer to {cache['speedup_later_epochs']:.2f}x (FKD reports 2-4x "
                 "with ImageNet-size teachers, where the teachers' share of the step is larger).")
    kept = "10 classes, all kept: exact up to fp16" if top_k >= 10 else f"the top {top_k} of 10 classes kept in fp16, the rest spread evenly"
    notes.append(f"Its effect on the student's top-1 here (cached minus teachers every step, per seed): {signed_mean_std(changes)} points"
                 + (", within noise" if abs(change) < 0.5 else "")
                 + f" (targets: {kept}), and the cost to expect on long runs is the loss of augmentation "
                 "diversity (each image is only ever seen in `--cache-views` views).")

    stages = "\n".join(f"    {command}" for command in raw["commands"][:4])
    description = (
        f"On the offline default data, Fashion-MNIST at 32px (ResNet stride-4 stem), batch 64, it runs the demo's commands "
        f"(into `runs/bench/meal/`):\n\n{stages}\n\n"
        f"then, in-process, a control (the student init trained {raw['control_steps']} more steps on the labels with cross-entropy, "
        "MEAL's optimiser and schedule), one step timed with and without the teachers, and "
        f"{args['subset_epochs']}-epoch MEAL runs on a {args['subset_train']}-image subset with and without "
        f"`--teacher-cache --cache-views {crops} --cache-top-k {top_k}` ({seed_text})"
        + ", and `seed-distill --config configs/demo/meal.yaml --discriminator off|minimax` with the same teachers and init"
        + f". It took {raw['bench_wall_s'] / 60:.1f} min (load average about {raw['load_average_before'][0]:.0f}"
        + ("; this invocation alone, the reused runs not counted" if raw.get("reused") else "")
        + f"), one torch thread per process (`--threads {raw['threads']}`; at load 6, "
        "two threads made an r18 step 5x slower than one). Measured " + raw["measured"] + reused_text(raw.get("reused", [])) + ". "
        "Not part of `make bench` (over 10 minutes): `python -m bench --only meal` reruns it."
    )
    return {"title": "MEAL V2", "order": 60, "command": "python -m bench.meal_bench", "description": description,
            "tables": [top1, kd, cache_table], "notes": notes, "reused": raw.get("reused", []), "data": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: fastest on a shared machine)")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    parser.add_argument("--subset-train", type=int, default=768, help="train images of the cache experiment")
    parser.add_argument("--subset-val", type=int, default=2000)
    parser.add_argument("--subset-epochs", type=int, default=6)
    parser.add_argument("--cache-crops", type=int, default=2)
    parser.add_argument("--cache-top-k", type=int, default=3, help="classes kept per cached target (below the 10 classes: the top-k path)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the cache experiment (mean ± std)")
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per variant of the KD overhead")
    args = parser.parse_args()
    os.chdir(ROOT)
    raw = measure(args)
    result = to_result(raw)
    raw["machine"] = result["machine"] = {**machine(), "threads": raw["threads"]}
    write_result("meal", result, configs=[ROOT / CONFIGS])
    for table in result["tables"]:
        print(f"\n{table['caption']}")
        for row in table["rows"]:
            print(" | ".join(row))
    print("\n".join(f"- {note}" for note in result["notes"]))


if __name__ == "__main__":
    main()
