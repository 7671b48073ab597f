"""``seed-eval``: downstream protocols (kNN, linear, semi-supervised, detection)."""

import argparse

from seed.cli import run_cli
from seed.errors import SeedError


def main(argv: list[str] | None = None) -> None:
    def evaluate(args: list[str] | None) -> None:
        parser = argparse.ArgumentParser(prog="seed-eval", description="Evaluate a checkpoint with the protocols of the papers.")
        parser.add_argument("protocol", choices=["knn", "linear", "semi", "detection", "transfer", "report"])
        parsed, _ = parser.parse_known_args(args)
        raise SeedError(f"seed-eval {parsed.protocol} is not implemented yet; it arrives with the downstream evaluation issue")

    run_cli("seed-eval", evaluate, argv)
