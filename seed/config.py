"""Typed run configuration: dataclass defaults < YAML file < command-line flags.

Every config field is also a flag (``batch_size`` is ``--batch-size``), so the
YAML files in ``configs/`` and the CLI can never drift apart. A field left at
``None`` is filled by the method's own paper default (see each method's
``DEFAULTS``) when the config is resolved; the resolved config is written into
the run folder.
"""

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from seed.errors import SeedError

#: Lightning's precisions (lightning_fabric's ``_PRECISION_INPUT``) and ours, ``auto``.
Precision = Literal["auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64"]
#: ``--resume``: these words, or the path of a checkpoint (``or_file``).
Resume = Literal["auto", "never"]


def option(text: str, default: Any = None, or_file: bool = False) -> Any:
    """A config field (every field is a flag) with its ``--help`` text. A field typed ``Literal[...]`` takes only
    those values (``or_file``: or the path of an existing file), checked whenever a config is built."""
    return dataclasses.field(default=default, metadata={"help": text, "or_file": or_file})


def choices_of(annotation: Any) -> tuple[str, ...]:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) annotation allows; () for other types."""
    kind = _base_type(annotation, keep_literal=True)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def check_choices(config: Any) -> None:
    """Every enumerated field (typed ``Literal``) holds one of its values: ``--optimizer adam`` must not train
    with the default. Runs whenever a config is built, so flags, YAML files and ``dataclasses.replace`` alike."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        choices, value = choices_of(hints[field.name]), getattr(config, field.name)
        if not choices or value is None or value in choices or (field.metadata.get("or_file") and Path(str(value)).is_file()):
            continue
        listed = ", ".join(choices) + (", or the path of an existing file" if field.metadata.get("or_file") else "")
        raise SeedError(f"unknown --{field.name.replace('_', '-')} '{value}'; choose one of: {listed}")


@dataclasses.dataclass
class CommonConfig:
    """Flags shared by ``seed-pretrain``, ``seed-distill`` and ``seed-eval``."""

    config: str | None = option("YAML file of settings; flags given on the command line override it")
    data: str = option("fashion-mnist (default, offline), digits, cifar10, cifar100, stl10, or an ImageFolder path with train/ and val/", "fashion-mnist")
    data_root: str | None = option("folder holding cifar10/cifar100/stl10 (torchvision layout)")
    download: bool = option("let torchvision download the dataset when it is missing (needs internet)", False)
    image_size: int = option("input resolution in pixels", 32)
    batch_size: int = option("images per optimiser step and device", 256)
    epochs: int = option("training epochs", 200)
    max_steps: int | None = option("stop after this many optimiser steps (smoke runs)")
    output: str | None = option("run folder; default runs/<stage>/<name>")
    seed: int = option("random seed for data order, augmentation and initialisation", 0)
    devices: int = option("devices per node (GPUs, or CPU processes with --accelerator cpu)", 1)
    num_nodes: int = option("machines (torchrun/SLURM set the rest)", 1)
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = option("auto, cpu or gpu (cuda and mps too)", "auto")
    precision: Precision = option("auto (bf16-mixed on GPUs that have it, 16-mixed on others, 32 on CPU) or any Lightning precision; "
                                  "bf16 on a CPU needs its bf16 units (AVX512-BF16 or AMX)", "auto")
    num_workers: int | None = option("data-loading processes per device (default: up to 8, never more than the CPU cores)")
    strict_data: bool = option("stop at the first image that cannot be read instead of skipping it (skipped files are listed in the run's skipped.txt)",
                              False)

    def __post_init__(self) -> None:
        check_choices(self)


