"""Does SEED give a small student more than its own self-supervision? The paper's claim, on the offline default data.

The teacher is the reference teacher of ``make teacher`` (configs/teacher/reference.yaml, a
ResNet-18 SimCLR run of 20 epochs, cached in ``$SEED_CACHE/reference-teacher``); a weaker
teacher is the same run after fewer epochs (``--weak-epoch``, its kept checkpoint with
PreciseBN statistics), which gives the second point on the "stronger teacher, better student" axis.
For each student architecture and seed, with the same budget of training time per student
(the steps in ``configs/bench/quality_<arch>_{simclr,seed}.yaml`` are set so that both take
about the same minutes on 2 cores; the table shows the minutes measured):

1. the student trained with SimCLR alone (the teacher's recipe);
2. the student distilled with SEED from the reference teacher;
3. the student distilled with SEED from the weaker teacher;
4. the student distilled with SEED from the reference teacher through ``--teacher-cache
   --cache-views 1`` (the cache's accuracy cost: each image's one fixed view, embedded in
   the first epoch, read back from the fp16 cache after it; same steps);
5. the student distilled with SEED from the reference teacher under ``--precision bf16-mixed``
   (bf16 autocast, 1.8x the fp32 step on a CPU with bf16 units: what it costs in accuracy; same steps;
   left out on a CPU without bf16 units, where seed-distill refuses bf16).

Every network, random init of each architecture (3 seeds) and the teachers included, is scored
by ``seed-eval compare``'s protocol (downstream/compare.py): the whole train split as kNN bank and
probe training set, the whole val split as queries, kNN k = 200 and 20 (tau 0.07), the fast
linear probe. Results: ``bench/results/quality.json``.

A rerun keeps a student run that finished before with the same command, recipe, teacher file and
source hash (:func:`bench.common.source_hash` of the packages and the recipe), as its ``.done``
marker records; the result lists each kept run under ``reused`` with its own date and commit.

    python -m bench.quality                        # 3 seeds, students r18 and mbv3s (make bench)
    python -m bench.quality --seeds 0 --students r18 --quick   # a smoke run: minutes, not a result
"""

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import (
    MAKE_TEACHER,
    ROOT,
    mean_std,
    reference_teacher_dir,
    reused_entry,
    run,
    run_or_keep,
    training_minutes,
    write_result,
)
from downstream.compare import METRICS, CompareConfig, Row, compare
from seed.checkpoints import export_model, load_encoder
from seed.loaders import monitor_loaders
from seed.module import precise_bn
from seed.precision import native_cpu_bf16
from seed.registry import method_config

CONFIGS = ROOT / "configs" / "bench"
RUNS = ROOT / "runs" / "bench" / "quality"
QUICK = ["--max-steps", "4", "--knn-every", "0", "--knn-bank-size", "256", "--knn-query-size", "128", "--precise-bn-images", "256"]


