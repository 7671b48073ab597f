"""How a teacher learns: kNN and linear top-1 of its kept epoch checkpoints under the evaluation protocol, random init as the floor.

Each run was trained with ``--keep-checkpoints`` (the reference teacher of ``make teacher`` is), so
``<run>/checkpoints/epoch-E.ckpt`` holds the network after E epochs. Every checkpoint gets the
BatchNorm statistics its export would get (PreciseBN over the run's own ``--precise-bn-images``
monitor-bank images) and is scored by ``seed-eval compare``'s protocol: the whole train split as
kNN bank and probe training set, the whole val split as queries, kNN k = 200 and 20 (tau 0.07),
the fast linear probe. Random init of the same architecture and stem (3 seeds) is the floor.
The x-axis is epochs; the run's own log gives the minutes (training wall time, monitor included).

    python -m bench.teacher_curve                               # the reference teacher ($SEED_CACHE/reference-teacher)
    python -m bench.teacher_curve --run DIR --run DIR2 --epochs 1,2,5,10,15,20
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.common import RESULTS, describe_machine, mean_std, reference_teacher_dir, training_minutes, write_result
from bench.render import markdown_table
from downstream.common import Checkpoint, state_digest
from downstream.compare import KNN_KS, METRICS, CompareConfig, Protocol, open_file, random_init_file, small_image_stem
from seed.checkpoints import load_backbone
from seed.loaders import monitor_loaders
from seed.module import precise_bn
from seed.registry import method_config


def kept(run: Path) -> dict[int, Path]:
    """Epoch -> kept checkpoint of ``run``."""
    return {int(p.stem.split("-")[1]): p for p in sorted((run / "checkpoints").glob("epoch-*.ckpt"))}


def settled(path: Path, loader, images: int) -> Checkpoint:
    """The checkpoint's backbone with PreciseBN statistics, identified by the digest of its weights and statistics."""
    backbone = precise_bn(load_backbone(path), loader, images)
    return Checkpoint(path, state_digest(backbone), backbone.arch, "seed Lightning checkpoint + PreciseBN", backbone)


def show() -> None:
    """The measured curve as a table, e.g. at the end of ``make demo``: how long a teacher must train to beat random init."""
    path = RESULTS / "teacher_curve.json"
    if not path.is_file():
        sys.exit(f"no measured curve in {path}: python -m bench.teacher_curve (after make teacher)")
    result = json.loads(path.read_text())
    print(f"{result['title']}, measured by `{result['command']}` on {describe_machine(result['machine'])}:")
    print(markdown_table(result["tables"][0]))
    print("\n".join(f"- {note}" for note in result["notes"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", help="run folder trained with --keep-checkpoints (default: the reference teacher)")
    parser.add_argument("--epochs", default="1,2,3,4,5,10,20", help="epochs to score (those kept)")
    parser.add_argument("--seeds", type=int, default=3, help="random-init seeds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--show", action="store_true", help="measure nothing: print the curve last measured (bench/results/teacher_curve.json)")
    args = parser.parse_args()
    if args.show:
        show()
        return
    torch.set_num_threads(args.threads)
    runs = [Path(r) for r in args.run] if args.run else [reference_teacher_dir()]
    for run in runs:
        if not (run / "checkpoints").is_dir():
            sys.exit(f"{run} has no checkpoints/ (train it with --keep-checkpoints; the reference teacher: make teacher)")
    wanted = {int(e) for e in args.epochs.split(",")}
    first_config = method_config("pretrain", {"config": str(runs[0] / "config.yaml")})
    protocol = Protocol(CompareConfig(data=first_config.data, image_size=first_config.image_size, num_workers=0))

    curves, floors, series, rows = {}, {}, [], []
    for run in runs:
        config = method_config("pretrain", {"config": str(run / "config.yaml")})
        bank = monitor_loaders(config)[0]
        label = f"{config.arch} {config.method} ({run.name})"
        points = {epoch: path for epoch, path in kept(run).items() if epoch in wanted}
        curves[label] = {}
        for epoch, path in points.items():
            print(f"{label}: epoch {epoch}", flush=True)
            curves[label][epoch] = protocol.score(settled(path, bank, config.precise_bn_images))
        first = open_file(next(iter(points.values())))
        floor_key = (first.arch, small_image_stem(first.backbone))
        if floor_key not in floors:
            floors[floor_key] = [protocol.score(open_file(random_init_file(*floor_key, seed))) for seed in range(args.seeds)]
        minutes = training_minutes(run)
        for epoch, score in curves[label].items():
            rows.append([label, str(epoch), f"{minutes.get(epoch - 1, float('nan')):.0f}", *(f"{score[m]:.2f}" for m in METRICS)])
        for metric in ("knn_k200", "linear"):
            series.append({"label": f"{label}: {METRICS[metric]}", "x": list(curves[label]), "y": [s[metric] for s in curves[label].values()]})
    for (arch, _small), scores in floors.items():
        stats = [mean_std([s[m] for s in scores]) for m in METRICS]
        rows.insert(0, [f"{arch} random init ({args.seeds} seeds)", "0", "0", *(f"{m:.2f} ± {s:.2f}" for m, s in stats)])
        for metric in ("knn_k200", "linear"):
            mean = mean_std([s[metric] for s in scores])[0]
            xs = sorted({e for c in curves.values() for e in c})
            series.append({"label": f"{arch} random init: {METRICS[metric]}", "x": xs, "y": [mean] * len(xs)})
    notes = []
    for label, curve in curves.items():
        last = max(curve)
        floor = floors[next(iter(floors))]
        gains = {m: curve[last][m] - mean_std([s[m] for s in floor])[0] for m in METRICS}
        notes.append(f"{label} after {last} epochs vs random init: kNN k=200 {gains['knn_k200']:+.2f}, k=20 {gains['knn_k20']:+.2f}, "
                     f"linear {gains['linear']:+.2f} points.")
    write_result("teacher_curve", {
        "title": "Teacher learning curves under the evaluation protocol",
        "order": 9,
        "command": " ".join(["python -m bench.teacher_curve", *sys.argv[1:]]),
        "description": (f"{first_config.data} {first_config.image_size}px: every point is a kept epoch checkpoint with PreciseBN statistics, "
                        f"scored with all train images as kNN bank / probe set and all val images as queries (kNN k = {KNN_KS[0]} and {KNN_KS[1]}, tau 0.07; "
                        "`seed-eval linear --fast`). Minutes: the run's training wall time at that epoch end, from its own log "
                        "(monitor included; inflated when the machine was shared)."),
        "tables": [{"caption": "", "columns": ["network", "epoch", "train min", *METRICS.values()], "rows": rows}],
        "plots": [{"file": "teacher_curve.png", "title": "Teacher top-1 vs epochs (full protocol)", "xlabel": "epoch", "ylabel": "top-1 %",
                   "kind": "line", "series": series}],
        "notes": notes,
        "data": {"curves": {k: {str(e): s for e, s in c.items()} for k, c in curves.items()},
                 "random_init": {f"{a} {'small' if s else 'standard'} stem": v for (a, s), v in floors.items()}},
    })


if __name__ == "__main__":
    main()