@dataclasses.dataclass
class EngineConfig(CommonConfig):
    """Flags of everything that trains through the engine (``seed.engine.fit``): checkpoints, resume, determinism."""

    checkpoint_every: int = option("also write last.ckpt every N optimiser steps", 500)
    keep_checkpoints: bool = option("also keep a copy of each epoch's last.ckpt as checkpoints/epoch-E.ckpt (learning curves)", False)
    deterministic: bool = option("deterministic algorithms only (torch.use_deterministic_algorithms): bit-identical GPU runs and resumes, "
                                "slower; CPU runs are already", False)
    resume: Resume = option("auto (continue from the run folder's last.ckpt when present), never, or a checkpoint path", "auto", or_file=True)

    def validation_every(self) -> tuple[int, int | None]:
        """How often the engine validates: (every N epochs, or every N steps when that is set); (0, None) never."""
        return 0, None


@dataclasses.dataclass
class TrainConfig(EngineConfig):
    """Flags of every training stage (optimiser, monitoring)."""

    arch: str = option("backbone, one of seed.backbones.available()", "r18")
    embed_dim: int = option("output dimension of the projection head", 128)
    temperature: float | None = option("contrastive temperature (default: the method's)")
    small_images: bool | None = option("3x3 stem without max-pool for small inputs (default: on when --image-size <= 64)")
    optimizer: Literal["sgd", "lars"] | None = option("sgd or lars (default: the method's)")
    lr: float | None = option("learning rate; default base_lr x batch_size x devices x nodes / 256")
    base_lr: float | None = option("learning rate per 256 images (default: the method's)")
    momentum: float = option("SGD momentum", 0.9)
    weight_decay: float | None = option("weight decay (default: the method's)")
    warmup_epochs: float | None = option("epochs of linear warm-up before the cosine schedule (default: the method's)")
    crop_min_scale: float | None = option("smallest random crop, as a fraction of the image (default: the augmentation recipe's)")
    knn_every: int = option("kNN top-1 monitor every N epochs (0: off)", 1)
    knn_every_steps: int | None = option("run the kNN monitor every N steps instead of per epoch")
    knn_bank_size: int = option("train images in the monitor's kNN bank", 5000)
    knn_query_size: int = option("val images the monitor classifies", 1000)
    knn_k: int = option("neighbours of the monitor's kNN vote", 200)
    channels_last: bool | None = option("convolutions in channels_last (NHWC) memory format, for the trained network and any frozen teacher; "
                                        "the same math with other rounding (default: on GPU; its effect on a CPU step: docs/BENCHMARKS.md)")
    precise_bn_images: int = option("recompute BatchNorm statistics over this many train images (eval transform) before each kNN monitor "
                                   "and before the export (PreciseBN; 0: keep the running averages of training)", 1024)

    def validation_every(self) -> tuple[int, int | None]:
        """The kNN monitor's schedule."""
        return self.knn_every, self.knn_every_steps


@dataclasses.dataclass
class PretrainConfig(TrainConfig):
    """``seed-pretrain``: a self-supervised teacher."""

    method: Literal["mocov2", "simclr", "supervised"] = option("mocov2, simclr, or supervised (a labelled classifier, e.g. a MEAL V2 teacher)", "mocov2")
    queue_size: int = option("MoCo queue length K", 65536)
    moco_momentum: float = option("momentum of MoCo's key encoder", 0.999)
    moco_momentum_cosine: bool = option("raise the key-encoder momentum to 1 along a cosine (BYOL-style)", False)
    moco_head_bn: bool = option("BatchNorm in MoCo's projection head, as SimCLR's and MoCo v3's heads have (the MoCo v2 paper has none); "
                               "short runs need it to leave chance level", False)
    bn_splits: int | None = option("MoCo on one device: the key encoder's BatchNorm normalises this many shuffled groups separately, "
                                  "as shuffle-BN across GPUs does (default: 8 on one device, 1 under DDP, where real shuffle-BN runs)")


