"""A small kNN classifier on frozen features: the online monitor of every stage.

It answers "is the network learning?" on a few thousand images in seconds.
``seed-eval knn`` (downstream/) is the full protocol, with faiss; both vote with
:func:`vote` (lightly's ``knn_predict`` gives the same classes: tested).
"""

import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from seed.backbones import create_backbone
from seed.loaders import monitor_loaders


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


def torch_search(bank: Tensor, queries: Tensor, k: int, chunk: int = 1024, bank_chunk: int = 65536) -> Iterator[tuple[Tensor, Tensor]]:
    """``downstream.knn.faiss_search`` in plain torch: per query chunk, a running top-k over bank chunks.

    Memory: one query chunk x bank chunk block of similarities; bank rows are normalised block by block.
    """
    for start in range(0, len(queries), chunk):
        query = F.normalize(queries[start:start + chunk].float(), dim=1)
        best = empty_top_k(len(query), query.device)
        for offset in range(0, len(bank), bank_chunk):
            sims = query @ F.normalize(bank[offset:offset + bank_chunk].float(), dim=1).T
            top_sims, top_idx = sims.topk(min(k, sims.shape[1]), dim=1)
            best = merge_top_k(best, (top_sims, top_idx + offset), k)
        yield best


def empty_top_k(queries: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """No neighbours yet: the start of a running top-k."""
    return torch.empty(queries, 0, device=device), torch.empty(queries, 0, dtype=torch.long, device=device)


def merge_top_k(best: tuple[Tensor, Tensor], found: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` highest of two (similarities, bank indices) lists per query, best first: a running top-k over bank chunks."""
    sims, idx = torch.cat([best[0], found[0]], dim=1), torch.cat([best[1], found[1]], dim=1)
    top, order = sims.topk(min(k, sims.shape[1]), dim=1)
    return top, idx.gather(1, order)


def vote(similarities: Tensor, indices: Tensor, bank_labels: Tensor, num_classes: int, k: int, temperature: float | None) -> Tensor:
    """Class scores (Q, C) from each query's nearest neighbours (sorted best first), of which the first ``k`` vote.

    ``temperature`` given: neighbour i weighs exp(s_i / temperature) (InstDisc eq. 5); ``None``: each weighs 1.
    faiss marks missing neighbours (an IVF search that found fewer than k) with index -1; they do not vote.
    """
    similarities, indices = similarities[:, :k].double(), indices[:, :k]
    found = indices >= 0
    weights = torch.exp(similarities / temperature) if temperature is not None else torch.ones_like(similarities)
    weights = torch.where(found, weights, torch.zeros_like(weights))
    labels = bank_labels.to(indices.device)[indices.clamp(min=0)]
    return torch.zeros(len(indices), num_classes, dtype=torch.float64, device=indices.device).scatter_add_(1, labels, weights)


def knn_top1(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, num_classes: int, k: int = 200, temperature: float = 0.07
) -> float:
    """Top-1 accuracy (%) of the weighted kNN vote exp(s/t) (Wu et al. 2018, InstDisc): ``seed-eval knn``'s vote and search."""
    k = min(k, len(bank))
    correct = start = 0
    for similarities, indices in torch_search(bank, queries, k):
        predicted = vote(similarities, indices, bank_labels, num_classes, k, temperature).argmax(dim=1)
        correct += int((predicted == query_labels[start:start + len(indices)].to(predicted.device)).sum())
        start += len(indices)
    return 100.0 * correct / max(len(queries), 1)


def random_inits(arch: str, small_images: bool, seeds: int = 3) -> list[nn.Module]:
    """``seeds`` random-init backbones of ``arch`` (``torch.manual_seed(0..seeds-1)``): the floor of every comparison."""
    built = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        built.append(create_backbone(arch, small_images=small_images))
    return built


def compare_knn(backbones: dict[str, nn.Module | list[nn.Module]], config: Any, num_classes: int,
                loaders: list[DataLoader] | None = None) -> dict[str, list[float]]:
    """kNN top-1 of several backbones on the same monitor subsets (e.g. trained vs random init): ``loaders``, else new ones.

    A list of backbones under one name (random init over seeds) gives one score each.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bank_loader, query_loader = loaders or monitor_loaders(config)
    scores = {}
    for name, group in backbones.items():
        scores[name] = []
        for backbone in group if isinstance(group, list) else [group]:
            backbone = backbone.to(device)
            bank, bank_labels = extract_features(backbone, bank_loader, device)
            queries, query_labels = extract_features(backbone, query_loader, device)
            scores[name].append(knn_top1(bank, bank_labels, queries, query_labels, num_classes, k=config.knn_k))
    return scores


def print_knn_table(scores: dict[str, list[float]], config: Any, run_dir: Path) -> None:
    """Print the comparison (mean ± std where a row has several backbones) and keep it as ``knn.json`` in the run folder.

    These are the training monitor's subsets, not the evaluation protocol: the table says so, and
    ``seed-eval compare`` gives the numbers to publish.
    """
    (run_dir / "knn.json").write_text(json.dumps({"metric": "knn_top1", "k": config.knn_k, "bank": config.knn_bank_size,
                                                  "queries": config.knn_query_size, "scores": scores}, indent=2))
    print(f"\nkNN monitor top-1 (k={config.knn_k}, {config.knn_query_size} val images, {config.knn_bank_size} train images as bank; "
          "a training check, not the evaluation protocol: seed-eval compare gives that)")
    width = max(len(name) for name in scores) + 2
    print(f"{'backbone':<{width}}{'top-1 %':>16}")
    for name, values in scores.items():
        mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        cell = f"{mean:.2f} ± {std:.2f} (n={len(values)})" if len(values) > 1 else f"{mean:.2f}"
        print(f"{name:<{width}}{cell:>16}")
