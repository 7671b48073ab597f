"""Does distillation help a small student? The paper's claim, on the offline default data.

For each seed, with the recipes in ``configs/bench/``:

1. a teacher trained with ``seed-pretrain --method M``;
2. the student, a ResNet-18, trained with ``seed-pretrain --method M`` alone, for as many steps as (3);
3. the student distilled with ``seed-distill`` (SEED) from the teacher of (1).

M is SimCLR by default, with a ResNet-18 teacher trained twice the student's steps.
``--method mocov2`` runs MoCo v2 with a ResNet-34 teacher (the issue's setting; its
short-run recipe needs BatchNorm in the head, see ``configs/bench/quality_teacher_mocov2.yaml``);
measured on 3 seeds, that teacher still scores below its own random init after 300 CPU
steps, so it cannot show what distillation does. A ResNet-34 SimCLR teacher did not
learn either (``configs/bench/quality_teacher_simclr.yaml``).

Every network is then scored the same way, in this process: kNN top-1 (k = 200,
tau = 0.07, seed-eval's vote) and the fast linear probe (seed-eval linear --fast's
``fit_linear``) on frozen centre-crop features of a fixed train subset (bank /
probe training set) and the whole val split. The runs' kNN monitors give the
curves of (2) and (3) against training steps. Results: ``bench/results/quality.json``
(``quality_mocov2.json`` with ``--method mocov2``).

    python -m bench.quality                    # 3 seeds (make bench)
    python -m bench.quality --seeds 0 --quick  # a smoke run: minutes
"""

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from bench.common import ROOT, mean_std, write_result
from downstream.features import Features, extract
from downstream.knn import knn_metrics
from downstream.linear import FAST_LR, evaluate_head, fit_linear
from seed.backbones import create_backbone
from seed.checkpoints import load_encoder
from seed.data import eval_transform, load_dataset

CONFIGS = ROOT / "configs" / "bench"
RUNS = ROOT / "runs" / "bench" / "quality"
BIN = Path(sys.executable).parent

METHODS = {"simclr": "SimCLR", "mocov2": "MoCo v2"}
DEFAULT_METHOD = "simclr"
SAME_ARCH_NOTE = ("The teacher has the student's architecture, trained twice as long: a larger one does not learn in this CPU budget "
                  "(a ResNet-34 SimCLR teacher stayed at its random-init kNN; the ResNet-34 MoCo v2 teacher of `quality_mocov2` "
                  "scores below it).")
# row key -> (label, command, config, exported file); {method} is the --method
ROWS = {
    "teacher": ("teacher: {teacher} {name}", "seed-pretrain", "quality_teacher_{method}.yaml", "teacher.pt"),
    "student_alone": ("student: {student} {name} alone", "seed-pretrain", "quality_student_{method}.yaml", "teacher.pt"),
    "student_seed": ("student: {student} SEED from that teacher", "seed-distill", "quality_student_seed.yaml", "student.pt"),
}


def run(command: list[str], log: Path, threads: int) -> float:
    """One of our commands, its output in ``log``; returns its wall time. A failure stops the benchmark."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        sys.exit(f"{command[0]} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def train(key: str, method: str, seed: int, extra: list[str], threads: int, reuse: bool) -> tuple[Path, float]:
    """Train one row's network for ``seed``; returns its run folder and wall time (NaN for a reused run)."""
    _, command, config, exported = ROWS[key]
    config = config.format(method=method)
    folder = RUNS / method / f"seed{seed}" / key
    if reuse and (folder / exported).is_file():
        print(f"reusing {folder / exported}", flush=True)
        return folder, float("nan")
    args = [command, "--config", str(CONFIGS / config), "--seed", str(seed), "--output", str(folder), "--resume", "never", *extra]
    return folder, run(args, folder.with_suffix(".log"), threads)


