"""Detection transfer on synthetic VOC data: a trained backbone vs the same architecture at random init, in AP50.

The data are coloured rectangles and ellipses on noise written in the real
VOCdevkit layout (``downstream.detection_data.write_synthetic``), so the whole
``seed-eval detection`` path runs: VOC XML reader, torchvision Faster R-CNN,
VOC07 11-point AP50 and pycocotools AP. Without ``--checkpoint`` the trained
backbone is a MoCo v2 r18 pretrained for ``--pretrain-epochs`` on the
synthetic training images with ``seed-pretrain`` (minutes on a CPU; a stand-in
for a real student). Results go to ``bench/results/detection.json``.

    python bench/detection_bench.py                                  # quick CPU run
    python bench/detection_bench.py --checkpoint runs/distill/x/student.pt --image-size 128 --max-iter 2000
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from downstream.detection import DetectionConfig, detect
from downstream.detection_data import write_synthetic
from pretrain.cli import main as pretrain_main
from seed.backbones import create_backbone
from seed.checkpoints import export_model, load_backbone
from seed.config import make_config

RESULTS = Path(__file__).parent / "results" / "detection.json"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def quick_pretrain(work: Path, voc: Path, args: argparse.Namespace) -> Path:
    """MoCo v2 on the synthetic training images (an ImageFolder with one class), exported as teacher.pt."""
    folder = work / "pretrain-images"
    for split, sets in (("train", [("VOC2007", "trainval"), ("VOC2012", "trainval")]), ("val", [("VOC2007", "test")])):
        target = folder / split / "images"
        target.mkdir(parents=True, exist_ok=True)
        for year, image_set in sets:
            for name in (voc / year / "ImageSets" / "Main" / f"{image_set}.txt").read_text().split():
                shutil.copy(voc / year / "JPEGImages" / f"{name}.jpg", target / f"{name}.jpg")
    run = work / "pretrain"
    pretrain_main(["--method", "mocov2", "--arch", args.arch, "--data", str(folder), "--image-size", str(args.image_size),
                   "--batch-size", "64", "--epochs", str(args.pretrain_epochs), "--queue-size", "1024", "--knn-every", "0",
                   "--num-workers", str(args.num_workers), "--accelerator", "cpu" if args.cpu else "auto", "--output", str(run)])
    return run / "teacher.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="trained backbone to compare (default: a quick MoCo v2 pretraining here)")
    parser.add_argument("--arch", default="r18", help="architecture of the quick pretraining")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--train-images", type=int, default=300)
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--max-iter", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's 0.02 x batch size / 16")
    parser.add_argument("--roi-per-image", type=int, default=128, help="sampled RoIs per image (512 in the paper recipe; fewer is faster on a CPU)")
    parser.add_argument("--head", default="c4", choices=["c4", "fpn"])
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args()
    args.lr = args.lr or 0.02 * args.batch_size / 16
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="seed-detection-bench-"))
    voc, _ = write_synthetic(work / "data", args.train_images, args.test_images, args.image_size, seed=0)
    started = time.time()
    checkpoint = Path(args.checkpoint) if args.checkpoint else quick_pretrain(work, voc, args)
    pretrain_s = time.time() - started
    trained = load_backbone(checkpoint)
    small_images = trained.conv1.weight.shape[-1] == 3 if hasattr(trained, "conv1") else False
    torch.manual_seed(0)
    random_path = work / "random-init.pt"
    export_model(random_path, trained.arch, create_backbone(trained.arch, small_images=small_images), None, None, "random", {}, small_images)
    rows = {}
    for name, path in ((f"{trained.arch} trained ({checkpoint.name})", checkpoint), (f"{trained.arch} random init", random_path)):
        config = make_config(DetectionConfig, {
            "checkpoint": str(path), "dataset": "voc", "data": str(voc), "engine": "torchvision", "head": args.head,
            "image_size": args.image_size, "max_iter": args.max_iter, "batch_size": args.batch_size, "lr": args.lr, "roi_per_image": args.roi_per_image,
            "warmup_iters": min(100, args.max_iter // 5), "num_workers": args.num_workers, "seed": 0, "resume": "never",
            "accelerator": "cpu" if args.cpu else "auto", "output": str(work / "runs" / path.stem), "checkpoint_every": 0,
        })
        results = detect(config)
        rows[name] = {k: results["metrics"].get(k) for k in ("VOC07_AP50", "AP", "AP50", "AP75")} | {"time_s": results["time_s"]["total"]}
    report = {
        "benchmark": "detection transfer, synthetic VOC (3 classes, shapes on noise)",
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("train_images", "test_images", "image_size", "max_iter", "batch_size", "lr", "roi_per_image", "head",
                                               "pretrain_epochs")}
        | {"checkpoint": str(checkpoint), "small_images": small_images, "pretrain_s": round(pretrain_s, 1) if not args.checkpoint else None},
        "results": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"\ndetection transfer on synthetic VOC ({args.train_images} train / {args.test_images} test images, {args.image_size}px, "
          f"{args.max_iter} iterations, batch {args.batch_size}, {args.head})")
    width = max(len(name) for name in rows) + 2
    print(f"{'backbone':<{width}}{'VOC07 AP50':>11}{'COCO AP':>9}{'AP50':>7}{'AP75':>7}{'time s':>8}")
    for name, row in rows.items():
        values = "".join(f"{'n/a' if row[k] is None else f'{row[k]:.1f}':>{w}}" for k, w in (("VOC07_AP50", 11), ("AP", 9), ("AP50", 7), ("AP75", 7)))
        print(f"{name:<{width}}{values}{row['time_s']:>8.0f}")
    print(f"\nwritten: {RESULTS}")


if __name__ == "__main__":
    main()
