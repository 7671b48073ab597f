"""The command-line edge: user mistakes become one line on stderr and exit code 2."""

import sys
from collections.abc import Callable

from seed.errors import SeedError


def run_cli(prog: str, main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; a :class:`SeedError` prints ``prog: error: message`` and exits 2."""
    try:
        main(argv)
    except SeedError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume from last.ckpt", file=sys.stderr)
        sys.exit(130)


def distill_main(argv: list[str] | None = None) -> None:
    """``seed-distill``: SEED and MEAL V2 distillation (lands with its issue)."""

    def main(args: list[str] | None) -> None:
        import argparse

        description = "Distil a self-supervised teacher (SEED) or an ensemble of classifiers (MEAL V2) into a small student."
        argparse.ArgumentParser(prog="seed-distill", description=description).parse_args(args)
        raise SeedError("seed-distill is not implemented yet; it arrives with the SEED distillation issue")

    run_cli("seed-distill", main, argv)
