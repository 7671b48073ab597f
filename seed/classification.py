"""What every classifier of the package shares: supervised pretraining (``pretrain/supervised.py``),
MEAL V2's student (``seed/meal.py``) and the linear probe (``downstream/linear.py``).

The supervised training augmentation, CutMix, the val loader, top-1/top-5 accuracy, a
top-1 meter that syncs under DDP (torchmetrics), and the val top-1 table of a finished run.
"""

import json
import math
from pathlib import Path

import torch
import torchvision.transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassAccuracy

from seed.config import CommonConfig
from seed.data import check_classes, dataset_for, eval_transform
from seed.loaders import make_loader
from seed.losses import ensemble_target


def cutmix(images: Tensor, alpha: float) -> Tensor:
    """CutMix (Yun et al. 2019): a box of each image replaced by the same box of another image of the batch.

    The area kept is drawn from Beta(alpha, alpha). Labels are not mixed: the
    teachers see the mixed images, so their soft target follows the mix.
    """
    height, width = images.shape[-2:]
    kept = float(torch.distributions.Beta(alpha, alpha).sample())
    cut = math.sqrt(1 - kept)
    box_h, box_w = int(height * cut), int(width * cut)
    top, left = int(torch.randint(height - box_h + 1, ())), int(torch.randint(width - box_w + 1, ()))
    mixed = images.clone()
    mixed[..., top:top + box_h, left:left + box_w] = images[torch.randperm(len(images), device=images.device), ..., top:top + box_h, left:left + box_w]
    return mixed


def train_transform(image_size: int, min_scale: float | None = None) -> T.Compose:
    """The supervised recipe: RandomResizedCrop (scale >= 0.08) + flip; small data: pad-and-crop + flip (the CIFAR recipe)."""
    normalize = T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"])
    if image_size < 96 and min_scale is None:
        crop = [T.Resize((image_size, image_size)), T.RandomCrop(image_size, padding=image_size // 8)]
    else:
        crop = [T.RandomResizedCrop(image_size, scale=(min_scale or 0.08, 1.0))]
    return T.Compose([*crop, T.RandomHorizontalFlip(), T.ToTensor(), normalize])


def accuracy(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 (when there are at least 5 classes) accuracy in %."""
    tops = [t for t in (1, 5) if t <= logits.shape[1]]
    predicted = logits.topk(max(tops), dim=1).indices
    hits = predicted == labels[:, None]
    return {f"top{t}": 100.0 * float(hits[:, :t].any(dim=1).float().mean()) for t in tops}


def top1_meter(num_classes: int) -> MulticlassAccuracy:
    """Top-1 over a validation pass (``update`` per batch, ``compute`` at the end: summed over DDP ranks), as a fraction."""
    return MulticlassAccuracy(num_classes=num_classes, average="micro")


@torch.no_grad()
def top1(students: dict[str, nn.Module], teachers: dict[str, nn.Module], loader: DataLoader, device: str = "cpu") -> dict[str, float]:
    """Top-1 (%) of each student and teacher and of the teachers' ensemble (mean softmax), one pass over ``loader``."""
    models = {**students, **teachers}
    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.to(device).eval()
    correct = dict.fromkeys([*models, "ensemble (mean softmax)"] if len(teachers) > 1 else models, 0)
    total = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        outputs = {name: model(images).float() for name, model in models.items()}
        if len(teachers) > 1:
            outputs["ensemble (mean softmax)"] = ensemble_target(torch.stack([outputs[name] for name in teachers]))
        for name, output in outputs.items():
            correct[name] += int((output.argmax(1) == labels).sum())
        total += len(labels)
    for name, model in models.items():
        model.train(modes[name])
    return {name: 100.0 * value / max(total, 1) for name, value in correct.items()}


def print_top1(scores: dict[str, float], images: int, path: Path | None = None) -> None:
    """The table of top-1 scores; kept as ``top1.json`` when ``path`` is given."""
    if path is not None:
        path.write_text(json.dumps({"metric": "top1", "val_images": images, "scores": scores}, indent=2))
    width = max(len(name) for name in scores) + 2
    print(f"\nval top-1 ({images} images)\n{'model':<{width}}{'top-1 %':>8}")
    for name, value in scores.items():
        print(f"{name:<{width}}{value:>8.2f}")


def val_loader(config: CommonConfig, size: int | None = None) -> DataLoader:
    """The val split with the eval transform: whole, or a seeded subset of ``size`` images (the online monitor's)."""
    dataset = dataset_for(config, "val", eval_transform(config.image_size))
    if size is not None and size < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))
        dataset = Subset(dataset, order[:size].tolist())
    return make_loader(dataset, config, shuffle=False, batch_size=max(config.batch_size, 256))


# ---- the run --------------------------------------------------------------------------------------------------


def report_top1(students: dict[str, nn.Module], teachers: dict[str, nn.Module], config: CommonConfig, run_dir: Path) -> None:
    """Top-1 on the whole val split of each student and teacher (and their ensemble), printed and kept as ``top1.json``."""
    loader = val_loader(config)
    scores = top1(students, teachers, loader, "cuda" if torch.cuda.is_available() else "cpu")
    print_top1(scores, len(loader.dataset), run_dir / "top1.json")


class Top1Monitor:
    """The online monitor of a classifier student (a LightningModule mixin): its top-1 on the val loader, as ``val_top1``
    (the module makes ``self.val_top1 = top1_meter(num_classes)``)."""

    @classmethod
    def monitor(cls, config: CommonConfig) -> list[DataLoader]:
        """A seeded subset of ``--knn-query-size`` val images (the splits must share their classes)."""
        loader = val_loader(config, config.knn_query_size)
        check_classes(dataset_for(config, "train"), loader.dataset, config.data)
        return [loader]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        self.val_top1.update(self(images), labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val_top1", 100.0 * self.val_top1.compute(), prog_bar=True, rank_zero_only=True)
        self.val_top1.reset()
