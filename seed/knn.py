"""A small kNN classifier on frozen features: the online monitor of every stage.

It answers "is the network learning?" on a few thousand images in seconds.
``seed-eval knn`` (downstream/) is the full protocol with faiss.
"""

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from torch import Tensor, nn
from torch.utils.data import DataLoader


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
