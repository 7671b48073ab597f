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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from seed.errors import SeedError
from seed.precision import resolve_precision

#: Lightning's precisions (lightning_fabric's ``_PRECISION_INPUT``) and ours, ``auto``.
Precision = Literal["auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64"]
#: ``--resume``: these words, or the path of a checkpoint (``or_file``).
Resume = Literal["auto", "never"]


def option(text: str, default: Any = None, or_file: bool = False, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None) -> Any:
    """A config field (every field is a flag) with its ``--help`` text. A field typed ``Literal[...]`` takes only
    those values (``or_file``: or the path of an existing file); a number field says its range (``at_least``,
    ``above``, ``at_most``). Both are checked whenever a config is built, so a bad value stops at parse time."""
    bounds = {"at_least": at_least, "above": above, "at_most": at_most}
    return dataclasses.field(default=default, metadata={"help": text, "or_file": or_file, **{k: v for k, v in bounds.items() if v is not None}})


#: The range metadata an int or float field must declare (tests/test_config.py checks that every one does).
RANGE_KEYS = ("at_least", "above", "at_most")


def check_ranges(config: Any) -> None:
    """Every number field within its declared range: ``--image-size -3`` stops here, not in a torchvision traceback."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        meta, flag = field.metadata, _flag(field.name)
        low, high = meta.get("at_least", meta.get("above")), meta.get("at_most")
        if low is not None and high is not None:
            if not (value > low if "above" in meta else value >= low) or value > high:
                raise SeedError(f"{flag} must be in {'(' if 'above' in meta else '['}{low}, {high}], got {value}")
        elif "at_least" in meta and value < low:
            raise SeedError(f"{flag} must be at least {low}, got {value}")
        elif "above" in meta and value <= low:
            raise SeedError(f"{flag} must be " + ("positive" if low == 0 else f"greater than {low}") + f", got {value}")
        elif high is not None and value > high:
            raise SeedError(f"{flag} must be at most {high}, got {value}")


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
    image_size: int = option("input resolution in pixels", 32, at_least=1)
    batch_size: int = option("images per optimiser step and device", 256, at_least=1)
    epochs: int = option("training epochs", 200, at_least=1)
    max_steps: int | None = option("stop after this many optimiser steps (smoke runs)", at_least=1)
    output: str | None = option("run folder; default runs/<stage>/<name>")
    seed: int = option("random seed for data order, augmentation and initialisation", 0, at_least=0)
    devices: int = option("devices per node (GPUs, or CPU processes with --accelerator cpu)", 1, at_least=1)
    num_nodes: int = option("machines (torchrun/SLURM set the rest)", 1, at_least=1)
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = option("auto, cpu or gpu (cuda and mps too)", "auto")
    precision: Precision = option("auto (bf16-mixed on GPUs that have it, 16-mixed on others, 32 on CPU) or any Lightning precision; "
                                  "bf16 on a CPU needs its bf16 units (AVX512-BF16 or AMX)", "auto")
    num_workers: int | None = option("data-loading processes per device (default: up to 8, never more than the CPU cores)", at_least=0)
    strict_data: bool = option("stop at the first image that cannot be read instead of skipping it (skipped files are listed in the run's skipped.txt)",
                              False)

    def __post_init__(self) -> None:
        check_choices(self)
        check_ranges(self)


@dataclasses.dataclass
class EngineConfig(CommonConfig):
    """Flags of everything that trains through the engine (``seed.engine.fit``): checkpoints, resume, determinism."""

    checkpoint_every: int = option("also write last.ckpt every N optimiser steps (0: only at epoch ends and at the end)", 500, at_least=0)
    keep_checkpoints: bool = option("also keep a copy of each epoch's last.ckpt as checkpoints/epoch-E.ckpt (learning curves)", False)
    deterministic: bool = option("deterministic algorithms only (torch.use_deterministic_algorithms): bit-identical GPU runs and resumes, "
                                "slower; CPU runs are already", False)
    resume: Resume = option("auto (continue from the run folder's last.ckpt when present), never, or a checkpoint path", "auto", or_file=True)

    def validation_every(self) -> tuple[int, int | None]:
        """How often the engine validates: (every N epochs, or every N steps when that is set); (0, None) never."""
        return 0, None


@dataclasses.dataclass
class TrainConfig(EngineConfig):
    """Flags of every training method (optimiser, monitoring); each method's own flags are in its config class."""

    small_images: bool | None = option("3x3 stem without max-pool for small inputs (default: on when --image-size <= 64)")
    optimizer: Literal["sgd", "lars"] | None = option("sgd or lars (default: the method's)")
    lr: float | None = option("learning rate; default base_lr x batch_size x devices x nodes / 256", above=0)
    base_lr: float | None = option("learning rate per 256 images (default: the method's)", above=0)
    momentum: float = option("SGD momentum", 0.9, at_least=0, at_most=1)
    weight_decay: float | None = option("weight decay (default: the method's)", at_least=0)
    warmup_epochs: float | None = option("epochs of linear warm-up before the cosine schedule (default: the method's)", at_least=0)
    crop_min_scale: float | None = option("smallest random crop, as a fraction of the image (default: the augmentation recipe's)", above=0, at_most=1)
    knn_every: int = option("kNN top-1 monitor every N epochs (0: off)", 1, at_least=0)
    knn_every_steps: int | None = option("run the kNN monitor every N steps instead of per epoch", at_least=1)
    knn_bank_size: int = option("train images in the monitor's kNN bank", 5000, at_least=1)
    knn_query_size: int = option("val images the monitor classifies", 1000, at_least=1)
    knn_k: int = option("neighbours of the monitor's kNN vote", 200, at_least=1)
    channels_last: bool | None = option("convolutions in channels_last (NHWC) memory format, for the trained network and any frozen teacher; "
                                        "the same math with other rounding (default: on GPU; its effect on a CPU step: docs/BENCHMARKS.md)")
    precise_bn_images: int = option("recompute BatchNorm statistics over this many train images (eval transform) before each kNN monitor "
                                   "and before the export (PreciseBN; 0: keep the running averages of training)", 1024, at_least=0)

    def validation_every(self) -> tuple[int, int | None]:
        """The kNN monitor's schedule."""
        return self.knn_every, self.knn_every_steps


