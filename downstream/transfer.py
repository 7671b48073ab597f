"""``seed-eval transfer``: a linear probe on another dataset (CIFAR-10/100, STL-10 or an ImageFolder).

How well the features travel: the backbone stays frozen and the fast probe of
``seed-eval linear --fast`` (a Linear layer on cached centre-crop features) is
trained on the new dataset's train split and measured on its val/test split,
in the spirit of the linear transfer tables of SimCLR (Chen et al., ICML 2020,
sec. 6) and SEED (Fang et al., ICLR 2021, sec. 4.4).
"""

from dataclasses import dataclass

from downstream.linear import ProbeConfig, evaluate
from seed.config import load_config


@dataclass
class TransferConfig(ProbeConfig):
    """``seed-eval transfer``: ``--data`` names the target dataset."""


def main(argv: list[str] | None) -> None:
    description = "Transfer: a linear probe on frozen features of another dataset (cifar10, cifar100, stl10 or an ImageFolder path)."
    evaluate(load_config(TransferConfig, argv, "seed-eval transfer", description), protocol="transfer", fast=True)
