"""``seed-eval PROTOCOL [flags]``: downstream protocols, one module each, imported only when chosen."""

import importlib
import sys

from seed.cli import run_cli
from seed.errors import SeedError

#: protocol -> (module with ``main(argv)``, one-line description)
PROTOCOLS = {
    "knn": ("downstream.knn", "weighted kNN (k=200, tau=0.07; also k=20 and majority vote) on frozen features"),
    "linear": ("downstream.linear", "linear classifier on the frozen backbone (SGD lr 30, 100 epochs); --fast on cached features"),
    "semi": ("downstream.semi", "1%/10% labels (SimCLR split files or a balanced subset): linear on features, or --finetune"),
    "transfer": ("downstream.transfer", "linear probe on another dataset (cifar10, cifar100, stl10, ImageFolder)"),
    "detection": ("downstream.detection", "VOC/COCO detection with the backbone (detectron2 when installed, else torchvision)"),
    "compare": ("downstream.compare", "several networks under one protocol (kNN k=200/20, fast linear), random init of each architecture as a row"),
    "report": ("downstream.report", "collect results.json files below a folder into a Markdown table and a PNG bar chart"),
}

USAGE = "usage: seed-eval {" + ",".join(PROTOCOLS) + "} [flags]"


def help_text() -> str:
    lines = [USAGE, "", "Evaluate a checkpoint with the protocols of the papers.", "", "protocols:"]
    lines += [f"  {name:<10} {description}" for name, (_, description) in PROTOCOLS.items()]
    lines += ["", "`seed-eval PROTOCOL --help` lists the protocol's flags. Without --checkpoint, the demo's student (or teacher) is evaluated."]
    return "\n".join(lines)


def dispatch(argv: list[str] | None) -> None:
    """Run the protocol named by the first argument with the rest of the arguments."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("-h", "--help"):
        print(help_text())
        return
    if not args:
        raise SeedError(f"no protocol given; choose one of: {', '.join(PROTOCOLS)} (seed-eval --help)")
    protocol, rest = args[0], args[1:]
    if protocol not in PROTOCOLS:
        raise SeedError(f"unknown protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    importlib.import_module(PROTOCOLS[protocol][0]).main(rest)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``seed-eval``."""
    run_cli("seed-eval", dispatch, argv)


if __name__ == "__main__":
    main()
