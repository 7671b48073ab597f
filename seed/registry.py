"""Every trainable method by name, and the config each one reads.

The registry is the ``seed.methods`` entry-point group of ``pyproject.toml``, one line per method
(``usi = "seed.usi:USI"``): the commands find the methods of both stages there without ``seed/`` importing
``pretrain/``, and another installed package can add a method the same way. A method is a
:class:`seed.module.TrainModule` subclass that names its stage, its title and its config class (``docs/ARCHITECTURE.md``).

``--method`` (``seed-pretrain``) or ``--mode`` (``seed-distill``) is read first, from the flags or the ``--config``
file; then only that method's flags exist. A flag or YAML key of another method stops with one line that names
the method it belongs to.
"""

import argparse
import dataclasses
import functools
from importlib.metadata import entry_points
from typing import Any

from seed.config import DistillConfig, PretrainConfig, build_parser, make_config, read_yaml, resolve_precision
from seed.errors import SeedError

GROUP = "seed.methods"
#: Each stage: its command, the flag that picks the method, the config every method of the stage extends.
STAGES = {"pretrain": ("seed-pretrain", "method", PretrainConfig), "distill": ("seed-distill", "mode", DistillConfig)}


@functools.cache
def registered() -> dict[str, type]:
    """Name -> method class, from the installed package's entry points, by name."""
    found = {point.name: point for point in entry_points(group=GROUP)}
    if not found:
        raise SeedError(f"no methods are registered under the {GROUP} entry points; install the package (make setup, or pip install -e .)")
    return {name: found[name].load() for name in sorted(found)}


def methods(stage: str) -> dict[str, type]:
    """The methods of one stage (``pretrain`` or ``distill``), by name."""
    return {name: method for name, method in registered().items() if method.STAGE == stage}


def method_named(stage: str, name: str) -> type:
    """The method ``name`` of ``stage``; an unknown name is one line listing the stage's methods."""
    known = methods(stage)
    if name not in known:
        command, selector, _ = STAGES[stage]
        raise SeedError(f"unknown --{selector} '{name}'; choose one of: {', '.join(known)}")
    return known[name]


def method_of(config: Any) -> type:
    """The method a resolved config belongs to (its class is the method's ``CONFIG``)."""
    for method in registered().values():
        if type(config) is method.CONFIG:
            return method
    raise SeedError(f"{type(config).__name__} is no method's config")


#: Former names of flags, and the name each has now.
RENAMED = {"cache_teacher_logits": "teacher_cache", "cache_crops": "cache_views"}


def owner_of(field: str, stage: str, name: str) -> str | None:
    """For a flag that ``name`` lacks: the methods that have it, as the error's text; None when no method has it."""
    if field in RENAMED:
        return f"--{field.replace('_', '-')} is now --{RENAMED[field].replace('_', '-')}"
    if field.startswith("no_") and (owned := owner_of(field[3:], stage, name)):
        return owned.replace("--", "--no-", 1)
    owners = {stage_name: [n for n, m in methods(stage_name).items() if field in {f.name for f in dataclasses.fields(m.CONFIG)}]
              for stage_name in STAGES}
    if not any(owners.values()):
        return None
    command, selector, _ = STAGES[stage]
    title = method_named(stage, name).TITLE
    parts = [f"--{selector} {', '.join(owners[stage])}"] if owners[stage] else []
    parts += [f"{STAGES[other][0]} --{STAGES[other][1]} {', '.join(owners[other])}" for other in STAGES if other != stage and owners[other]]
    flag = "--" + field.replace("_", "-")
    return f"{flag} is not a flag of {command} --{selector} {name} ({title}); it belongs to {' and to '.join(parts)}"


def chosen(stage: str, overrides: dict[str, Any]) -> str:
    """The method named by the flags, else by the ``--config`` file, else the stage's default."""
    _, selector, base = STAGES[stage]
    if overrides.get(selector) is not None:
        return str(overrides[selector])
    if overrides.get("config"):
        value = read_yaml(overrides["config"]).get(selector)
        if value is not None:
            return str(value)
    return next(f.default for f in dataclasses.fields(base) if f.name == selector)


def method_config(stage: str, overrides: dict[str, Any]) -> Any:
    """The config of the method that ``overrides`` (flags as a dict, ``config`` naming a YAML file) chooses."""
    name = chosen(stage, overrides)
    method = method_named(stage, name)
    return make_config(method.CONFIG, {**overrides, STAGES[stage][1]: name}, owner=lambda field: owner_of(field, stage, name))


def parse(stage: str, argv: list[str] | None, description: str) -> Any:
    """Parse a command line of ``stage``: the method first, then that method's flags over its YAML file and defaults."""
    command, selector, base = STAGES[stage]
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument(f"--{selector}")
    early.add_argument("--config")
    known, _ = early.parse_known_args(argv)
    name = chosen(stage, {k: v for k, v in vars(known).items() if v is not None})
    method = method_named(stage, name)
    others = ", ".join(f"--{selector} {n}" for n in methods(stage) if n != name)
    text = f"{description} This is {method.TITLE} (--{selector} {name}); {others} --help lists another method's flags."
    parser = build_parser(method.CONFIG, command, text, owner=lambda field: owner_of(field, stage, name))
    flags = vars(parser.parse_args(argv))
    config = make_config(method.CONFIG, {**flags, selector: name}, owner=lambda field: owner_of(field, stage, name))
    resolve_precision(config)  # a precision this machine refuses stops here, before anything loads
    return config
