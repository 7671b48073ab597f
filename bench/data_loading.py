"""Data loading: images/s of our train loader with N workers against the model step's, to show which bounds training.

The loader is the real one: ``seed.loaders.make_loader`` over ``seed.data.load_dataset``
with ``seed-distill``'s transform (one MoCo v2 view, ``seed.distill.train_transform``)
and ``seed-pretrain --method mocov2``'s (two MoCo v2 views), on Fashion-MNIST at
32px as in the demo, and on synthetic JPEG photos written to a temporary
ImageFolder (sources 2 x 1.5 times the crop size, as ImageNet's 500x375 are to
224) at a larger size. Each loader is timed in steady state (after the first
batch of every worker); worker counts run interleaved round-robin. The model
steps it is compared with are our SEED step (teacher -> student, ``seed-distill``'s
teacher settings) and the student's MoCo v2 step, on random tensors of the same
batch; interleaved with them, the SEED step fed by its loader with the default
workers shows what training actually gets. Writes ``bench/results/data_loading.json``
(``data_loading_gpu.json`` with ``--device cuda``).

    python -m bench.data_loading                        # CPU: Fashion-MNIST 32px and synthetic 96px (about 3 min on 2 cores)
    python -m bench.data_loading --device cuda --datasets fashion-mnist:32:256,synthetic:224:256 --workers 0,4,8,16
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import write_result
from bench.speed import interleaved, mocov2_step, ours_step, parse_speed_args, result_name, seed_module, teacher_parts, teacher_variant
from seed.data import load_dataset, view_transform
from seed.distill import train_transform
from seed.errors import SeedError
from seed.loaders import default_workers, make_loader
from seed.registry import method_config

LOADERS = {"1 view (seed-distill)": "seed", "2 views (seed-pretrain mocov2)": "mocov2"}


def write_photos(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` smooth random colour images as JPEG (quality 90), 2 x 1.5 times ``size``, in 4 class folders under train/."""
    rng = np.random.default_rng(seed)
    width, height = 2 * size, round(1.5 * size)
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        path = folder / "train" / str(index % 4) / f"{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def transform(kind: str, size: int):
    """The training transform each command builds: seed-distill's one view, or seed-pretrain mocov2's two."""
    if kind == "seed":
        return train_transform(method_config("distill", {"image_size": size}))
    return view_transform("mocov2", size)


def loader_rate(data: str, kind: str, size: int, batch: int, workers: int, batches: int) -> float:
    """Steady-state images/s of ``make_loader`` with ``workers`` processes: the clock starts once every worker delivered a batch."""
    config = method_config("distill", {"batch_size": batch, "num_workers": workers})
    loader = make_loader(load_dataset(data, "train", transform=transform(kind, size)), config, shuffle=True, drop_last=True)
    iterator = iter(loader)
    for _ in range(max(1, workers)):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * batch / (time.perf_counter() - start)
    del iterator, loader
    gc.collect()
    return rate


def fed_step(data: str, size: int, batch: int, step, images: torch.Tensor, device: str) -> tuple[Any, int]:
    """``step`` fed by its loader with the default workers (``--num-workers`` unset): the batch is fetched (waiting for the
    workers when they fall behind) and copied into ``images`` inside the timed step. Returns the step and the workers."""
    config = method_config("distill", {"batch_size": batch})
    loader = make_loader(load_dataset(data, "train", transform=transform("seed", size)), config, shuffle=True, drop_last=True)

    def batches():
        while True:
            yield from loader

    source = batches()

    def fed() -> dict[str, float]:
        images.copy_(next(source)[0].to(device, non_blocking=True))
        return step()

    return fed, default_workers(config)


