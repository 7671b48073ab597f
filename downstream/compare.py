"""``seed-eval compare``: several networks under one protocol, random init of each architecture as the floor.

A claim that training helped is only as good as its baseline (DESIGN.md, "Quality
claims"): random convolutional features are strong on small data, so every table
that says a network learned carries random init of the same architecture, stem and
image size as a row, mean ± std over several init seeds. Every row goes through
the same path here: the whole train split is the kNN bank and the probe's training
set, the whole val split the queries; kNN k = 200 and k = 20 with tau 0.07 (the
weighted vote of ``seed-eval knn``) and the fast linear probe of
``seed-eval linear --fast``. Random-init networks are exported as files
(``export_model``) and read back like any checkpoint, so they take the same loader,
feature cache and scorers as the trained ones.

    seed-eval compare                                  # the demo's teacher and student
    seed-eval compare --checkpoints teacher=t.pt,student=s0.pt,student=s1.pt,student=s2.pt

Rows with the same label are seeds of one network: the table gives their mean ± std.
"""

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from downstream.common import DEMO_CHECKPOINTS, Checkpoint, file_sha256
from downstream.features import DecodedSplit, Features, cache_dir, cached_features, eval_device, open_split
from downstream.knn import knn_metrics, search_name
from downstream.linear import FAST_LR, ProbeConfig, evaluate_head, fit_linear, parse_milestones
from seed.backbones import create_backbone
from seed.checkpoints import export_model, load_encoder
from seed.config import load_config, option
from seed.data import check_classes
from seed.engine import data_name, run_folder
from seed.errors import SeedError
from seed.loaders import default_workers

#: The metrics of every row: kNN top-1 at k = 200 and k = 20 (weighted vote), fast linear probe top-1.
METRICS = {"knn_k200": "kNN k=200", "knn_k20": "kNN k=20", "linear": "linear (fast)"}
KNN_KS = (200, 20)
KNN_TAU = 0.07
#: Both splits decoded once for all rows when they take at most this much memory (Fashion-MNIST at 32 px: 0.86 GB).
DECODED_LIMIT_BYTES = 2e9


@dataclass
class CompareConfig(ProbeConfig):
    """``seed-eval compare``: the probe's optimiser flags plus the networks to compare."""

    checkpoints: str | None = option("networks to compare, comma-separated [label=]path; files sharing a label are seeds of one row "
                                     f"(default: the demo's, {', '.join(DEMO_CHECKPOINTS)})")
    random_init_seeds: int = option("random-init rows: this many init seeds of each architecture in the table (0: none)", 3, at_least=0)


