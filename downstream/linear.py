"""``seed-eval linear``: a linear classifier on the frozen backbone (the linear evaluation protocol).

The standard protocol of MoCo (He et al., CVPR 2020, sec. 4.1) that SEED
reports (Fang et al., ICLR 2021, sec. 4.1): the backbone is frozen with its
BatchNorm in eval mode; a Linear layer on its pooled features is trained with
SGD (lr 30 for ResNets, 3 for MobileNet/EfficientNet, momentum 0.9, weight
decay 0, batch 256) for 100 epochs, lr x0.1 at epochs 60 and 80, on
RandomResizedCrop + flip; val top-1/top-5 on centre crops. It trains through
the one engine (``seed.engine.fit``: devices, DDP, AMP, ``last.ckpt``, resume).

``--fast`` trains the same Linear layer on cached centre-crop features held
in memory instead of on augmented images: seconds instead of hours, a few
points below the full protocol (no augmentation). The features are
standardised with the train mean and standard deviation while training and
the scaling is folded back into the layer afterwards, so the result is still
one Linear layer on raw features; this makes one learning rate fit every
backbone.
"""

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from downstream.common import Checkpoint, EvalConfig, eval_folder, open_checkpoint, print_table, write_results
from downstream.features import Features, cached_features, eval_device, open_split
from seed.checkpoints import atomic_save
from seed.classification import accuracy, top1_meter, train_transform
from seed.config import EngineConfig, load_config, option
from seed.data import check_classes, dataset_for
from seed.engine import fit
from seed.errors import SeedError
from seed.loaders import check_batch, make_loader

#: Learning rate of the fast probe on standardised features (one value fits every backbone).
FAST_LR = 0.1


def default_lr(arch: str) -> float:
    """Linear-probe lr of the papers: 30 for ResNets (MoCo), 3 for MobileNet and EfficientNet (SEED's appendix)."""
    return 3.0 if arch.startswith(("mbv3", "effb")) else 30.0


@dataclass
class ProbeConfig(EvalConfig):
    """The classifier's optimiser (linear, semi-supervised and transfer probes)."""

    epochs: int = option("training epochs", 100, at_least=1)
    lr: float | None = option(f"learning rate of the classifier (default: 30 for ResNets, 3 for MobileNet/EfficientNet on images; "
                              f"{FAST_LR} on cached, standardised features)", above=0)
    momentum: float = option("SGD momentum", 0.9, at_least=0, at_most=1)
    weight_decay: float = option("weight decay", 0.0, at_least=0)
    milestones: str | None = option("epochs at which the lr drops x0.1, comma-separated (default: 60%% and 80%% of --epochs, i.e. 60,80 at 100)")


@dataclass
class EngineProbeConfig(ProbeConfig, EngineConfig):
    """Probes that can train through the engine on images: its checkpoint and resume flags, and validation."""

    val_every: int = option("also measure val top-1 every N epochs while training on images (0: only at the end)", 0, at_least=0)

    def validation_every(self) -> tuple[int, int | None]:
        return self.val_every, None


@dataclass
class LinearConfig(EngineProbeConfig):
    """``seed-eval linear``."""

    fast: bool = option("train on cached centre-crop features in memory (seconds) instead of augmented images through the engine", False)