@dataclasses.dataclass
class DistillConfig(TrainConfig):
    """``seed-distill``: a small student learns from a frozen teacher."""

    mode: Literal["seed", "meal"] = option("seed (self-supervised, SEED) or meal (labelled ensemble, MEAL V2)", "seed")
    student: str = option("student backbone, one of seed.backbones.available()", "r18")
    teacher: str | None = option("teacher backbone (default: the one recorded in our checkpoints)")
    teacher_checkpoint: str | None = option("teacher weights: ours (.ckpt/.pt), MoCo, SimCLR, SwAV, SEED or torchvision files "
                                              "(default: the demo teacher, runs/demo/pretrain/teacher.pt)")
    teacher_head: bool | None = option("use the teacher's projection head (default: when the checkpoint has one, as SEED does)")
    queue_size: int = option("SEED queue length K (teacher embeddings)", 65536)
    tau_s: float = option("student temperature", 0.2)
    tau_t: float = option("teacher temperature (1e-4: near one-hot, the official code's)", 1e-4)
    small_crops: int = option("SwAV-style extra small crops per image, with their own queue (0: off; the paper's variant uses 6)", 0)
    augmentation: Literal["mocov2", "mocov1", "swav"] | None = option(
        "SEED's view recipe: mocov2, mocov1 or swav (default: the official code's for the teacher's method: "
        "swav for SwAV teachers, mocov1 for SimCLR ones, else mocov2)")
    teacher_fold_bn: bool = option("fold the teacher's BatchNorm into its convolutions (same outputs, faster)", True)
    teachers: str | None = option("MEAL V2: comma-separated teacher classifiers, registry names or timm:NAME (timm installed); "
                                 "default: the architectures recorded in --teacher-checkpoints")
    teacher_checkpoints: str | None = option("MEAL V2: comma-separated teacher weights, ours (seed-pretrain --method supervised) or torchvision's; "
                                            "an empty entry takes torchvision's or timm's ImageNet weights (default: the demo's teachers, runs/demo/meal/)")
    student_init: str | None = option("MEAL V2: the student's starting weights, a classifier file (our teacher.pt/student.pt or torchvision's), "
                                     "'torchvision' for its ImageNet V1 weights, or timm:NAME for timm's pretrained ones (the public code's r50: "
                                     "timm:resnet50.ram_in1k); default: the demo's with the demo's teachers, else random")
    kd_temperature: float = option("MEAL V2: softmax temperature of the soft cross-entropy (the paper's is 1)", 1.0)
    discriminator: Literal["joint", "minimax", "off"] = option(
        "MEAL V2: joint (the public code: student and discriminator minimise the same BCE in one SGD step), "
        "minimax (gradient reversal into the student), or off", "joint")
    discriminator_weight: float = option("MEAL V2: weight of the discriminator loss added to the KD loss", 1.0)
    lr_schedule: Literal["step", "cosine"] | None = option("MEAL V2: step or cosine (default: the method's; MEAL V2: step)")
    lr_milestones: str | None = option("step schedule: comma-separated epochs (counted from 0) at which the lr is multiplied by 0.1 (MEAL V2: 101)")
    cutmix: bool = option("MEAL V2: CutMix each batch; the teachers see the mixed images, so the soft target follows the mix", False)
    cutmix_alpha: float = option("CutMix: the mixed area is drawn from Beta(alpha, alpha)", 1.0)
    cache_teacher_logits: bool = option("MEAL V2: keep the ensemble target of every image under --cache-crops fixed crops, "
                                       "so epochs after the first --cache-crops skip the teachers (as FKD does)", False)
    cache_crops: int = option("fixed augmentations per image when caching; epoch e uses crop e mod N", 4)
    cache_top_k: int = option("classes kept per cached target, the rest of the probability spread evenly (FKD keeps top-k)", 10)
    teacher_cache: bool = option("SEED, beyond the paper: the teacher embeds each image under --cache-views fixed views once, kept in fp16 "
                                "in <run>/teacher_cache/, so epochs after the first --cache-views run no teacher", False)
    cache_views: int = option("SEED --teacher-cache: fixed views per image, epoch e shows view e mod N "
                             "(disk: images x N x embedding dim x 2 bytes; ImageNet, N = 10: 3.3 GB)", 10)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any, keep_literal: bool = False) -> Any:
    """``int | None`` -> ``int``; ``Literal["a", "b"]`` -> ``str`` (the type of its values) unless ``keep_literal``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal and not keep_literal:
        return type(typing.get_args(annotation)[0])
    return annotation


class _Parser(argparse.ArgumentParser):
    """Errors in one line (``prog: error: ...``, exit code 2), an unknown flag with the closest known one."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments: "):
            unknown = message.split(": ", 1)[1].split()[0]
            typed = unknown.split("=")[0]
            flags = [flag for action in self._actions for flag in action.option_strings]
            close = [flag for flag in flags if flag.startswith(typed)] or difflib.get_close_matches(typed, flags, n=1)
            message = f"unknown flag '{unknown}'; " + (f"did you mean '{' or '.join(close)}'?" if close else "see --help")
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(config_class: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field.

    Defaults are suppressed so that only flags the user typed override the YAML
    file; the dataclass holds the real defaults. Flags are never abbreviated
    (``--temp`` is not silently ``--temperature``).
    """
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kind = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        if field.default not in (None, dataclasses.MISSING):
            help_text += f" (default: {field.default})"
        if kind is bool:
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = choices_of(hints[field.name])
            metavar = "{" + ",".join([*choices, *(["PATH"] if field.metadata.get("or_file") else [])]) + "}" if choices else field.name.upper()
            parser.add_argument(_flag(field.name), type=kind, help=help_text, metavar=metavar)
    return parser


def _check_keys(values: dict[str, Any], config_class: type, source: str) -> None:
    valid = [f.name for f in dataclasses.fields(config_class)]
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            raise SeedError(f"unknown config key '{key}' in {source}; {hint}")


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check a YAML value against the field type (YAML gives ``1e-4`` as a string)."""
    if value is None:
        return None
    kind = _base_type(annotation)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is str and isinstance(value, (str, int, float)):
        return str(value)
    raise SeedError(f"config key '{key}' in {source} must be {kind.__name__}, got {value!r}")


def read_yaml(path: str) -> dict[str, Any]:
    """Read a flat YAML mapping of config keys."""
    file = Path(path)
    if not file.is_file():
        raise SeedError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise SeedError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise SeedError(f"config file {path} must hold a mapping of key: value lines")
    return values


def load_config(config_class: type, argv: list[str] | None, prog: str, description: str) -> Any:
    """Parse flags, merge them over the ``--config`` YAML file and the defaults."""
    flags = vars(build_parser(config_class, prog, description).parse_args(argv))
    config = make_config(config_class, flags)
    if isinstance(config, CommonConfig):
        from seed.engine import resolve_precision

        resolve_precision(config)  # a precision this machine refuses stops here, before anything loads
    return config


def make_config(config_class: type, overrides: dict[str, Any]) -> Any:
    """Build a config from the ``config`` YAML file named in ``overrides`` plus the overrides."""
    values: dict[str, Any] = {}
    if overrides.get("config"):
        from_file = read_yaml(overrides["config"])
        _check_keys(from_file, config_class, overrides["config"])
        hints = typing.get_type_hints(config_class)
        values = {k: _coerce(v, hints[k], k, overrides["config"]) for k, v in from_file.items()}
    _check_keys(overrides, config_class, "the arguments")
    values.update(overrides)
    return config_class(**values)


def save_config(config: Any, path: Path) -> None:
    """Write the resolved config as YAML (readable back by ``--config``)."""
    values = dataclasses.asdict(config)
    values.pop("config", None)
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def resolve(config: Any, method_defaults: dict[str, Any]) -> Any:
    """Fill the fields left at ``None`` with the method's paper defaults and derived values."""
    filled = {k: v for k, v in method_defaults.items() if getattr(config, k) is None}
    if getattr(config, "small_images", False) is None:
        filled["small_images"] = config.image_size <= 64
    return dataclasses.replace(config, **filled)