@dataclasses.dataclass
class PretrainConfig(TrainConfig):
    """``seed-pretrain``: what every teacher method shares; ``--method`` picks the method and its own flags."""

    method: str = option("the teacher's method: mocov2, simclr or supervised (a labelled classifier, e.g. a MEAL V2 teacher)", "mocov2")
    arch: str = option("backbone: ours (r18, r50, mbv3l, ...: seed.backbones.available()), timm:NAME (any timm model, e.g. timm:resnet18d) "
                          "or tv:NAME (any torchvision classifier, e.g. tv:mobilenet_v3_small)", "r18")


@dataclasses.dataclass
class ContrastiveConfig(PretrainConfig):
    """The flags of the contrastive teachers (MoCo v2, SimCLR): a projection head and a temperature."""

    embed_dim: int = option("output dimension of the projection head", 128, at_least=1)
    temperature: float | None = option("contrastive temperature (default: the method's)", above=0)


@dataclasses.dataclass
class DistillConfig(TrainConfig):
    """``seed-distill``: what every distillation method shares; ``--mode`` picks the method and its own flags."""

    mode: str = option("seed (self-supervised, SEED), meal (labelled ensemble, MEAL V2) or usi (labelled, one KD recipe for any backbone, USI)", "seed")
    student: str = option("student backbone: ours (r18, r50, mbv3l, ...: seed.backbones.available()), timm:NAME (any timm model, "
                              "e.g. timm:resnet18d) or tv:NAME (any torchvision classifier, e.g. tv:mobilenet_v3_small)", "r18")
    teacher_fold_bn: bool = option("fold the teachers' BatchNorm into their convolutions (same outputs, faster)", True)
    teacher_cache: bool = option("beyond the papers: the teacher's output for each image under --cache-views fixed views is computed once and "
                                 "kept in fp16 in <run>/teacher_cache/, so epochs after the first --cache-views run no teacher", False)
    cache_views: int = option("--teacher-cache: fixed views per image, epoch e shows view e mod N (disk, SEED: images x N x embedding dim x "
                              "2 bytes; ImageNet, N = 10: 3.3 GB)", 10, at_least=1)