def parse_datasets(text: str) -> list[tuple[str, int, int]]:
    """``fashion-mnist:32:128,synthetic:96:32`` -> [(data, image size, batch), ...]."""
    found = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3:
            raise SystemExit(f"--datasets {text!r}: expected data:image_size:batch_size, e.g. fashion-mnist:32:128")
        found.append((parts[0], int(parts[1]), int(parts[2])))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="fashion-mnist:32:128,synthetic:96:32", help="data:image_size:batch_size, comma-separated; "
                        "'synthetic' writes JPEG photos to a temporary ImageFolder")
    parser.add_argument("--workers", default="0,1,2,4", type=lambda text: [int(w) for w in text.split(",")])
    parser.add_argument("--batches", type=int, default=10, help="batches timed per loader measurement")
    parser.add_argument("--rounds", type=int, default=2, help="loader measurements per worker count (medians), and model steps")
    parser.add_argument("--steps", type=int, default=4, help="timed model steps per variant (medians): SEED and MoCo v2 on ready tensors, "
                        "SEED fed by its loader, interleaved")
    parser.add_argument("--teacher", default="r50")
    parser.add_argument("--student", default="r18")
    parser.add_argument("--queue-size", type=int, default=65536)
    args = parse_speed_args(parser)
    gpu = args.device.startswith("cuda")
    warnings.filterwarnings("ignore", ".*worker processes in total.*")  # more workers than cores is part of the measurement
    datasets = parse_datasets(args.datasets)
    load_before = os.getloadavg()
    backbone, head = teacher_parts(args.teacher)
    results, tables, plots, notes = {}, [], [], []
    with tempfile.TemporaryDirectory(prefix="seed-bench-") as tmp:
        for data, size, batch in datasets:
            name = data
            if data == "synthetic":
                count = batch * (args.batches + max(args.workers) + 2)
                data = str(Path(tmp) / f"photos{size}")
                write_photos(Path(data), count, size)
                name = f"synthetic JPEG ({2 * size}x{round(1.5 * size)})"
            print(f"{name}, {size}px, batch {batch}", flush=True)
            try:
                rates: dict[str, dict[int, list[float]]] = {label: {w: [] for w in args.workers} for label in LOADERS}
                for _ in range(args.rounds):
                    for workers in args.workers:
                        for label, kind in LOADERS.items():
                            rates[label][workers].append(loader_rate(data, kind, size, batch, workers, args.batches))
            except SeedError as error:
                raise SystemExit(f"data_loading: {error}") from None
            loader = {label: {w: statistics.median(v) for w, v in per.items()} for label, per in rates.items()}
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(args.device)
            module = seed_module(args.student, teacher_variant(backbone, head, args.device, fold_bn=True, channels_last=gpu),
                                 args.queue_size, size).to(args.device)
            seed_step = ours_step(module, images, args.device, bf16=gpu)
            fed_seed, fed_workers = fed_step(data, size, batch, seed_step, images, args.device)
            model = interleaved({"seed": seed_step, "mocov2": mocov2_step(args.student, args.queue_size, size, images, args.device, bf16=gpu),
                                 "fed": fed_seed}, args.steps, args.device)
            model_rate = {"seed": batch / model["seed"]["step_s"], "mocov2": batch / model["mocov2"]["step_s"]}
            fed = batch / model["fed"]["step_s"]
            results[name] = {"size": size, "batch": batch, "loader_img_s": loader, "model_img_s": model_rate, "fed_img_s": fed, "fed_workers": fed_workers}
            del module, seed_step, fed_seed
            gc.collect()

            rows = [[label, *[f"{loader[label][w]:.0f}" for w in args.workers],
                     f"{model_rate[kind]:.0f} ({'SEED ' + args.teacher + ' → ' + args.student if kind == 'seed' else 'MoCo v2 ' + args.student})"]
                    for label, kind in LOADERS.items()]
            tables.append({"caption": f"**{name}**, {size}px, batch {batch}: loader images/s by workers, and the model step's images/s "
                                      f"(random tensors, {args.device}):",
                           "columns": ["transform", *[f"{w} worker{'s' if w != 1 else ''}" for w in args.workers], "model step"], "rows": rows})
            plots.append({"file": f"{result_name('data_loading', args.device)}_{size}.png", "title": f"{name}, {size}px, batch {batch}",
                          "xlabel": "loader workers", "ylabel": "images/s", "logy": True,
                          "series": [*[{"label": f"loader, {label}", "x": args.workers, "y": [loader[label][w] for w in args.workers]} for label in LOADERS],
                                     {"label": f"SEED step {args.teacher} → {args.student}", "x": args.workers, "y": [model_rate["seed"]] * len(args.workers)},
                                     {"label": f"MoCo v2 step {args.student}", "x": args.workers, "y": [model_rate["mocov2"]] * len(args.workers)}]})
            for label, kind in LOADERS.items():
                enough = [w for w in args.workers if loader[label][w] >= model_rate[kind]]
                best = max(args.workers, key=lambda w: loader[label][w])
                bound = (f"the loader keeps up from {enough[0]} worker{'s' if enough[0] != 1 else ''} on, so the model step bounds training"
                         if enough else f"no worker count keeps up (best {loader[label][best]:.0f} with {best}), so loading bounds training")
                notes.append(f"{name}, {size}px, {label}: the loader gives {loader[label][args.workers[0]]:.0f} images/s with "
                             f"{args.workers[0]} workers and {loader[label][best]:.0f} at best ({best} worker{'s' if best != 1 else ''}), against "
                             f"{model_rate[kind]:.0f} for the {'SEED' if kind == 'seed' else 'MoCo v2'} step: {bound}.")
            ratio = fed / model_rate["seed"]
            notes.append(f"{name}, {size}px: the SEED step fed by its loader ({fed_workers} workers, `seed-distill`'s default here) runs at "
                         f"{fed:.0f} images/s, {100 * ratio:.0f}% of the step on ready tensors"
                         + (": loading is hidden behind the step." if ratio >= 0.9 else
                            ": the loader's workers take compute from the step." if not gpu else ": the step waits for data."))
    load_after = os.getloadavg()
    shared = (f" The CPU was shared with other jobs (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} "
              "cores); with 2 cores, more than 2 workers can only compete with each other." if not gpu else "")
    description = (
        "Images/s of our training loader (`seed.loaders.make_loader` over `seed.data.load_dataset`, shuffled, with the run's transform: "
        "`seed-distill`'s one MoCo v2 view, or `seed-pretrain --method mocov2`'s two) against the model step on the same batch: "
        f"our SEED step ({args.teacher} → {args.student}, K = {args.queue_size}, `seed-distill`'s teacher settings) for the one-view loader, "
        f"the student's MoCo v2 step for the two-view one. Loader rates are steady state (timed over {args.batches} batches after each "
        f"worker's first), median of {args.rounds} measurements with the worker counts interleaved. The model steps run on random tensors, "
        f"interleaved with the SEED step fed by its own loader (default workers; the fetch is inside the timed step), median of {args.steps} "
        "steps each; the fed/ready ratio says whether training waits for data. The synthetic data are smooth random "
        "colour photos saved as JPEG in a temporary ImageFolder, 2 x 1.5 times the crop size (ImageNet's 500x375 are about that at 224), "
        "so decoding and RandomResizedCrop work as on real photos; blur is on from 96px, as in the recipe." + shared
        + f" Torch threads: {torch.get_num_threads()}."
    )
    write_result(result_name("data_loading", args.device), {
        "title": "Data loading" + (" (GPU)" if gpu else ""), "order": 50 if not gpu else 51,
        "command": "python " + " ".join(["-m", "bench.data_loading", *sys.argv[1:]]),
        "description": description, "tables": tables, "plots": plots, "notes": notes,
        "data": {"settings": {k: v for k, v in vars(args).items()}, "load_average": [load_before, load_after], "results": results},
    }, device=args.device)


if __name__ == "__main__":
    main()
