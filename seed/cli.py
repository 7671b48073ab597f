"""The command-line edge: user mistakes become one line on stderr and exit code 2."""

import sys
from collections.abc import Callable

from seed.errors import SeedError


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
    """``seed-distill``: SEED (``--mode seed``, default) or MEAL V2 (``--mode meal``)."""
    from seed.config import DistillConfig, load_config

    def main(args: list[str] | None) -> None:
        description = "Distil a self-supervised teacher (SEED) or an ensemble of classifiers (MEAL V2) into a small student."
        config = load_config(DistillConfig, args, "seed-distill", description)
        if config.mode == "seed":
            from seed.distill import distill

            distill(config)
        elif config.mode == "meal":
            from seed.meal import distill as meal

            meal(config)
        else:
            raise SeedError(f"unknown --mode '{config.mode}'; choose seed or meal")

    run_cli("seed-distill", main, argv)
