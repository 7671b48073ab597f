"""Detection transfer on synthetic VOC data: a SEED student backbone vs the same architecture at random init.

The detection data are coloured rectangles and ellipses on noise in the real
VOCdevkit layout (``downstream.detection.data.write_synthetic``), so the whole
``seed-eval detection`` path runs: VOC XML reader, torchvision Faster R-CNN,
pycocotools AP and the VOC07 11-point AP50.

The backbone compared is a SEED student that has learned this domain, made in
about two minutes on a CPU: a supervised r18 teacher (``seed-pretrain --method
supervised``) on object crops of a separate synthetic image pool (labelled
like ImageNet is, never the detection images), then ``seed-distill`` into an
r18 student on the same crops without labels. Both detectors then train with
the same settings and seeds, the random-init backbone drawn from the same
seed as the detector head; the table gives mean ± std over the seeds.

    python -m bench.detection_bench                                # the suite's CPU run (~10 min on 2 idle cores)
    python -m bench.detection_bench --checkpoint runs/distill/x/student.pt --image-size 128 --max-iter 2000
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import mean_std, write_result
from downstream.detection.config import DetectionConfig
from downstream.detection.data import read_voc, write_synthetic
from downstream.detection.run import detect
from pretrain.cli import main as pretrain_main
from seed.backbones import create_backbone
from seed.checkpoints import export_model, load_backbone
from seed.cli import distill_main
from seed.config import make_config

METRICS = ("AP", "AP50", "AP75", "VOC07_AP50")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="trained backbone to compare (default: a SEED student made here, see above)")
    parser.add_argument("--arch", default="r18", help="teacher and student architecture of the quick student")
    parser.add_argument("--pool-images", type=int, default=600, help="synthetic images whose object crops train teacher and student")
    parser.add_argument("--pool-seed", type=int, default=100, help="seed of that pool (the detection data use seed 0)")
    parser.add_argument("--crop-size", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=150, help="steps of the teacher and of the student (batch 64)")
    parser.add_argument("--train-images", type=int, default=300)
    parser.add_argument("--test-images", type=int, default=150)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's 0.02 x batch size / 16")
    parser.add_argument("--roi-per-image", type=int, default=32, help="sampled RoIs per image (512 in the paper recipe; fewer is faster on a CPU)")
    parser.add_argument("--head", default="fpn", choices=["c4", "fpn"], help="fpn: C4's res5 on every RoI is ~6x slower on a CPU")
    parser.add_argument("--seeds", default="0,1", help="detector seeds (head init, data order, random-init backbone)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    args.lr = args.lr or 0.02 * args.batch_size / 16
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="seed-detection-bench-"))
    try:
        voc, _ = write_synthetic(work / "data", args.train_images, args.test_images, args.image_size, seed=0)
        knn = None
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
        else:
            checkpoint, knn = train_student(work, args)
        pretrain_s = time.time() - started
        trained = load_backbone(checkpoint)
        small_images = trained.conv1.weight.shape[-1] == 3 if hasattr(trained, "conv1") else False
        seeds = [int(s) for s in args.seeds.split(",")]
        names = {"trained": f"{trained.arch} SEED student" if knn is not None else f"{trained.arch} {checkpoint.name}", "random": f"{trained.arch} random init"}
        runs: dict[str, list[dict]] = {key: [] for key in names}
        for seed in seeds:
            torch.manual_seed(seed)
            random_path = work / f"random-init-{seed}.pt"
            export_model(random_path, trained.arch, create_backbone(trained.arch, small_images=small_images), None, None, "random", {}, small_images)
            for key, path in (("trained", checkpoint), ("random", random_path)):
                config = make_config(DetectionConfig, {
                    "checkpoint": str(path), "dataset": "voc", "data": str(voc), "engine": "torchvision", "head": args.head,
                    "image_size": args.image_size, "max_iter": args.max_iter, "batch_size": args.batch_size, "lr": args.lr,
                    "roi_per_image": args.roi_per_image, "warmup_iters": min(100, args.max_iter // 5), "num_workers": 0, "seed": seed,
                    "resume": "never", "accelerator": "cpu", "output": str(work / "runs" / f"{key}-{seed}"), "checkpoint_every": 0,
                })
                results = detect(config)
                runs[key].append({k: results["metrics"][k] for k in METRICS} | {"seed": seed, "time_s": results["seconds"]})
        total_s = time.time() - started
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    stats = {key: {k: mean_std([r[k] for r in rows]) for k in METRICS} for key, rows in runs.items()}
    rows = [[names[key], *(f"{m:.1f} ± {s:.1f}" for m, s in (stats[key][k] for k in METRICS)),
             f"{np.mean([r['time_s'] for r in runs[key]]):.0f}"] for key in runs]
    per_seed = [[names[key], r["seed"], *(f"{r[k]:.1f}" for k in METRICS)] for key in runs for r in runs[key]]
    gaps = [t["VOC07_AP50"] - r["VOC07_AP50"] for t, r in zip(runs["trained"], runs["random"], strict=True)]
    gap, gap_std = mean_std(gaps)
    gap_coco = np.mean([t["AP50"] - r["AP50"] for t, r in zip(runs["trained"], runs["random"], strict=True)])
    spread = max(stats[key]["VOC07_AP50"][1] for key in runs)
    if min(gaps) > 0 and gap > spread:
        verdict = "beats random init on every seed, by more than the seed-to-seed spread"
    elif gap > 0:
        verdict = "is ahead of random init on average, but not by more than the seed-to-seed spread"
    else:
        verdict = "does not beat random init"
    notes = [f"The student {verdict}: VOC07 AP50 {stats['trained']['VOC07_AP50'][0]:.1f} vs {stats['random']['VOC07_AP50'][0]:.1f}, "
             f"a gap of {gap:+.1f} points (per-seed gaps {', '.join(f'{g:+.1f}' for g in gaps)}; std over seeds of either backbone at most "
             f"{spread:.1f}); COCO AP50 gap {gap_coco:+.1f}.",
             f"Noise: {len(seeds)} detector seeds on {args.test_images} test images; the student itself is one pretraining run, so its own "
             "seed-to-seed variation is not in the ± figures.",
             "Context: the three classes differ by colour and shape, which a randomly initialised network also learns within a few "
             "hundred iterations, so this data leaves pretraining little room; on real images it matters far more (MoCo's VOC table: "
             "random init is ~20 AP50 behind)."]
    if knn is not None:
        notes.append("What the student learned before detection (kNN top-1 on held-out object crops, 4 classes incl. background): "
                     + ", ".join(f"{name} {score:.1f}" for name, score in knn.items()) + ".")
    notes.append(f"Run time: {pretrain_s:.0f} s making the student, {total_s - pretrain_s:.0f} s for the {2 * len(seeds)} detection runs, "
                 f"{total_s:.0f} s in all.")
    description = (
        f"Faster R-CNN {args.head.upper()} (torchvision engine, `seed-eval detection`'s code path) on synthetic VOC-format data: "
        f"{args.train_images} train / {args.test_images} test images of {args.image_size}px noise with 1-3 coloured shapes "
        "(3 classes), real VOC XML, VOC07 11-point AP50 and pycocotools AP. "
        f"Both backbones train with the same detector and schedule: {args.max_iter} iterations, batch {args.batch_size}, lr {args.lr:g} "
        f"(the recipe's 0.02 scaled to the batch), {args.roi_per_image} RoIs per image, BatchNorm trained, seeds {args.seeds}.\n\n"
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
        "tables": [
            {"caption": f"Mean ± std over {len(seeds)} seeds (AP in %, time per detection run in s).",
             "columns": ["backbone", "AP", "AP50", "AP75", "VOC07 AP50", "time s"], "rows": rows},
            {"caption": "Per seed.", "columns": ["backbone", "seed", "AP", "AP50", "AP75", "VOC07 AP50"], "rows": per_seed},
        ],
        "plots": [{"file": "detection.png", "title": "Detection transfer: student vs random init", "xlabel": "metric", "ylabel": "%",
                   "kind": "bar", "series": [{"label": names[key], "x": list(METRICS), "y": [stats[key][k][0] for k in METRICS],
                                              "yerr": [stats[key][k][1] for k in METRICS]} for key in runs]}],
        "notes": notes,
        "data": {"settings": {k: v for k, v in vars(args).items()}, "small_images": small_images, "runs": runs, "knn": knn,
                 "pretrain_s": round(pretrain_s, 1), "total_s": round(total_s, 1)},
    })


if __name__ == "__main__":
    main()
