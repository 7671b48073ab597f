"""A small kNN classifier on frozen features: the online monitor of every stage.

It answers "is the network learning?" on a few thousand images in seconds.
``seed-eval knn`` (downstream/) is the full protocol with faiss.
"""

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from torch import Tensor, nn
from torch.utils.data import DataLoader

from seed.engine import monitor_loaders


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """L2-normalised pooled features and labels of every image in ``loader`` (eval mode)."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in loader:
        features.append(F.normalize(backbone(images.to(device)), dim=1).cpu())
        labels.append(torch.as_tensor(targets))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def knn_top1(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, num_classes: int, k: int = 200, temperature: float = 0.07
) -> float:
    """Top-1 accuracy (%) of the weighted kNN vote exp(s/t) (Wu et al. 2018, InstDisc)."""
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), 1024):
        chunk = queries[start:start + 1024]
        predicted = knn_predict(chunk, bank.T, bank_labels, num_classes, knn_k=k, knn_t=temperature)[:, 0]
        correct += int((predicted == query_labels[start:start + 1024]).sum())
    return 100.0 * correct / max(len(queries), 1)


def compare_knn(backbones: dict[str, nn.Module], config: Any, num_classes: int, loaders: list[DataLoader] | None = None) -> dict[str, float]:
    """kNN top-1 of several backbones on the same monitor subsets (e.g. trained vs random init): ``loaders``, else new ones."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bank_loader, query_loader = loaders or monitor_loaders(config)
    scores = {}
    for name, backbone in backbones.items():
        backbone = backbone.to(device)
        bank, bank_labels = extract_features(backbone, bank_loader, device)
        queries, query_labels = extract_features(backbone, query_loader, device)
        scores[name] = knn_top1(bank, bank_labels, queries, query_labels, num_classes, k=config.knn_k)
    return scores


def print_knn_table(scores: dict[str, float], config: Any, run_dir: Path) -> None:
    """Print the comparison and keep it as ``knn.json`` in the run folder."""
    (run_dir / "knn.json").write_text(json.dumps({"metric": "knn_top1", "k": config.knn_k, "bank": config.knn_bank_size,
                                                  "queries": config.knn_query_size, "scores": scores}, indent=2))
    print(f"\nkNN top-1 (k={config.knn_k}, {config.knn_query_size} val images, {config.knn_bank_size} train images as bank)")
    width = max(len(name) for name in scores) + 2
    print(f"{'backbone':<{width}}{'top-1 %':>8}")
    for name, value in scores.items():
        print(f"{name:<{width}}{value:>8.2f}")