def parse_milestones(text: str | None, epochs: int) -> list[int]:
    """``--milestones`` as epochs, by default 60% and 80% of ``epochs`` (60 and 80 at 100)."""
    if text is None:
        return [round(0.6 * epochs), round(0.8 * epochs)]
    try:
        return sorted(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise SeedError(f"--milestones {text}: give epochs separated by commas, e.g. 60,80") from None


@torch.no_grad()
def evaluate_head(head: nn.Linear, features: Features, chunk: int = 65536) -> dict[str, float]:
    """Accuracy of ``head`` on pooled features."""
    head = head.cpu()
    logits = torch.cat([head(features.features[i:i + chunk]) for i in range(0, len(features), chunk)])
    return accuracy(logits, features.labels)


def fit_linear(
    train: Features,
    num_classes: int,
    epochs: int,
    batch_size: int = 256,
    lr: float = FAST_LR,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: list[int] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    max_steps: int | None = None,
) -> nn.Linear:
    """Train a Linear layer on in-memory features with minibatch SGD and a step schedule (the fast linear probe).

    Features are standardised with the train statistics while training (so the probe is the same at any feature
    scale); the affine map is folded into the returned layer, which takes raw features.
    """
    device = torch.device(device)
    x = train.features.to(device, torch.float32)
    y = train.labels.to(device)
    mean, std = x.mean(dim=0), x.std(dim=0)
    # A floor relative to the largest spread, so that the probe does not depend on the features' scale: a random-init
    # MobileNetV3 (BatchNorm running statistics of its init) gives features of about 1e-10, which an absolute floor flattened.
    std = std.clamp(min=float(std.max()) * 1e-6 if float(std.max()) > 0 else 1.0)
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones or [], gamma=0.1)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        schedule.step()
        if max_steps is not None and steps >= max_steps:
            break
    folded = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_((head.weight / std).cpu())
        folded.bias.copy_((head.bias - head.weight @ (mean / std)).cpu())
    return folded


class LinearClassifier(pl.LightningModule):
    """A Linear layer on a backbone: frozen with BatchNorm in eval mode (linear probe), or trained too (``finetune``).

    SGD (``nesterov`` optional) with the lr x0.1 at ``milestones`` (epochs), or
    with ``cosine`` decay to zero over the run's steps.

    Lightning 2.x never calls ``train()`` or ``eval()`` on the module when
    fitting starts, so the modes are set here, when built and again at every
    training epoch (a backbone left in train mode would update its BatchNorm
    statistics on every forward, ``no_grad`` or not).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, lr: float, momentum: float, weight_decay: float,
                 milestones: list[int], finetune: bool = False, backbone_lr: float | None = None, nesterov: bool = False,
                 cosine: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.lr, self.momentum, self.weight_decay, self.milestones = lr, momentum, weight_decay, milestones
        self.finetune = finetune
        self.backbone_lr = backbone_lr if backbone_lr is not None else lr
        self.nesterov, self.cosine = nesterov, cosine
        self.backbone.requires_grad_(finetune)
        self.val_top1 = top1_meter(num_classes)
        self.train()

    def train(self, mode: bool = True) -> "LinearClassifier":
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()  # frozen: BatchNorm keeps the checkpoint's running statistics
        return self

    def on_train_epoch_start(self) -> None:
        self.train()

    def forward(self, images: Tensor) -> Tensor:
        if self.finetune:
            return self.head(self.backbone(images))
        with torch.no_grad():
            features = self.backbone(images)
        return self.head(features)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_top1.update(self(images), labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val_top1", 100.0 * self.val_top1.compute(), prog_bar=True, rank_zero_only=True)
        self.val_top1.reset()

    def configure_optimizers(self) -> dict:
        groups = [{"params": self.head.parameters(), "lr": self.lr}]
        if self.finetune:
            groups.append({"params": self.backbone.parameters(), "lr": self.backbone_lr})
        optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov)
        if self.cosine:  # to zero over the run, per step, no warm-up (SimCLR's fine-tuning)
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total),
                                                             "interval": "step"}}
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def train_classifier(module: LinearClassifier, train_set: Dataset, val_set: Dataset, config: EngineProbeConfig, run_dir: Path) -> pl.Trainer:
    """Train through the engine on augmented images; val every ``--val-every`` epochs when asked."""
    check_batch(len(train_set), config)
    warnings.filterwarnings("ignore", ".*validation_step.*but have no .val_dataloader.*")  # --val-every 0: val once, at the end
    val_loaders = [make_loader(val_set, config, shuffle=False)] if config.val_every > 0 else None
    return fit(module, make_loader(train_set, config, shuffle=True, drop_last=True), val_loaders, config, run_dir)


def probe_settings(config: ProbeConfig, mode: str, lr: float, milestones: list[int], train_images: int, val_images: int, classes: int) -> dict:
    """The settings ``results.json`` records for a probe."""
    return {"mode": mode, "lr": lr, "epochs": config.epochs, "batch_size": config.batch_size, "momentum": config.momentum,
            "weight_decay": config.weight_decay, "milestones": milestones, "max_steps": config.max_steps,
            "train_images": train_images, "val_images": val_images, "classes": classes}


def linear_probe(config: ProbeConfig, checkpoint: Checkpoint, run_dir: Path, fast: bool) -> tuple[dict[str, float], dict, nn.Linear | None]:
    """Train the classifier (on cached features, or through the engine on images): val metrics, settings and the layer.

    The layer is ``None`` on DDP ranks other than 0, which have nothing to report.
    """
    milestones = parse_milestones(config.milestones, config.epochs)
    train_set, val_set = open_split(config, "train"), open_split(config, "val")
    check_classes(train_set, val_set, config.data)
    num_classes = len(train_set.classes)
    if fast:
        lr = config.lr if config.lr is not None else FAST_LR
        train = cached_features(checkpoint, config, "train", train_set)
        val = cached_features(checkpoint, config, "val", val_set)
        head = fit_linear(train, num_classes, config.epochs, config.batch_size, lr, config.momentum, config.weight_decay,
                          milestones, config.seed, eval_device(config), config.max_steps)
    else:
        lr = config.lr if config.lr is not None else default_lr(checkpoint.arch)
        pl.seed_everything(config.seed, workers=True, verbose=False)
        augmented = dataset_for(config, "train", train_transform(config.image_size, min_scale=0.08))  # RandomResizedCrop at every size
        module = LinearClassifier(checkpoint.backbone, num_classes, lr, config.momentum, config.weight_decay, milestones)
        trainer = train_classifier(module, augmented, val_set, config, run_dir)
        if not trainer.is_global_zero:
            return {}, {}, None
        head = module.head
        val = cached_features(checkpoint, config, "val", val_set)  # frozen backbone + centre crops: exactly these features
    mode = "fast (cached features)" if fast else "full (augmented images, engine)"
    settings = probe_settings(config, mode, lr, milestones, len(train_set), len(val_set), num_classes)
    return evaluate_head(head, val), settings, head


def save_head(head: nn.Linear, checkpoint: Checkpoint, classes: int, run_dir: Path) -> None:
    """``classifier.pt``: the trained Linear layer (on raw pooled features) and the backbone it belongs to."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_save({"checkpoint": checkpoint.describe(), "classes": classes, "state_dict": head.state_dict()}, run_dir / "classifier.pt")


