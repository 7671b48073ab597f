"""The command-line edge: user mistakes become one line on stderr and exit code 2."""

import sys
from collections.abc import Callable

from seed.errors import SeedError
from seed.registry import parse
from seed.runner import run


def run_cli(prog: str, main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; a :class:`SeedError` prints ``prog: error: message`` and exits 2."""
    try:
        main(argv)
    except SeedError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume from last.ckpt", file=sys.stderr)
        sys.exit(130)


def one_line(error: SeedError) -> str:
    """The message of ``error``; raised in a DataLoader worker, torch re-raises it with the worker's traceback: its last line."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and "Traceback" in str(error):
        return lines[-1].split(f"{SeedError.__name__}: ", 1)[-1]
    return str(error)


def distill_main(argv: list[str] | None = None) -> None:
    """``seed-distill``: SEED (``--mode seed``, default), MEAL V2 (``--mode meal``) or USI (``--mode usi``)."""
    description = "Distil a teacher into a small student: self-supervised (SEED) or labelled (MEAL V2, USI)."
    run_cli("seed-distill", lambda args: run(parse("distill", args, description)), argv)