def teachers(weak_epoch: int, run_dir: Path) -> tuple[dict[str, Path], Any]:
    """The teacher of ``run_dir`` and its weaker self (the run after ``weak_epoch`` epochs, exported with PreciseBN statistics),
    and the teacher run's config (its data and image size are the protocol's)."""
    strong = run_dir / "teacher.pt"
    kept = run_dir / "checkpoints" / f"epoch-{weak_epoch:03d}.ckpt"
    if not strong.is_file() or not kept.is_file():
        sys.exit(f"no reference teacher in {run_dir} (teacher.pt and checkpoints/epoch-{weak_epoch:03d}.ckpt); build it with `{MAKE_TEACHER}` "
                 "(about 90 min on 2 cores, resumable), then run this benchmark again")
    weak = run_dir / f"teacher-epoch{weak_epoch:03d}.pt"
    config = method_config("pretrain", {"config": str(run_dir / "config.yaml")})
    if not weak.is_file() or weak.stat().st_mtime < kept.stat().st_mtime:
        backbone, head, _ = load_encoder(kept)
        settled = precise_bn(torch.nn.Sequential(backbone, head), monitor_loaders(config)[0], config.precise_bn_images)
        export_model(weak, config.arch, settled[0], settled[1], config.embed_dim, config.method, {"epochs": weak_epoch}, bool(config.small_images))
    return {"strong": strong, "weak": weak}, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--students", default="r18,mbv3s", help="student architectures (configs/bench/quality_<arch>_{simclr,seed}.yaml)")
    parser.add_argument("--weak-epoch", type=int, default=5, help="the weaker teacher: the reference run after this many epochs")
    parser.add_argument("--weak-students", default="r18", help="students that are also distilled from the weaker teacher")
    parser.add_argument("--cache-students", default="r18", help="students that are also distilled through --teacher-cache --cache-views 1")
    parser.add_argument("--bf16-students", default="r18", help="students that are also distilled under --precision bf16-mixed")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps per student (not a result)")
    parser.add_argument("--teacher-config", help="train the teacher here with this config (kept epoch checkpoints) instead of "
                                                 "reading the reference teacher of `make teacher` (the GPU run: configs/bench/gpu/teacher_r50.yaml)")
    parser.add_argument("--configs", default=str(CONFIGS), help="folder of the student recipes quality_<arch>_{simclr,seed}.yaml")
    parser.add_argument("--name", default="quality", help="result name: bench/results/<name>.json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    students = [s for s in args.students.split(",") if s]
    only = {"seed_weak": [s for s in args.weak_students.split(",") if s], "seed_cached": [s for s in args.cache_students.split(",") if s],
            "seed_bf16": [s for s in args.bf16_students.split(",") if s]}
    skipped = []
    if not torch.cuda.is_available() and not native_cpu_bf16():  # seed-distill refuses emulated bf16 (seed.precision.check_cpu_bf16)
        only["seed_bf16"] = []
        skipped.append("No --precision bf16-mixed row: this CPU has no bf16 units (AVX512-BF16 or AMX), where seed-distill refuses it.")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    teacher_dir = reference_teacher_dir()
    if args.teacher_config:
        teacher_dir = RUNS / "teacher"
        run(["seed-pretrain", "--config", args.teacher_config, "--output", str(teacher_dir), "--resume", "never", "--keep-checkpoints"],
            teacher_dir.with_suffix(".log"), args.threads)
    teacher_files, teacher_config = teachers(args.weak_epoch, teacher_dir)
    teacher_label = load_encoder(teacher_files["strong"], use_head=False)[0].arch
    digests = {key: hashlib.sha256(path.read_bytes()).hexdigest() for key, path in teacher_files.items()}  # a retrained teacher: students rerun
    variants = {  # row key -> (label, command, config, teacher, exported file, extra flags)
        "alone": ("{arch} SimCLR alone", "seed-pretrain", "quality_{arch}_simclr.yaml", None, "teacher.pt", []),
        "seed": ("{arch} SEED from the reference teacher", "seed-distill", "quality_{arch}_seed.yaml", "strong", "student.pt", []),
        "seed_weak": (f"{{arch}} SEED from the teacher at epoch {args.weak_epoch}", "seed-distill", "quality_{arch}_seed.yaml", "weak", "student.pt", []),
        "seed_cached": ("{arch} SEED from the reference teacher, --teacher-cache --cache-views 1", "seed-distill", "quality_{arch}_seed.yaml",
                        "strong", "student.pt", ["--teacher-cache", "--cache-views", "1"]),
        "seed_bf16": ("{arch} SEED from the reference teacher, --precision bf16-mixed", "seed-distill", "quality_{arch}_seed.yaml", "strong",
                      "student.pt", ["--precision", "bf16-mixed"]),
    }
    files: dict[tuple[str, str], list[str]] = {}
    reused: list[dict[str, Any]] = []
    minutes: dict[tuple[str, str], list[float]] = {}
    for arch in students:
        for seed in seeds:
            for key, (_, command, config, teacher, exported, flags) in variants.items():
                if key in only and arch not in only[key]:
                    continue
                folder, recipe_file = RUNS / arch / f"seed{seed}" / key, Path(args.configs) / config.format(arch=arch)
                extra = [*(["--teacher-checkpoint", str(teacher_files[teacher])] if teacher else []), *flags]
                argv = [command, "--config", str(recipe_file), "--seed", str(seed), "--output", str(folder),
                        "--resume", "never", *extra, *(QUICK if args.quick else [])]
                kept = run_or_keep(argv, folder, exported, recipe_file, digests[teacher] if teacher else None, args.threads)
                if kept is not None:
                    reused.append(reused_entry(f"{variants[key][0].format(arch=arch)}, seed {seed}", kept, folder))
                minutes.setdefault((arch, key), []).append(max(training_minutes(folder).values()))
                files.setdefault((arch, key), []).append(str(folder / exported))

    labels = {"strong": f"teacher: {teacher_label} SimCLR", "weak": f"teacher: the same run after {args.weak_epoch} epochs"}
    recipes = {labels["strong"]: args.teacher_config or f"`{MAKE_TEACHER}`", labels["weak"]: "its kept checkpoint"}
    entries = [(labels[key], str(path)) for key, path in teacher_files.items()]
    for (arch, key), paths in files.items():
        label, _, config_name, *_ = variants[key]
        entries += [(label.format(arch=arch), path) for path in paths]
        steps = yaml.safe_load((Path(args.configs) / config_name.format(arch=arch)).read_text()).get("max_steps")
        recipes[label.format(arch=arch)] = (f"{f'{steps} steps, ' if steps else ''}{mean_std(minutes[arch, key])[0]:.1f} train min, "
                                            f"`{Path(args.configs).name}/{config_name.format(arch=arch)}`")
    protocol = CompareConfig(data=teacher_config.data, image_size=teacher_config.image_size, num_workers=0, epochs=3 if args.quick else 100)
    rows, _ = compare(entries, protocol)
    by_label = {row.label: row for row in rows}
    floors = {row.arch: row for row in rows if row.random_init}

    def gain(row: str, base: Row, metric: str = "knn_k200") -> str:
        return f"{by_label[row].summary()[metric][0] - base.summary()[metric][0]:+.2f}"

    strong, weak = by_label[labels["strong"]], by_label[labels["weak"]]
    notes = [f"Teacher vs random init: kNN {gain(strong.label, floors[strong.arch])}, linear {gain(strong.label, floors[strong.arch], 'linear')} "
             f"points (the weaker one: {gain(weak.label, floors[weak.arch])} / {gain(weak.label, floors[weak.arch], 'linear')})."]
    for arch in students:
        name = {key: variants[key][0].format(arch=arch) for key in variants}
        alone, floor = by_label[name["alone"]], floors[by_label[name["alone"]].arch]
        parts = [f"SEED vs SimCLR alone on the same budget: kNN {gain(name['seed'], alone)}, linear {gain(name['seed'], alone, 'linear')}",
                 f"SEED vs random init: kNN {gain(name['seed'], floor)}, linear {gain(name['seed'], floor, 'linear')}"]
        if name["seed_weak"] in by_label:
            weak_row = by_label[name["seed_weak"]]
            parts.append(f"stronger vs weaker teacher: kNN {gain(name['seed'], weak_row)}, linear {gain(name['seed'], weak_row, 'linear')}")
        if name["seed_cached"] in by_label:
            exact = by_label[name["seed"]]
            parts.append(f"--teacher-cache vs the exact step: kNN {gain(name['seed_cached'], exact)}, "
                         f"linear {gain(name['seed_cached'], exact, 'linear')}")
        if name["seed_bf16"] in by_label:
            exact = by_label[name["seed"]]
            parts.append(f"--precision bf16-mixed vs fp32: kNN {gain(name['seed_bf16'], exact)}, linear {gain(name['seed_bf16'], exact, 'linear')}")
        notes.append(f"{arch}: {'; '.join(parts)}.")
    notes += skipped
    table = []
    for row in rows:
        cells = [f"{m:.2f} ± {s:.2f}" if len(row.scores) > 1 else f"{m:.2f}" for m, s in row.summary().values()]
        table.append([row.label, str(len(row.scores)), *cells, recipes.get(row.label, "")])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_result(args.name, {
        "title": "Quality: does SEED give a small student more than its own self-supervision?",
        "order": 10,
        "command": " ".join(["python -m bench.quality", *sys.argv[1:]]),
        "description": (f"{teacher_config.data} {teacher_config.image_size}px, {device}; seeds {', '.join(map(str, seeds))}; "
                        "mean ± std over seeds (n). One protocol for every row "
                        "(`seed-eval compare`): all train images as kNN bank and probe training set, all val images as queries, "
                        "kNN k = 200 and 20 (tau 0.07, weighted vote), `seed-eval linear --fast`. Each student run gets about the same "
                        "minutes of training: the step counts were set from step times measured on an idle machine; the last column gives "
                        "each recipe's steps and its measured training minutes (mean over seeds; inflated when the machine was shared)."
                        + (" **Smoke run (--quick): not a result.**" if args.quick else "")),
        "tables": [{"caption": "", "columns": ["network", "n", *METRICS.values(), "budget / recipe"], "rows": table}],
        "notes": notes,
        "reused": reused,
        "data": {"rows": [{"label": r.label, "files": r.files, "scores": r.scores} for r in rows],
                 "minutes": {f"{a} {k}": v for (a, k), v in minutes.items()}, "wall_minutes": (time.perf_counter() - started) / 60},
    }, device, configs=[Path(args.configs), Path(args.teacher_config) if args.teacher_config else ROOT / "configs" / "teacher" / "reference.yaml"])


if __name__ == "__main__":
    main()