@dataclass
class Row:
    """One line of the table: a label and the scores of each of its files (seeds)."""

    label: str
    scores: list[dict[str, float]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    arch: str = ""  # with its stem: "r18", "r18 (3x3 stem)"
    random_init: bool = False

    def summary(self) -> dict[str, tuple[float, float]]:
        """Mean and sample standard deviation of each metric (std 0 for a single file)."""
        out = {}
        for metric in METRICS:
            values = [s[metric] for s in self.scores]
            out[metric] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        return out


def parse_entries(text: str) -> list[tuple[str, str]]:
    """``label=path,path2`` -> ``[(label, path), (path2, path2)]``; every file must exist."""
    entries = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        label, _, path = part.rpartition("=")
        label = label.strip() or path
        if not Path(path).is_file():
            raise SeedError(f"--checkpoints: {path} is not a file; give comma-separated [label=]path entries")
        entries.append((label, path))
    if not entries:
        raise SeedError("--checkpoints is empty; give comma-separated [label=]path entries")
    return entries


def default_entries() -> list[tuple[str, str]]:
    """The demo's teacher and student, those that exist."""
    found = [(Path(p).stem, p) for p in reversed(DEMO_CHECKPOINTS) if Path(p).is_file()]
    if not found:
        raise SeedError("no --checkpoints given and no demo run found; pass --checkpoints or run make demo")
    return found


def small_image_stem(backbone: nn.Module) -> bool:
    """Whether a registry backbone has the small-image stem (ResNets: no max-pool; others: a stride-1 first conv)."""
    if hasattr(backbone, "maxpool"):
        return isinstance(backbone.maxpool, nn.Identity)
    return tuple(backbone.features[0][0].stride) == (1, 1)


def random_init_file(arch: str, small_images: bool, seed: int) -> Path:
    """A random-init ``arch`` (``torch.manual_seed(seed)`` then ``create_backbone``) exported like a trained network.

    Kept under the feature cache folder: the same bytes every time, so its features are extracted once.
    """
    stem = "small-stem" if small_images else "standard-stem"
    path = cache_dir().parent / "random-init" / f"{arch}-{stem}-seed{seed}.pt"
    if not path.is_file():
        torch.manual_seed(seed)
        backbone = create_backbone(arch, small_images=small_images)
        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(path, arch, backbone, None, None, "random-init", {"seed": seed}, small_images)
    return path


def open_file(path: str | Path, arch: str | None = None) -> Checkpoint:
    backbone, _, found_format = load_encoder(path, arch, use_head=False)
    return Checkpoint(Path(path), file_sha256(path), backbone.arch, found_format, backbone)


class Protocol:
    """The one evaluation: opened once, so every row is scored on the very same bank, queries and recipe."""

    def __init__(self, config: CompareConfig) -> None:
        self.config = config
        self.train_set, self.val_set = open_split(config, "train"), open_split(config, "val")
        check_classes(self.train_set, self.val_set, config.data)
        self.classes = len(self.train_set.classes)
        fits = sum(DecodedSplit.size_bytes(split) for split in (self.train_set, self.val_set)) <= DECODED_LIMIT_BYTES
        self.decoded = {name: DecodedSplit(split, config.batch_size, default_workers(config), f"the {name} split") if fits else None
                        for name, split in (("train", self.train_set), ("val", self.val_set))}
        self.milestones = parse_milestones(config.milestones, config.epochs)
        self.lr = config.lr if config.lr is not None else FAST_LR

    def features(self, checkpoint: Checkpoint) -> tuple[Features, Features]:
        """The whole train split (bank, probe training set) and the whole val split (queries)."""
        return (cached_features(checkpoint, self.config, "train", self.train_set, decoded=self.decoded["train"]),
                cached_features(checkpoint, self.config, "val", self.val_set, decoded=self.decoded["val"]))

    def score(self, checkpoint: Checkpoint) -> dict[str, float]:
        train, val = self.features(checkpoint)
        knn = knn_metrics(train.features, train.labels, val.features, val.labels, self.classes, KNN_KS, KNN_TAU)
        c = self.config
        head = fit_linear(train, self.classes, c.epochs, c.batch_size, self.lr, c.momentum, c.weight_decay, self.milestones, c.seed, eval_device(c))
        return {"knn_k200": knn["top1_k200"], "knn_k20": knn["top1_k20"], "linear": evaluate_head(head, val)["top1"]}

    def settings(self) -> dict:
        c = self.config
        return {"data": c.data, "image_size": c.image_size, "bank": f"train split, {len(self.train_set)} images",
                "queries": f"val split, {len(self.val_set)} images", "knn": {"k": list(KNN_KS), "temperature": KNN_TAU, "vote": "weighted",
                                                                                         "search": search_name("auto", "flat")},
                "linear": {"mode": "fast (cached features)", "epochs": c.epochs, "lr": self.lr, "milestones": self.milestones,
                           "batch_size": c.batch_size, "momentum": c.momentum, "weight_decay": c.weight_decay}}


def compare(entries: list[tuple[str, str]], config: CompareConfig) -> tuple[list[Row], dict]:
    """Score every file of ``entries`` and ``config.random_init_seeds`` random inits of each of their architectures.

    Random-init rows come first, one per (architecture, stem), labelled ``<arch> random init``. Returns the rows and
    the protocol's settings.
    """
    if config.random_init_seeds < 0:
        raise SeedError(f"--random-init-seeds must be 0 or more, got {config.random_init_seeds}")
    protocol = Protocol(config)
    opened = [(label, open_file(path, config.arch)) for label, path in entries]
    rows: dict[str, Row] = {}
    for arch, small in dict.fromkeys((c.arch, small_image_stem(c.backbone)) for _, c in opened):
        for seed in range(config.random_init_seeds):
            _add(rows, f"{stem_name(arch, small)} random init", open_file(random_init_file(arch, small, seed)), protocol, random_init=True)
    for label, checkpoint in opened:
        _add(rows, label, checkpoint, protocol)
    return list(rows.values()), protocol.settings()


def stem_name(arch: str, small: bool) -> str:
    """``r18``, or ``r18 (small-image stem)`` (ResNets: 3x3 stride-1 conv1, no max-pool; others: a stride-1 first conv)."""
    return f"{arch} (small-image stem)" if small else arch


def _add(rows: dict[str, Row], label: str, checkpoint: Checkpoint, protocol: Protocol, random_init: bool = False) -> None:
    print(f"scoring {label}: {checkpoint.path}", flush=True)
    arch = stem_name(checkpoint.arch, small_image_stem(checkpoint.backbone))
    row = rows.setdefault(label, Row(label, arch=arch, random_init=random_init))
    if row.arch != arch:
        raise SeedError(f"--checkpoints: the files labelled '{label}' are not one architecture ({row.arch} and {arch}); give them different labels")
    row.scores.append(protocol.score(checkpoint))
    row.files.append(str(checkpoint.path))


def markdown(rows: list[Row]) -> str:
    """The table as Markdown: mean ± std (n files) of every metric."""
    lines = ["| network | n | " + " | ".join(METRICS.values()) + " |", "|---|---|" + "---|" * len(METRICS)]
    for row in rows:
        cells = [f"{m:.2f} ± {s:.2f}" if len(row.scores) > 1 else f"{m:.2f}" for m, s in row.summary().values()]
        lines.append(f"| {row.label} | {len(row.scores)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gains(rows: list[Row]) -> list[str]:
    """One line per trained row: its mean gain over the random-init row of the same architecture and stem, in points."""
    floors = {r.arch: r for r in rows if r.random_init}
    lines = []
    for row in rows:
        floor = floors.get(row.arch)
        if floor is None or row.random_init:
            continue
        mine, base = row.summary(), floor.summary()
        lines.append(f"{row.label} vs {floor.label}: " + ", ".join(f"{METRICS[m]} {mine[m][0] - base[m][0]:+.2f}" for m in METRICS))
    return lines


def evaluate(config: CompareConfig) -> dict:
    started = time.perf_counter()
    entries = parse_entries(config.checkpoints) if config.checkpoints else default_entries()
    rows, settings = compare(entries, config)
    run_dir = Path(config.output) if config.output else run_folder(config, "eval", f"compare-{data_name(config)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "protocol": "compare",
        "settings": settings,
        "rows": [{"label": r.label, "files": r.files, "scores": r.scores,
                  "mean": {m: v[0] for m, v in r.summary().items()}, "std": {m: v[1] for m, v in r.summary().items()}} for r in rows],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (run_dir / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(rows)
    (run_dir / "compare.md").write_text(table)
    print(f"\nOne protocol for every row: {config.data} {config.image_size}px, whole train split as bank and probe set, whole val split as queries;"
          f" kNN weighted vote tau {KNN_TAU}; linear = seed-eval linear --fast ({config.epochs} epochs). Top-1 %, mean ± std over n files.\n")
    print(table)
    for line in gains(rows):
        print(line)
    print(f"\nresults: {run_dir / 'compare.json'}, {run_dir / 'compare.md'}")
    return results


def main(argv: list[str] | None) -> None:
    description = "Networks side by side under one protocol (kNN k=200/20 and the fast linear probe on the whole splits), random init as a row."
    evaluate(load_config(CompareConfig, argv, "seed-eval compare", description))