def knn_curve(folder: Path) -> dict[int, float]:
    """kNN top-1 of the run's monitor by training step, from its CSV log."""
    curve = {}
    with open(folder / "logs" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            if row.get("knn_top1"):
                curve[int(row["step"])] = float(row["knn_top1"])
    return curve


class Scorer:
    """kNN and fast-linear top-1 of a frozen backbone on fixed train/val images."""

    def __init__(self, data: str, image_size: int, train_images: int, val_images: int | None, linear_epochs: int) -> None:
        transform = eval_transform(image_size)
        train = load_dataset(data, "train", transform=transform)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_images]
        self.train = Subset(train, order.tolist())
        val = load_dataset(data, "val", transform=transform)
        self.val = Subset(val, range(min(val_images or len(val), len(val))))
        self.classes = len(train.classes)
        self.linear_epochs = linear_epochs

    def features(self, backbone: torch.nn.Module) -> tuple[Features, Features]:
        return (extract(backbone, self.train, 256, 0, torch.device("cpu"), "train features"),
                extract(backbone, self.val, 256, 0, torch.device("cpu"), "val features"))

    def score(self, backbone: torch.nn.Module) -> dict[str, float]:
        train, val = self.features(backbone)
        knn = knn_metrics(train.features, train.labels, val.features, val.labels, self.classes, ks=(200,), backend="torch")
        epochs = self.linear_epochs
        head = fit_linear(train, self.classes, epochs, lr=FAST_LR, milestones=[round(0.6 * epochs), round(0.8 * epochs)])
        return {"knn": knn["top1_k200"], "linear": evaluate_head(head, val)["top1"]}


def cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="self-supervised method of the teacher and of the student alone")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 steps per network, small eval")
    parser.add_argument("--train-images", type=int, default=10000, help="train images in the kNN bank / linear probe's training set")
    parser.add_argument("--linear-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reuse", action="store_true", help="keep finished runs under runs/bench/quality (only after the same recipes)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = ["--max-steps", "20", "--knn-every-steps", "10", "--knn-bank-size", "500", "--knn-query-size", "200"] if args.quick else []
    torch.set_num_threads(args.threads)
    keys = list(ROWS)
    started = time.perf_counter()

    folders: dict[tuple[str, int], Path] = {}
    times: dict[str, list[float]] = {key: [] for key in keys}
    for seed in seeds:
        for key in keys:
            teacher = ["--teacher-checkpoint", str(folders["teacher", seed] / "teacher.pt")] if key == "student_seed" else []
            folder, seconds = train(key, args.method, seed, extra + teacher, args.threads, args.reuse)
            folders[key, seed] = folder
            times[key].append(seconds)

    scorer = Scorer("fashion-mnist", 32, 500 if args.quick else args.train_images, 500 if args.quick else None, 3 if args.quick else args.linear_epochs)
    scores: dict[str, list[dict[str, float]]] = {key: [] for key in keys}
    random_init: dict[str, list[dict[str, float]]] = {}
    scored_init: set[tuple[str, int]] = set()  # teacher and student may share an architecture: one random init per seed
    for (key, seed), folder in folders.items():
        backbone, _, _ = load_encoder(folder / ROWS[key][3], use_head=False)
        scores[key].append(scorer.score(backbone))
        if key in ("teacher", "student_alone") and (backbone.arch, seed) not in scored_init:
            scored_init.add((backbone.arch, seed))
            torch.manual_seed(seed)
            random_init.setdefault(backbone.arch, []).append(scorer.score(create_backbone(backbone.arch, small_images=False)))

    config_names = {key: ROWS[key][2].format(method=args.method) for key in keys}
    teacher_arch = load_encoder(folders["teacher", seeds[0]] / "teacher.pt", use_head=False)[0].arch
    student_arch = load_encoder(folders["student_seed", seeds[0]] / "student.pt", use_head=False)[0].arch
    rows = []
    for arch, values in random_init.items():
        rows.append([f"{arch} random init", cell([v["knn"] for v in values]), cell([v["linear"] for v in values]), "", ""])
    for key in keys:
        label = ROWS[key][0].format(teacher=teacher_arch, student=student_arch, name=METHODS[args.method])
        minutes = [t / 60 for t in times[key] if t == t]
        rows.append([label, cell([v["knn"] for v in scores[key]]), cell([v["linear"] for v in scores[key]]),
                     f"{sum(minutes) / len(minutes):.1f}" if minutes else "(reused)", f"`configs/bench/{config_names[key]}`"])

    curves = {key: [knn_curve(folders[key, seed]) for seed in seeds] for key in ("student_alone", "student_seed")}
    series = []
    for key, label in (("student_alone", f"{student_arch} {METHODS[args.method]} alone"), ("student_seed", f"{student_arch} SEED")):
        steps = sorted(set.intersection(*(set(c) for c in curves[key])))
        stats = [mean_std([c[s] for c in curves[key]]) for s in steps]
        series.append({"label": label, "x": steps, "y": [m for m, _ in stats], "yerr": [s for _, s in stats]})

    knn = {key: mean_std([v["knn"] for v in scores[key]])[0] for key in keys}
    linear = {key: mean_std([v["linear"] for v in scores[key]])[0] for key in keys}
    notes = [
        f"SEED vs the student trained alone for the same steps: kNN {knn['student_seed'] - knn['student_alone']:+.2f}, "
        f"linear {linear['student_seed'] - linear['student_alone']:+.2f} points (mean over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}).",
        f"SEED student vs its teacher: kNN {knn['student_seed'] - knn['teacher']:+.2f}, linear {linear['student_seed'] - linear['teacher']:+.2f} points.",
    ]
    baselines = ", ".join(f"{arch} {mean_std([v['knn'] for v in values])[0]:.2f}" for arch, values in random_init.items())
    teacher_init = mean_std([v["knn"] for v in random_init[teacher_arch]])[0]
    if knn["teacher"] < teacher_init:
        notes.append(f"The teacher scores below its own random init (kNN {knn['teacher']:.2f} vs {teacher_init:.2f}): in this budget it has "
                     "not learned useful features, so this table cannot show what distillation does.")
    if teacher_arch == student_arch:
        notes.append(SAME_ARCH_NOTE)
    notes.append(f"Random init already scores kNN {baselines}: on Fashion-MNIST random convolutional features are strong, "
                 "so short CPU runs move the numbers by a few points.")
    description = (
        f"Fashion-MNIST (the offline default), 32px, CPU; seeds {', '.join(map(str, seeds))}; mean ± std over seeds. "
        f"Teacher {teacher_arch}, student {student_arch}; the recipes (steps, batch, lr, queue) are the YAML files named in the table, "
        "each run as `<command> --config <file> --seed S`. Scores: kNN top-1 (k = 200, tau = 0.07) and a linear probe "
        f"({scorer.linear_epochs} epochs on standardised frozen features, the `seed-eval linear --fast` trainer) with "
        f"{len(scorer.train)} train images (fixed subset) as bank / probe training set and all {len(scorer.val)} val images. "
        "The plot is the kNN monitor during training (bank of 5000 train images, 1000 val queries)."
        + (" **Smoke run (--quick): not a result.**" if args.quick else "")
    )
    name = "quality" if args.method == DEFAULT_METHOD else f"quality_{args.method}"  # one result per method
    write_result(name, {
        "title": f"Quality: does distillation help a small student? ({METHODS[args.method]})",
        "order": 10 if args.method == DEFAULT_METHOD else 11,
        "command": " ".join(["python -m bench.quality", *sys.argv[1:]]),
        "description": description,
        "tables": [{"caption": "", "columns": ["network", "kNN top-1 %", "linear top-1 %", "train min / run", "recipe"], "rows": rows}],
        "plots": [{"file": f"{name}_knn_curve.png", "title": "kNN top-1 while training the student", "xlabel": "training step",
                   "ylabel": "kNN top-1 % (monitor)", "kind": "line", "series": series}],
        "notes": notes,
        "data": {"scores": scores, "random_init": random_init, "minutes": times, "curves": {k: [{str(s): v for s, v in c.items()} for c in cs]
                                                                                            for k, cs in curves.items()},
                 "wall_minutes": (time.perf_counter() - started) / 60},
    })


if __name__ == "__main__":
    main()
