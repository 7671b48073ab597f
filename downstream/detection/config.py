"""``seed-eval detection``'s flags and MoCo's VOC / COCO recipes (iterations, lr steps, train sizes)."""

import dataclasses
import importlib.util
from typing import Any, Literal

from seed.config import EngineConfig, option
from seed.errors import SeedError

PROG = "seed-eval detection"

#: MoCo's detection recipes: iterations, lr steps as fractions of them, training shorter sides (test: the last).
RECIPES = {
    "voc": {"max_iter": 24000, "steps": (18000 / 24000, 22000 / 24000), "train_sizes": tuple(range(480, 801, 32)), "masks": False},
    "coco": {"max_iter": 90000, "steps": (60000 / 90000, 80000 / 90000), "train_sizes": tuple(range(640, 801, 32)), "masks": True},
}
DETECTRON2_DEPTH = {"r18": 18, "r34": 34, "r50": 50, "r101": 101, "r152": 152}


VOC_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclasses.dataclass
class DetectionConfig(EngineConfig):
    """``seed-eval detection``; defaults are MoCo's VOC / COCO detection configs.

    The torchvision engine trains through the one engine (``seed.engine.fit``), hence its checkpoint and resume
    flags; its length is ``--max-iter`` (or ``--max-steps``), never ``--epochs``.
    """

    checkpoint: str | None = option("student (or any supported) checkpoint whose backbone is transferred")
    arch: str | None = option("backbone architecture: ours, timm:NAME or tv:NAME (default: the one recorded in our checkpoints)")
    dataset: Literal["voc", "coco"] = option("voc (VOC07+12 trainval -> VOC07 test) or coco (train2017 -> val2017)", "voc")
    data: str | None = option("VOCdevkit folder (VOC2007/, VOC2012/) for voc; folder with annotations/, train2017/, val2017/ for coco")
    engine: Literal["auto", "detectron2", "torchvision"] = option("auto (detectron2 when it imports, else torchvision), detectron2 or torchvision", "auto")
    head: Literal["c4", "fpn"] = option("c4 (res5 in the RoI head, MoCo's R50-C4; other backbones detect on their last feature map) or fpn "
                                       "(torchvision engine: a feature pyramid on res2..res5, or on the last three resolutions of "
                                       "MobileNetV3 / EfficientNet)", "c4")
    masks: bool | None = option("Mask R-CNN instead of Faster R-CNN (default: on for coco)")
    max_iter: int | None = option("training iterations (default: 24000 voc, 90000 coco); lr steps scale with it", at_least=1)
    lr: float = option("base learning rate for --batch-size images", 0.02, above=0)
    momentum: float = option("SGD momentum", 0.9, at_least=0, at_most=1)
    weight_decay: float = option("weight decay (none on norm layers, as detectron2)", 1e-4, at_least=0)
    warmup_iters: int = option("iterations of linear warm-up from lr/1000", 100, at_least=0)
    image_size: int = option("shorter image side at test; training samples MoCo's sizes scaled to it", 800, at_least=1)
    batch_size: int = option("images per iteration over all devices (detectron2's IMS_PER_BATCH)", 16, at_least=1)
    roi_per_image: int = option("sampled RoIs per training image in the box head", 512, at_least=1)
    max_eval_images: int | None = option("score only the first N test images (smoke runs)", at_least=1)
    checkpoint_every: int = option("also write last.ckpt (torchvision engine; detectron2's own checkpoints otherwise) every N iterations "
                                   "(0: only at the end)", 2000, at_least=0)


def resolve_config(config: DetectionConfig) -> DetectionConfig:
    """Check the flags (the enumerated ones are checked when the config is built) and fill the dataset's recipe defaults."""
    if not config.checkpoint:
        raise SeedError("pass --checkpoint PATH: the student (or teacher) whose backbone is evaluated")
    for name in ("image_size", "batch_size", "roi_per_image"):
        if getattr(config, name) < 1:
            raise SeedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    recipe = RECIPES[config.dataset]
    masks = recipe["masks"] if config.masks is None else config.masks
    if masks and config.dataset == "voc":
        raise SeedError("VOC has no instance masks; drop --masks")
    max_iter = recipe["max_iter"] if config.max_iter is None else config.max_iter
    if max_iter < 1:
        raise SeedError(f"--max-iter must be at least 1, got {max_iter}")
    return dataclasses.replace(config, masks=masks, max_iter=max_iter)


def detectron2_state() -> str:
    """``ready``, ``missing``, or ``no-ops``: installed without its compiled ops (``detectron2._C``), which its
    models import (PyPI's detectron2-cdo 0.5 is such a package: its source archive holds no C++ sources)."""
    if importlib.util.find_spec("detectron2") is None:
        return "missing"
    return "ready" if importlib.util.find_spec("detectron2._C") is not None else "no-ops"


def select_engine(engine: str) -> str:
    """``auto`` is detectron2 when it is installed with its compiled ops, torchvision otherwise."""
    state = detectron2_state()
    if engine == "detectron2" and state == "missing":
        raise SeedError("--engine detectron2: detectron2 is not installed (it is not on PyPI: pip install "
                        "'git+https://github.com/facebookresearch/detectron2.git'); or use --engine torchvision")
    if engine == "detectron2" and state == "no-ops":
        raise SeedError("--engine detectron2: this detectron2 has no compiled ops (detectron2._C; PyPI's detectron2-cdo 0.5 ships "
                        "without their sources); build it from source (pip install 'git+https://github.com/facebookresearch/detectron2.git') "
                        "or use --engine torchvision")
    if engine == "auto":
        return "detectron2" if state == "ready" else "torchvision"
    return engine


def schedule(config: DetectionConfig) -> dict[str, Any]:
    """Iterations, lr steps and image sizes of the run, scaled from the recipe to ``--max-iter`` and ``--image-size``."""
    recipe = RECIPES[config.dataset]
    scale = config.image_size / 800
    sizes = sorted({max(1, round(s * scale)) for s in recipe["train_sizes"]})
    return {
        "max_iter": config.max_iter,
        "steps": [round(f * config.max_iter) for f in recipe["steps"]],
        "warmup_iters": min(config.warmup_iters, config.max_iter),
        "train_sizes": sizes,
        "test_size": config.image_size,
        "max_size": max(config.image_size, round(1333 * scale)),
    }