def report(protocol: str, config: EvalConfig, metrics: dict[str, float], settings: dict, run_dir: Path) -> None:
    """The probe's table: val top-1/top-5."""
    print_table(f"{protocol} on {config.data} ({settings['mode']}, {settings['train_images']} train / {settings['val_images']} val images)",
                ["metric", "value %"], [(f"val {name}", [value]) for name, value in metrics.items()], run_dir)


def evaluate(config: ProbeConfig, protocol: str = "linear", fast: bool | None = None) -> dict | None:
    """The protocol; ``protocol`` names the run (``transfer`` runs the fast probe on another dataset)."""
    started = time.perf_counter()
    checkpoint = open_checkpoint(config)
    run_dir = eval_folder(config, protocol, checkpoint)
    metrics, settings, head = linear_probe(config, checkpoint, run_dir, config.fast if fast is None else fast)
    if head is None:
        return None
    save_head(head, checkpoint, settings["classes"], run_dir)
    results = write_results(run_dir, protocol, metrics, "top1", config, checkpoint, settings, time.perf_counter() - started)
    report(protocol, config, metrics, settings, run_dir)
    return results


def main(argv: list[str] | None) -> None:
    description = "Linear evaluation: a Linear classifier on the frozen backbone (MoCo/SEED protocol); --fast on cached features."
    evaluate(load_config(LinearConfig, argv, "seed-eval linear", description))
