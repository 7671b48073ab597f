"""Detection transfer: trained backbones vs the same architecture at random init, through ``seed-eval detection``'s code path.

Two data sets, both in the real VOCdevkit layout, so the whole path runs: VOC
XML reader, torchvision Faster R-CNN, pycocotools AP and the VOC07 11-point AP50.

``--scenes shapes`` (the suite's run): coloured rectangles and ellipses on
noise (``downstream.detection.scenes.write_synthetic``). The backbone compared is
a SEED student that has learned this domain, made in about two minutes on a
CPU: a supervised r18 teacher (``seed-pretrain --method supervised``) on object
crops of a separate synthetic image pool (labelled like ImageNet is, never the
detection images), then ``seed-distill`` into an r18 student on the same crops
without labels. Random init learns these shapes nearly as well, so the gap is small.

``--scenes fashion``: Fashion-MNIST garments (10 classes) pasted at several
scales on clutter cut from other garments (``write_fashion_scenes``; test scenes
from Fashion-MNIST's test split), where the features matter. Compared: the
reference teacher (``make teacher``), the quality benchmark's r18 SEED student
(``bench/quality.py``, seed 0) and random init, 3 seeds.

Every backbone detects with the same settings and seeds, the random-init
backbone drawn with each seed (the very files ``seed-eval compare`` uses); the
table gives mean ± std over the seeds.

    python -m bench.detection_bench                                # the suite's CPU run (~16 min on 2 cores, 1 thread)
    python -m bench.detection_bench --scenes fashion               # ~15 min on 2 idle cores: writes detection_fashion.json
    python -m bench.detection_bench --scenes fashion --student runs/distill/x/student.pt
    python -m bench.detection_bench --checkpoint runs/distill/x/student.pt --image-size 128 --max-iter 2000
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import MAKE_TEACHER, mean_std, reference_teacher_dir, write_result
from bench.quality import RUNS as QUALITY_RUNS
from downstream.compare import random_init_file, small_image_stem
from downstream.detection.config import DetectionConfig
from downstream.detection.data import read_voc
from downstream.detection.run import detect
from downstream.detection.scenes import write_fashion_scenes, write_synthetic
from pretrain.cli import main as pretrain_main
from seed.checkpoints import load_backbone
from seed.cli import distill_main
from seed.config import make_config

METRICS = ("AP", "AP50", "AP75", "VOC07_AP50")
#: --scenes: the defaults of the data and the schedule (the flags override them).
SCENES = {
    "shapes": {"train_images": 300, "test_images": 150, "image_size": 96, "max_iter": 300, "seeds": "0,1"},
    # 9 runs in ~15 min on 2 idle cores (13-19 by this estimate). The shapes run takes 0.55-0.8 s per iteration of 4 images and
    # 0.37-0.53 s per test image (the box head on 1000 proposals) at 96px on one thread (bench/results/detection.json and a rerun's
    # logs, 2026-12-01); at 128px x1.4 and x1.2, on two threads /1.5: 100 x 0.5-0.75 s + 100 x 0.3-0.43 s + start-up, 85-125 s a run.
    "fashion": {"train_images": 400, "test_images": 100, "image_size": 128, "max_iter": 100, "seeds": "0,1,2"},
}
#: The quality benchmark's r18 student distilled from the reference teacher, seed 0.
QUALITY_STUDENT = QUALITY_RUNS / "r18" / "seed0" / "seed" / "student.pt"


def object_crops(voc: Path, folder: Path, crop: int, seed: int) -> Path:
    """An ImageFolder (train/ val/) of square crops around each object, plus background crops of noise.

    The training images of ``voc`` give ``train/``, its test images ``val/``;
    one background crop per image, placed where it overlaps no object much.
    """
    data = read_voc(voc)
    rng = np.random.default_rng(seed)
    for split, records in (("train", data.train), ("val", data.test)):
        for record in records:
            with Image.open(record.file) as handle:
                image = handle.convert("RGB")
            squares = []
            for box, label in zip(record.boxes, record.labels, strict=True):
                side = min(max(box[2] - box[0], box[3] - box[1]) * 1.25, record.width, record.height)
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                x, y = np.clip(cx - side / 2, 0, record.width - side), np.clip(cy - side / 2, 0, record.height - side)
                squares.append((data.classes[label - 1], (x, y, x + side, y + side)))
            for _ in range(20):
                side = rng.uniform(record.width / 8, record.width / 2)
                x, y = rng.uniform(0, record.width - side, size=2)
                inside = [max(0.0, min(x + side, b[2]) - max(x, b[0])) * max(0.0, min(y + side, b[3]) - max(y, b[1])) for b in record.boxes]
                if max(inside, default=0.0) < 0.05 * side * side:
                    squares.append(("background", (x, y, x + side, y + side)))
                    break
            for i, (name, square) in enumerate(squares):
                target = folder / split / name
                target.mkdir(parents=True, exist_ok=True)
                image.crop(tuple(round(float(v)) for v in square)).resize((crop, crop), Image.BILINEAR).save(target / f"{record.image_id}_{i}.png")
    return folder


def learned_note(knn: dict[str, list[float]]) -> str:
    """The student's end-of-run kNN table (``knn.json``: scores per row, several for random init's seeds) as a sentence."""
    cells = [f"{name} {np.mean(scores):.1f}" + (f" ± {np.std(scores, ddof=1):.1f}" if len(scores) > 1 else "") for name, scores in knn.items()]
    return "What the student learned before detection (kNN top-1 on held-out object crops, 4 classes incl. background): " + ", ".join(cells) + "."


def train_student(work: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """Supervised r18 teacher on object crops, then SEED into an r18 student on the same crops; returns student.pt and the kNN scores."""
    voc, _ = write_synthetic(work / "pool", args.pool_images, args.pool_images // 4, args.image_size, seed=args.pool_seed)
    crops = object_crops(voc, work / "crops", args.crop_size, args.pool_seed)
    common = ["--data", str(crops), "--image-size", str(args.crop_size), "--no-small-images", "--batch-size", "64", "--epochs", "1000",
              "--max-steps", str(args.pretrain_steps), "--knn-every", "0", "--knn-bank-size", "2000", "--knn-query-size", "1000",
              "--num-workers", "0", "--accelerator", "cpu", "--resume", "never", "--checkpoint-every", "0"]
    pretrain_main(["--method", "supervised", "--arch", args.arch, "--crop-min-scale", "0.5", "--output", str(work / "teacher"), *common])
    distill_main(["--teacher-checkpoint", str(work / "teacher" / "teacher.pt"), "--no-teacher-head", "--student", args.arch, "--queue-size", "1024",
                  "--crop-min-scale", "0.5", "--base-lr", "0.3", "--output", str(work / "student"), *common])
    return work / "student" / "student.pt", json.loads((work / "student" / "knn.json").read_text())["scores"]


def detection_run(checkpoint: Path, voc: Path, seed: int, args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """One ``seed-eval detection`` run of the benchmark's detector and schedule; its metrics, seed and seconds."""
    config = make_config(DetectionConfig, {
        "checkpoint": str(checkpoint), "dataset": "voc", "data": str(voc), "engine": "torchvision", "head": args.head,
        "image_size": args.image_size, "max_iter": args.max_iter, "batch_size": args.batch_size, "lr": args.lr,
        "roi_per_image": args.roi_per_image, "warmup_iters": min(100, args.max_iter // 5), "num_workers": 0, "seed": seed,
        "resume": "never", "accelerator": "cpu", "output": str(output), "checkpoint_every": 0,
    })
    results = detect(config)
    return {k: results["metrics"][k] for k in METRICS} | {"seed": seed, "time_s": results["seconds"]}


def against_random_init(backbones: dict[str, Path], like: Path, voc: Path, seeds: list[int], args: argparse.Namespace,
                        work: Path) -> tuple[dict[str, list[dict]], torch.nn.Module]:
    """Runs of every backbone, then of random init of ``like``'s architecture and stem (drawn with each seed), on each seed; and ``like``'s backbone."""
    architecture = load_backbone(like)
    small_images = small_image_stem(architecture)
    runs: dict[str, list[dict]] = {key: [] for key in [*backbones, "random"]}
    for seed in seeds:
        for key, path in [*backbones.items(), ("random", random_init_file(architecture.arch, small_images, seed))]:
            runs[key].append(detection_run(path, voc, seed, args, work / "runs" / f"{key}-{seed}"))
    return runs, architecture


def versus_random(subject: str, trained: list[dict], random: list[dict]) -> str:
    """One note: does ``subject`` beat random init on every seed, by more than the seed-to-seed spread?"""
    gaps = [t["VOC07_AP50"] - r["VOC07_AP50"] for t, r in zip(trained, random, strict=True)]
    gap, _ = mean_std(gaps)
    gap_coco = np.mean([t["AP50"] - r["AP50"] for t, r in zip(trained, random, strict=True)])
    (mean_t, std_t), (mean_r, std_r) = (mean_std([r["VOC07_AP50"] for r in rows]) for rows in (trained, random))
    spread = max(std_t, std_r)
    if min(gaps) > 0 and gap > spread:
        verdict = "beats random init on every seed, by more than the seed-to-seed spread"
    elif gap > 0:
        verdict = "is ahead of random init on average, but not by more than the seed-to-seed spread"
    else:
        verdict = "does not beat random init"
    return (f"{subject} {verdict}: VOC07 AP50 {mean_t:.1f} vs {mean_r:.1f}, a gap of {gap:+.1f} points (per-seed gaps "
            f"{', '.join(f'{g:+.1f}' for g in gaps)}; std over seeds of either backbone at most {spread:.1f}); COCO AP50 gap {gap_coco:+.1f}.")


def report(names: dict[str, str], runs: dict[str, list[dict]], plot: str, title: str) -> dict[str, Any]:
    """The result's tables (mean ± std over seeds, per seed) and bar plot."""
    stats = {key: {k: mean_std([r[k] for r in rows]) for k in METRICS} for key, rows in runs.items()}
    rows = [[names[key], *(f"{m:.1f} ± {s:.1f}" for m, s in (stats[key][k] for k in METRICS)),
             f"{np.mean([r['time_s'] for r in runs[key]]):.0f}"] for key in runs]
    per_seed = [[names[key], r["seed"], *(f"{r[k]:.1f}" for k in METRICS)] for key in runs for r in runs[key]]
    seeds = len(next(iter(runs.values())))
    return {
        "tables": [
            {"caption": f"Mean ± std over {seeds} seeds (AP in %, time per detection run in s).",
             "columns": ["backbone", "AP", "AP50", "AP75", "VOC07 AP50", "time s"], "rows": rows},
            {"caption": "Per seed.", "columns": ["backbone", "seed", "AP", "AP50", "AP75", "VOC07 AP50"], "rows": per_seed},
        ],
        "plots": [{"file": plot, "title": title, "xlabel": "metric", "ylabel": "%", "kind": "bar",
                   "series": [{"label": names[key], "x": list(METRICS), "y": [stats[key][k][0] for k in METRICS],
                               "yerr": [stats[key][k][1] for k in METRICS]} for key in runs]}],
    }


def schedule_text(args: argparse.Namespace) -> str:
    return (f"Every backbone trains with the same detector and schedule: {args.max_iter} iterations, batch {args.batch_size}, lr {args.lr:g} "
            f"(the recipe's 0.02 scaled to the batch), {args.roi_per_image} RoIs per image, BatchNorm trained, seeds {args.seeds}.")


def shapes(args: argparse.Namespace, seeds: list[int], work: Path, started: float) -> None:
    """The suite's run: a SEED student made here (or ``--checkpoint``) vs random init on the coloured shapes."""
    voc, _ = write_synthetic(work / "data", args.train_images, args.test_images, args.image_size, seed=0)
    knn = None
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint, knn = train_student(work, args)
    pretrain_s = time.time() - started
    runs, trained = against_random_init({"trained": checkpoint}, checkpoint, voc, seeds, args, work)
    total_s = time.time() - started
    arch = trained.arch
    names = {"trained": f"{arch} SEED student" if knn is not None else f"{arch} {checkpoint.name}", "random": f"{arch} random init"}
    notes = [versus_random("The student", runs["trained"], runs["random"]),
             f"Noise: {len(seeds)} detector seeds on {args.test_images} test images; the student itself is one pretraining run, so its own "
             "seed-to-seed variation is not in the ± figures.",
             "Context: the three classes differ by colour and shape, which a randomly initialised network also learns within a few "
             "hundred iterations, so this data leaves pretraining little room; on real images it matters far more (MoCo's VOC table: "
             "random init is ~20 AP50 behind); `--scenes fashion` is the harder set."]
    if knn is not None:
        notes.append(learned_note(knn))
    notes.append(f"Run time: {pretrain_s:.0f} s making the student, {total_s - pretrain_s:.0f} s for the {2 * len(seeds)} detection runs, "
                 f"{total_s:.0f} s in all.")
    description = (
        f"Faster R-CNN {args.head.upper()} (torchvision engine, `seed-eval detection`'s code path) on synthetic VOC-format data: "
        f"{args.train_images} train / {args.test_images} test images of {args.image_size}px noise with 1-3 coloured shapes "
        "(3 classes), real VOC XML, VOC07 11-point AP50 and pycocotools AP. " + schedule_text(args) + "\n\n"
        + (f"The student: a supervised {args.arch} teacher trained {args.pretrain_steps} steps (batch 64) on {args.crop_size}px object "
           f"and background crops of {args.pool_images} other synthetic images (a separate pool, as ImageNet is to VOC), then SEED-distilled "
           f"{args.pretrain_steps} steps into an {args.arch} student on the same crops without labels (queue 1024, base lr 0.3, teacher features "
           "without its classifier). The random-init backbone of each seed is drawn with that seed. A stand-in for a real student at toy scale: "
           "it checks that a learned backbone transfers through this path; these are not VOC numbers."
           if knn is not None else f"The trained backbone: `{checkpoint}`.")
    )
    write_result("detection", {
        "title": "Detection transfer (synthetic VOC, CPU)",
        "order": 70,
        "command": "python -m bench.detection_bench",
        "description": description,
        **report(names, runs, "detection.png", "Detection transfer: student vs random init"),
        "notes": notes,
        "data": {"settings": dict(vars(args)), "small_images": small_image_stem(trained), "runs": runs, "knn": knn,
                 "pretrain_s": round(pretrain_s, 1), "total_s": round(total_s, 1)},
    })


def existing(flag: str | None, default: Path, build: str) -> Path:
    """``flag``'s file, else ``default``; a missing one ends the benchmark with the command that builds it."""
    path = Path(flag) if flag else default
    if not path.is_file():
        sys.exit(f"no checkpoint at {path}: {build}" if flag is None else f"no checkpoint at {path}: check the path")
    return path


def fashion(args: argparse.Namespace, seeds: list[int], work: Path, started: float) -> None:
    """The reference teacher and a SEED student vs random init on the fashion scenes."""
    teacher = existing(args.teacher, reference_teacher_dir() / "teacher.pt", f"build the reference teacher with `{MAKE_TEACHER}` (about 90 min on 2 cores)")
    student = existing(args.student, QUALITY_STUDENT, (
        f"distil the quality benchmark's r18 student (about 5 min on 2 cores): `seed-distill --config configs/bench/quality_r18_seed.yaml "
        f"--seed 0 --teacher-checkpoint {teacher} --output {QUALITY_STUDENT.parent}`, or pass --student PATH"))
    voc, _ = write_fashion_scenes(work / "data", args.train_images, args.test_images, args.image_size, seed=0)
    data_s = time.time() - started
    runs, student_backbone = against_random_init({"teacher": teacher, "student": student}, student, voc, seeds, args, work)
    arch = student_backbone.arch
    total_s = time.time() - started
    teacher_arch = load_backbone(teacher).arch
    names = {"teacher": f"{teacher_arch} teacher ({teacher.parent.name}/{teacher.name})", "student": f"{arch} student ({student.parent.name}/{student.name})",
             "random": f"{arch} random init"}
    student_gaps = [s["VOC07_AP50"] - t["VOC07_AP50"] for s, t in zip(runs["student"], runs["teacher"], strict=True)]
    notes = [versus_random("The teacher", runs["teacher"], runs["random"]), versus_random("The student", runs["student"], runs["random"]),
             f"Student vs teacher: VOC07 AP50 {mean_std(student_gaps)[0]:+.1f} points (per seed {', '.join(f'{g:+.1f}' for g in student_gaps)}).",
             f"Noise: {len(seeds)} detector seeds on {args.test_images} test images; teacher and student are one pretraining run each, so "
             "their own seed-to-seed variation is not in the ± figures.",
             f"Run time: {data_s:.0f} s writing the scenes, {total_s - data_s:.0f} s for the {3 * len(seeds)} detection runs, {total_s:.0f} s in all."]
    low, high = json.loads((voc.parent / "manifest.json").read_text())["item_sides"]
    description = (
        f"Faster R-CNN {args.head.upper()} (torchvision engine, `seed-eval detection`'s code path) on Fashion-MNIST scenes "
        f"(`downstream.detection.scenes.write_fashion_scenes`): {args.train_images} train / {args.test_images} test images of {args.image_size}px, "
        f"each with 1-4 garments (the 10 Fashion-MNIST classes) whose 28px frames are scaled to {low}-{high}px, tinted and of random contrast, "
        "on an unevenly lit background cluttered with turned fragments of other garments, plus noise; train scenes are made from "
        "Fashion-MNIST's train split, test scenes from its test split. Real VOC XML, VOC07 11-point AP50 and pycocotools AP. "
        + schedule_text(args) + "\n\n"
        f"The backbones: the teacher `{teacher}`; the student `{student}`; random init of the student's architecture, drawn with each seed. "
        "Teacher and student were pretrained on whole 28px garments seen at 32px, so the items here are within the scales they know."
    )
    write_result("detection_fashion", {
        "title": "Detection transfer (Fashion-MNIST scenes, CPU)",
        "order": 71,
        "command": " ".join(["python -m bench.detection_bench", *sys.argv[1:]]),
        "description": description,
        **report(names, runs, "detection_fashion.png", "Detection on Fashion-MNIST scenes: teacher, student, random init"),
        "notes": notes,
        "data": {"settings": dict(vars(args)), "files": {"teacher": str(teacher), "student": str(student)}, "runs": runs,
                 "data_s": round(data_s, 1), "total_s": round(total_s, 1)},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", default="shapes", choices=list(SCENES), help="shapes: the suite's coloured shapes; fashion: Fashion-MNIST "
                                                                                 "garments on clutter, teacher and student vs random init")
    parser.add_argument("--checkpoint", help="shapes: trained backbone to compare (default: a SEED student made here, see above)")
    parser.add_argument("--teacher", help=f"fashion: the teacher (default: the reference teacher of `{MAKE_TEACHER}`)")
    parser.add_argument("--student", help="fashion: the student (default: the quality benchmark's r18 SEED student of seed 0)")
    parser.add_argument("--arch", default="r18", help="shapes: teacher and student architecture of the quick student")
    parser.add_argument("--pool-images", type=int, default=600, help="shapes: synthetic images whose object crops train teacher and student")
    parser.add_argument("--pool-seed", type=int, default=100, help="shapes: seed of that pool (the detection data use seed 0)")
    parser.add_argument("--crop-size", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=150, help="shapes: steps of the teacher and of the student (batch 64)")
    parser.add_argument("--train-images", type=int, help="default: 300 shapes, 400 fashion")
    parser.add_argument("--test-images", type=int, help="default: 150 shapes, 100 fashion")
    parser.add_argument("--image-size", type=int, help="default: 96 shapes, 128 fashion")
    parser.add_argument("--max-iter", type=int, help="default: 300 shapes, 100 fashion")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's 0.02 x batch size / 16")
    parser.add_argument("--roi-per-image", type=int, default=32, help="sampled RoIs per image (512 in the paper recipe; fewer is faster on a CPU)")
    parser.add_argument("--head", default="fpn", choices=["c4", "fpn"], help="fpn: C4's res5 on every RoI is ~6x slower on a CPU")
    parser.add_argument("--seeds", help="detector seeds (head init, data order, random-init backbone); default: 0,1 shapes, 0,1,2 fashion")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    for flag, scenes in (("checkpoint", "shapes"), ("teacher", "fashion"), ("student", "fashion")):
        if getattr(args, flag) and args.scenes != scenes:
            parser.error(f"--{flag} goes with --scenes {scenes}")
    for name, value in SCENES[args.scenes].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.lr = args.lr or 0.02 * args.batch_size / 16
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="seed-detection-bench-"))
    try:
        (fashion if args.scenes == "fashion" else shapes)(args, seeds, work, started)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