@dataclasses.dataclass
class ClassifierDistillConfig(DistillConfig):
    """What the distillers from classifier teachers (MEAL V2, USI) share."""

    cache_top_k: int = option("--teacher-cache: classes kept per cached probability row, the rest spread evenly (FKD keeps top-k)", 10, at_least=1)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any, keep_literal: bool = False) -> Any:
    """``int | None`` -> ``int``; ``Literal["a", "b"]`` -> ``str`` (the type of its values) unless ``keep_literal``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal and not keep_literal:
        return type(typing.get_args(annotation)[0])
    return annotation


#: For a flag or key that a config lacks, the sentence naming the method it belongs to (None: no method has it).
Owner = Callable[[str], str | None]


class _Parser(argparse.ArgumentParser):
    """Errors in one line (``prog: error: ...``, exit code 2): a flag of another method names its owner, another
    unknown flag the closest known one."""

    def __init__(self, *args: Any, owner: Owner | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments: "):
            unknown = message.split(": ", 1)[1].split()[0]
            typed = unknown.split("=")[0]
            owned = self.owner(typed.removeprefix("--").replace("-", "_")) if self.owner and typed.startswith("--") else None
            flags = [flag for action in self._actions for flag in action.option_strings]
            close = [flag for flag in flags if flag.startswith(typed)] or difflib.get_close_matches(typed, flags, n=1)
            message = owned or f"unknown flag '{unknown}'; " + (f"did you mean '{' or '.join(close)}'?" if close else "see --help")
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(config_class: type, prog: str, description: str, owner: Owner | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field.

    Defaults are suppressed so that only flags the user typed override the YAML
    file; the dataclass holds the real defaults. Flags are never abbreviated
    (``--temp`` is not silently ``--temperature``).
    """
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False, owner=owner)
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


def _check_keys(values: dict[str, Any], config_class: type, source: str, owner: Owner | None = None) -> None:
    valid = [f.name for f in dataclasses.fields(config_class)]
    for key in values:
        owned = owner(key) if owner and key not in valid else None
        if owned:
            raise SeedError(f"config key '{key}' in {source}: {owned}")
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


def recipe_folder() -> Path:
    """The shipped recipes: ``seed/recipes/`` in an installed wheel, the repository's ``configs/`` in a clone."""
    here = Path(__file__).resolve().parent
    return here / "recipes" if (here / "recipes").is_dir() else here.parent / "configs"


def find_config(path: str) -> Path:
    """``--config``: a YAML file, else a shipped recipe by name (``distill/seed_r50_r18``, or its ``configs/...yaml`` path
    run from another folder); one line with close names when neither exists."""
    file = Path(path)
    if file.is_file():
        return file
    folder = recipe_folder()
    name = path.removeprefix("configs/").removesuffix(".yaml")
    if (folder / f"{name}.yaml").is_file():
        return folder / f"{name}.yaml"
    recipes = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))
    close = difflib.get_close_matches(name, recipes, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"the recipes are in {folder}"
    raise SeedError(f"config file {path} does not exist, nor a shipped recipe of that name; pass a YAML file or a recipe name ({hint})")


def read_yaml(path: str) -> dict[str, Any]:
    """Read a flat YAML mapping of config keys from a file or a shipped recipe (:func:`find_config`)."""
    file = find_config(path)
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
        resolve_precision(config)  # a precision this machine refuses stops here, before anything loads
    return config


def make_config(config_class: type, overrides: dict[str, Any], owner: Owner | None = None) -> Any:
    """Build a config from the ``config`` YAML file named in ``overrides`` plus the overrides; ``owner`` names the
    method of a key that ``config_class`` lacks."""
    values: dict[str, Any] = {}
    if overrides.get("config"):
        from_file = read_yaml(overrides["config"])
        _check_keys(from_file, config_class, overrides["config"], owner)
        hints = typing.get_type_hints(config_class)
        values = {k: _coerce(v, hints[k], k, overrides["config"]) for k, v in from_file.items()}
    _check_keys(overrides, config_class, "the arguments", owner)
    values.update(overrides)
    return config_class(**values)


def save_config(config: Any, path: Path) -> None:
    """Write the resolved config as YAML (readable back by ``--config``)."""
    values = dataclasses.asdict(config)
    values.pop("config", None)
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def method_name(config: Any) -> str:
    """The method a training config is of: ``--method`` (seed-pretrain) or ``--mode`` (seed-distill)."""
    return getattr(config, "method", None) or config.mode


def resolve(config: Any, method_defaults: dict[str, Any]) -> Any:
    """Fill the fields left at ``None`` with the method's paper defaults and derived values."""
    filled = {k: v for k, v in method_defaults.items() if getattr(config, k) is None}
    if getattr(config, "small_images", False) is None:
        filled["small_images"] = config.image_size <= 64
    return dataclasses.replace(config, **filled)
