"""``seed-pretrain``: train a teacher (``--method mocov2|simclr|supervised``) and export ``teacher.pt``."""

from seed.cli import run_cli
from seed.registry import parse
from seed.runner import run


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``seed-pretrain``."""
    run_cli("seed-pretrain", lambda args: run(parse("pretrain", args, "Train a teacher: self-supervised (MoCo v2, SimCLR) or supervised.")), argv)


if __name__ == "__main__":
    main()
