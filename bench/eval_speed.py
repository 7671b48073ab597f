"""Evaluation speed: frozen-feature extraction in images/s, and `seed-eval linear --fast` against the standard protocol.

Extraction is `downstream.features.cached_features`, the code kNN, the fast
linear probe, semi and transfer read features through: Fashion-MNIST images
through the evaluation transform and the default loader workers into a frozen
r18 in eval mode, batch 256, on the CPU; the first call extracts and writes
the cache, the second reads it. The model alone on random tensors of the same
batch shows whether loading or the forward pass bounds extraction.

The linear probes are the real commands, run as a user runs them (a fresh
process each, cache folder of its own): `seed-eval linear --fast` with an
empty cache (extracts 60k + 10k features, then 100 epochs on them) and with a
warm one, and the standard protocol (augmented images through the engine,
100 epochs) measured for `--standard-epochs` real epochs and a 1-step run
(its fixed cost: start-up, the engine, scoring val), then extrapolated to 100
epochs. Speed does not depend on the weights, so by default the checkpoint is
a randomly initialised r18 (`--checkpoint` takes a real one).

    python -m bench.eval_speed                         # the suite's CPU run (~5 min on 2 idle cores)
    python -m bench.eval_speed --sizes 32,96 --standard-epochs 2
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT, write_result
from downstream.common import EvalConfig, open_checkpoint
from downstream.features import cached_features, open_split
from seed.backbones import create_backbone
from seed.checkpoints import export_model
from seed.loaders import default_workers

#: Images extracted per size: enough batches of 256 for a steady rate within seconds on a CPU.
IMAGES = {32: 10240, 64: 5120, 96: 2560, 128: 1536, 160: 1024, 224: 512}
EPOCHS = 100  # the standard protocol's


def extraction(checkpoint: Path, size: int, images: int, batch_size: int, cache: Path) -> dict[str, float]:
    """Images/s of the first (extracting) and the second (cached) `cached_features` call, and of the model alone."""
    os.environ["SEED_CACHE"] = str(cache)
    config = EvalConfig(checkpoint=str(checkpoint), data="fashion-mnist", image_size=size, batch_size=batch_size, accelerator="cpu")
    model = open_checkpoint(config)
    dataset = open_split(config, "train")
    indices = torch.arange(min(images, len(dataset)))
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        found = cached_features(model, config, "train", dataset, indices)
        timings.append(time.perf_counter() - started)
    assert found.features.shape == (len(indices), model.backbone.feature_dim)
    batch = torch.randn(batch_size, 3, size, size)
    backbone = model.backbone.eval()
    with torch.no_grad():
        backbone(batch)
        started = time.perf_counter()
        backbone(batch)
        forward = time.perf_counter() - started
    return {"images": len(indices), "uncached_s": timings[0], "cached_s": timings[1], "uncached_img_s": len(indices) / timings[0],
            "cached_img_s": len(indices) / timings[1], "model_img_s": batch_size / forward, "workers": default_workers(config)}


def threads_text() -> str:
    threads = torch.get_num_threads()
    return f"{threads} torch thread{'s' if threads != 1 else ''}"


def seed_eval(args: list[str], cache: Path, threads: int | None) -> tuple[float, dict]:
    """Wall time of one `seed-eval` command in a fresh process (with `threads` torch threads when given), and its results.json."""
    env = {**os.environ, "SEED_CACHE": str(cache), "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    output = Path(args[args.index("--output") + 1])
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "downstream.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"seed-eval {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds, json.loads((output / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to time (default: a randomly initialised r18; speed does not depend on the weights)")
    parser.add_argument("--sizes", default="32,96,224", help="image sizes of the extraction measurement, comma-separated")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--standard-epochs", type=int, default=1, help="real epochs of the standard protocol measured before extrapolating to 100")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads, here and in the seed-eval commands (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="seed-eval-speed-"))
    try:
        checkpoint = Path(args.checkpoint) if args.checkpoint else work / "r18-random.pt"
        if not args.checkpoint:
            torch.manual_seed(0)
            export_model(checkpoint, "r18", create_backbone("r18"), None, None, "random", {}, False)
        sizes = [int(s) for s in args.sizes.split(",")]
        extract = {size: extraction(checkpoint, size, IMAGES.get(size, 512), args.batch_size, work / f"cache-{size}") for size in sizes}

        common = ["--checkpoint", str(checkpoint), "--data", "fashion-mnist", "--image-size", "32", "--accelerator", "cpu"]
        linear_cache = work / "cache-linear"
        fast_cold, fast = seed_eval(["linear", "--fast", *common, "--output", str(work / "fast")], linear_cache, args.threads)
        fast_warm, _ = seed_eval(["linear", "--fast", *common, "--output", str(work / "fast")], linear_cache, args.threads)
        one_step, _ = seed_eval(["linear", *common, "--epochs", "1", "--max-steps", "1", "--resume", "never", "--output", str(work / "step")],
                                linear_cache, args.threads)
        measured, standard = seed_eval(["linear", *common, "--epochs", str(args.standard_epochs), "--resume", "never", "--output", str(work / "standard")],
                                       linear_cache, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_epoch = (measured - one_step) / args.standard_epochs
    standard_100 = one_step + EPOCHS * per_epoch
    train_images = fast["settings"]["train_images"]

    extraction_rows = [[f"{size}px", e["images"], f"{e['uncached_img_s']:.0f}", f"{e['cached_img_s']:,.0f}",
                        f"{e['uncached_s']:.1f} s → {e['cached_s']:.2f} s", f"{e['model_img_s']:.0f}"] for size, e in extract.items()]
    linear_rows = [
        ["`--fast`, empty cache (extract 70k features, then 100 epochs)", "measured", f"{fast_cold:.0f} s"],
        ["`--fast`, features cached", "measured", f"{fast_warm:.0f} s"],
        [f"standard, {args.standard_epochs} epoch{'s' if args.standard_epochs > 1 else ''} ({train_images // 256} steps of 256 augmented images each)",
         "measured", f"{measured:.0f} s"],
        ["standard, fixed cost (start-up, engine, val scoring: a 1-step run)", "measured", f"{one_step:.0f} s"],
        ["standard, one epoch", f"({measured:.0f} − {one_step:.0f}) / {args.standard_epochs}", f"{per_epoch:.0f} s"],
        [f"standard, {EPOCHS} epochs (the protocol)", f"**extrapolated**: {one_step:.0f} + {EPOCHS} × {per_epoch:.0f}",
         f"{standard_100:,.0f} s ({standard_100 / 3600:.1f} h)"],
    ]
    notes = [
        f"`--fast` saves {standard_100 / fast_cold:.0f}x against the standard protocol with an empty cache and {standard_100 / fast_warm:.0f}x with "
        f"cached features ({fast_cold:.0f} s and {fast_warm:.0f} s against an extrapolated {standard_100 / 3600:.1f} h) on Fashion-MNIST 32px; "
        f"its top-1 here ({fast['metrics']['top1']:.1f}, {'a randomly initialised r18' if not args.checkpoint else checkpoint.name}) is not "
        "compared: `--fast` skips the augmentation, which costs a few points on real checkpoints.",
        "Cached features load at " + ", ".join(f"{e['cached_img_s']:,.0f} img/s ({size}px)" for size, e in extract.items())
        + ": a second kNN, fast-linear, semi or transfer run on the same checkpoint and data runs no forward pass.",
    ]
    for size, e in extract.items():
        bound = "the model" if e["model_img_s"] < 1.5 * e["uncached_img_s"] else "data loading"
        notes.append(f"{size}px: extraction runs at {e['uncached_img_s']:.0f} img/s against {e['model_img_s']:.0f} img/s for the forward pass alone, "
                     f"so {bound} bounds it.")
    notes.append(f"Run time {time.time() - started:.0f} s.")
    write_result("eval_speed", {
        "title": "Evaluation speed (CPU)",
        "order": 45,
        "command": "python -m bench.eval_speed",
        "description": __doc__.split("\n\n")[1].strip() + "\n\n" + __doc__.split("\n\n")[2].strip(),
        "tables": [
            {"caption": f"Feature extraction, r18 on Fashion-MNIST, batch {args.batch_size}, {extract[sizes[0]]['workers']} loader workers, "
                        f"{threads_text()} (images/s; the first call extracts and writes the cache, the second reads it).",
             "columns": ["size", "images", "extract img/s", "cached img/s", "first → second call", "forward only img/s"], "rows": extraction_rows},
            {"caption": f"`seed-eval linear` on Fashion-MNIST 32px (60k train / 10k val), r18, batch 256, {threads_text()}: "
                        "wall time of the whole command (the standard runs score val on the features the fast runs cached).",
             "columns": ["run", "how", "wall time"], "rows": linear_rows},
        ],
        "plots": [{"file": "eval_speed.png", "title": "Feature extraction, r18, batch 256 (CPU)", "xlabel": "image size (px)", "ylabel": "images/s",
                   "logy": True, "series": [{"label": "extract (first call)", "x": sizes, "y": [extract[s]["uncached_img_s"] for s in sizes]},
                                            {"label": "cached (second call)", "x": sizes, "y": [extract[s]["cached_img_s"] for s in sizes]},
                                            {"label": "forward pass alone", "x": sizes, "y": [extract[s]["model_img_s"] for s in sizes]}]}],
        "notes": notes,
        "data": {"settings": vars(args), "extraction": extract,
                 "linear": {"fast_empty_cache_s": fast_cold, "fast_cached_s": fast_warm, "fast_top1": fast["metrics"]["top1"],
                            "standard_one_step_s": one_step, "standard_measured_s": measured, "standard_epochs_measured": args.standard_epochs,
                            "standard_epoch_s": per_epoch, "standard_100_epochs_extrapolated_s": standard_100}},
    })


if __name__ == "__main__":
    main()
