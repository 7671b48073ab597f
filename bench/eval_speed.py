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
epochs: that figure is labelled extrapolated wherever it shows, and the headline
ratio is between measured commands (the standard epochs against `--fast`). Speed
does not depend on the weights, so by default the checkpoint is a randomly
initialised r18 (`--checkpoint` takes a real one).

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
from typing import Any

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


def derived(linear: dict[str, float]) -> dict[str, Any]:
    """From the measured wall times: one standard epoch (two measured runs' difference), the headline ratios between measured
    commands, and, labelled as such, the standard protocol's 100 epochs extrapolated from that epoch and its ratios."""
    epochs = linear["standard_epochs_measured"]
    per_epoch = (linear["standard_measured_s"] - linear["standard_one_step_s"]) / epochs
    standard_100 = linear["standard_one_step_s"] + EPOCHS * per_epoch
    return {"standard_epoch_s": per_epoch, "standard_100_epochs_extrapolated_s": standard_100,
            "measured_ratios": {"standard_epochs_over_fast_cached": linear["standard_measured_s"] / linear["fast_cached_s"],
                                "standard_epochs_over_fast_empty_cache": linear["standard_measured_s"] / linear["fast_empty_cache_s"]},
            "extrapolated": {"standard_100_epochs_s": standard_100, "over_fast_cached": standard_100 / linear["fast_cached_s"],
                             "over_fast_empty_cache": standard_100 / linear["fast_empty_cache_s"]}}


def epochs_text(epochs: int) -> str:
    return f"{epochs} epoch{'s' if epochs != 1 else ''}"


def linear_table(linear: dict[str, Any]) -> list[list[str]]:
    """The linear-probe rows: each says how its figure was had (measured, derived from measured runs, or extrapolated)."""
    fast_cold, fast_warm, one_step, measured = (linear[key] for key in ("fast_empty_cache_s", "fast_cached_s", "standard_one_step_s", "standard_measured_s"))
    epochs, per_epoch, standard_100 = linear["standard_epochs_measured"], linear["standard_epoch_s"], linear["standard_100_epochs_extrapolated_s"]
    return [
        [f"`--fast`, empty cache (extract 70k features, then {EPOCHS} epochs)", "measured", f"{fast_cold:.0f} s"],
        ["`--fast`, features cached", "measured", f"{fast_warm:.0f} s"],
        [f"standard, {epochs_text(epochs)} ({linear['train_images'] // 256} steps of 256 augmented images each)", "measured", f"{measured:.0f} s"],
        ["standard, fixed cost (start-up, engine, val scoring: a 1-step run)", "measured", f"{one_step:.0f} s"],
        ["standard, one epoch", f"from the two measured runs above: ({measured:.0f} − {one_step:.0f}) / {epochs}", f"{per_epoch:.0f} s"],
        [f"standard, {EPOCHS} epochs (the protocol), **extrapolated, not measured**", f"**extrapolated**: {one_step:.0f} + {EPOCHS} × {per_epoch:.0f}",
         f"≈ {standard_100:,.0f} s ({standard_100 / 3600:.1f} h), extrapolated"],
    ]


def linear_notes(linear: dict[str, Any], model: str) -> list[str]:
    """The headline, a ratio between measured commands, then the extrapolated figure, labelled as one."""
    epochs, ratios, extrapolated = linear["standard_epochs_measured"], linear["measured_ratios"], linear["extrapolated"]
    return [
        f"`--fast` runs its whole {EPOCHS}-epoch probe in {linear['fast_empty_cache_s']:.0f} s with an empty cache and "
        f"{linear['fast_cached_s']:.0f} s with cached features, and the standard protocol's command took {linear['standard_measured_s']:.0f} s "
        f"for {epochs_text(epochs)} (all three measured): that standard command ran {ratios['standard_epochs_over_fast_cached']:.1f}x as long as "
        f"a whole `--fast` run on cached features and {ratios['standard_epochs_over_fast_empty_cache']:.2f}x as long as one with an empty cache, "
        f"on Fashion-MNIST 32px. The `--fast` top-1 here "
        f"({linear['fast_top1']:.1f}, {model}) is not compared: `--fast` skips the augmentation, which costs a few points on real checkpoints.",
        f"Extrapolated, not measured: the standard protocol's {EPOCHS} epochs would take about {extrapolated['standard_100_epochs_s'] / 3600:.1f} h "
        f"({linear['standard_one_step_s']:.0f} s + {EPOCHS} × {linear['standard_epoch_s']:.0f} s), {extrapolated['over_fast_empty_cache']:.0f}x "
        f"the `--fast` run with an empty cache and {extrapolated['over_fast_cached']:.0f}x the one with cached features.",
    ]


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
    linear = {"fast_empty_cache_s": fast_cold, "fast_cached_s": fast_warm, "fast_top1": fast["metrics"]["top1"], "standard_one_step_s": one_step,
              "standard_measured_s": measured, "standard_epochs_measured": args.standard_epochs, "train_images": fast["settings"]["train_images"]}
    linear |= derived(linear)

    extraction_rows = [[f"{size}px", e["images"], f"{e['uncached_img_s']:.0f}", f"{e['cached_img_s']:,.0f}",
                        f"{e['uncached_s']:.1f} s → {e['cached_s']:.2f} s", f"{e['model_img_s']:.0f}"] for size, e in extract.items()]
    linear_rows = linear_table(linear)
    notes = [*linear_notes(linear, "a randomly initialised r18" if not args.checkpoint else checkpoint.name),
             "Cached features load at " + ", ".join(f"{e['cached_img_s']:,.0f} img/s ({size}px)" for size, e in extract.items())
             + ": a second kNN, fast-linear, semi or transfer run on the same checkpoint and data runs no forward pass."]
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
                        "wall time of the whole command, measured except where the row says extrapolated (the standard runs score val on the "
                        "features the fast runs cached).",
             "columns": ["run", "how", "wall time"], "rows": linear_rows},
        ],
        "plots": [{"file": "eval_speed.png", "title": "Feature extraction, r18, batch 256 (CPU)", "xlabel": "image size (px)", "ylabel": "images/s",
                   "logy": True, "series": [{"label": "extract (first call)", "x": sizes, "y": [extract[s]["uncached_img_s"] for s in sizes]},
                                            {"label": "cached (second call)", "x": sizes, "y": [extract[s]["cached_img_s"] for s in sizes]},
                                            {"label": "forward pass alone", "x": sizes, "y": [extract[s]["model_img_s"] for s in sizes]}]}],
        "notes": notes,
        "data": {"settings": vars(args), "extraction": extract, "linear": linear},
    })


if __name__ == "__main__":
    main()
