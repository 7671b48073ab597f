"""``seed-eval knn``: weighted k-nearest-neighbour classification on frozen features.

The protocol of InstDisc (Wu et al., CVPR 2018, eq. 5 and sec. 3.4), used by
SEED's kNN tables: features are L2-normalised, each val image finds its k
nearest train images by cosine similarity s_i, and class c scores
sum_i exp(s_i / tau) [y_i = c] (k = 200, tau = 0.07). We report that vote at
k = 200 and k = 20, and the plain majority vote (every neighbour weighs 1),
top-1 and top-5.

Search (``--backend auto``) is exact: faiss when it is installed (the ``faiss``
extra: ``faiss.knn`` against the bank chunk by chunk; or ``faiss-gpu`` from the
``gpu`` extra, an ``IndexFlatIP`` on the GPU when CUDA is there), else
``seed.knn.torch_search``, the same search in plain torch (chunked over queries
and bank); faiss-cpu is the faster of the two (docs/BENCHMARKS.md). ``--index
ivf`` is faiss's approximate inverted-file index for very large banks. The bank
goes in chunks, so memory holds the bank plus a chunk and the k neighbours
found so far, never a queries x bank similarity matrix. ``seed.knn.vote`` is the one vote, shared
with the training monitor.
"""

import importlib.util
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from downstream.common import EvalConfig, eval_folder, open_checkpoint, print_table, write_results
from downstream.features import train_val_features
from seed.config import load_config, option
from seed.errors import SeedError
from seed.knn import empty_top_k, merge_top_k, torch_search, vote

QUERY_CHUNK = 4096


@dataclass
class KnnConfig(EvalConfig):
    """``seed-eval knn``."""

    k: str = option("neighbours, comma-separated; each is reported, the first is the headline number", "200,20")
    temperature: float = option("tau of the weighted vote exp(similarity / tau)", 0.07, above=0)
    index: Literal["flat", "ivf"] = option("flat (exact inner-product search) or ivf (approximate, for banks of millions)", "flat")
    nlist: int | None = option("IVF cells (default: 4 x sqrt(bank size), at most bank size / 39)", at_least=1)
    nprobe: int = option("IVF cells visited per query", 32, at_least=1)
    backend: Literal["auto", "faiss", "torch"] = option("auto (faiss when it is installed, else torch), faiss (faiss-cpu or faiss-gpu) "
                                                       "or torch (brute force, chunked)", "auto")


BANK_CHUNK = 65536


def _unit(x: Tensor) -> np.ndarray:
    """Rows L2-normalised, as the contiguous float32 array faiss takes."""
    return np.ascontiguousarray(F.normalize(x.detach().to("cpu", torch.float32), dim=1).numpy())


def import_faiss() -> Any:
    """faiss, or a one-line error that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise SeedError("faiss is not installed: pip install faiss-cpu (or the gpu extra, faiss-gpu); "
                        "or use --backend torch (exact; what auto runs without faiss)") from None
    return faiss


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def faiss_gpu_available() -> bool:
    """faiss built with GPU support and a CUDA device present."""
    if not (torch.cuda.is_available() and faiss_installed()):
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def nearest(bank: Tensor, queries: Tensor, k: int, backend: str = "auto", **index_options) -> Iterator[tuple[Tensor, Tensor]]:
    """Cosine similarities and bank indices (best first) of each query's ``k`` nearest bank rows, in query chunks.

    ``auto``: faiss when it is installed, else the torch search.
    """
    if resolve_backend(backend, index_options.get("index", "flat")) == "faiss":
        return faiss_search(bank, queries, k, **index_options)
    return torch_search(bank, queries, k)


def resolve_backend(backend: str, index: str) -> str:
    """``faiss`` or ``torch``: what ``--backend`` means with ``--index`` here (``auto``: faiss when installed; IVF is faiss's)."""
    if backend == "auto":
        backend = "faiss" if index != "flat" or faiss_installed() else "torch"
    if backend == "torch" and index != "flat":
        raise SeedError(f"--index {index} is faiss's; use --backend faiss or auto")
    return backend


def search_name(backend: str, index: str) -> str:
    """The search :func:`nearest` runs for ``--backend`` and ``--index``, as results.json records it."""
    if resolve_backend(backend, index) == "torch":
        return "torch"
    if faiss_gpu_available():
        return f"faiss {'IndexFlatIP' if index == 'flat' else 'IndexIVFFlat'} (GPU)"
    return "faiss knn (exact)" if index == "flat" else "faiss IndexIVFFlat"


def build_index(bank: Tensor, index: str = "flat", nlist: int | None = None, nprobe: int = 32, gpu: bool | None = None) -> tuple[Any, Any]:
    """A faiss inner-product index of the L2-normalised rows of ``bank`` (inner product = cosine).

    Rows are normalised and added chunk by chunk, so the index is the only
    normalised copy of the bank. Returns the index and its GPU resources
    (``None`` on the CPU), which must live as long as the index.
    """
    faiss = import_faiss()
    size, dim = bank.shape
    if index == "flat":
        built = faiss.IndexFlatIP(dim)
    elif index == "ivf":
        nlist = nlist or max(1, min(round(4 * math.sqrt(size)), size // 39))
        built = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = torch.randperm(size, generator=torch.Generator().manual_seed(0))[:256 * nlist]  # faiss uses at most 256 per cell
        built.train(_unit(bank[sample]))
        built.nprobe = min(nprobe, nlist)
    else:
        raise SeedError(f"unknown --index '{index}'; choose flat or ivf")
    resources = None
    if gpu if gpu is not None else faiss_gpu_available():
        resources = faiss.StandardGpuResources()
        built = faiss.index_cpu_to_gpu(resources, 0, built)
    for start in range(0, size, BANK_CHUNK):
        built.add(_unit(bank[start:start + BANK_CHUNK]))
    return built, resources


def faiss_search(bank: Tensor, queries: Tensor, k: int, chunk: int = QUERY_CHUNK, **index_options) -> Iterator[tuple[Tensor, Tensor]]:
    """Cosine similarities and bank indices (best first) of the ``k`` nearest bank rows, per chunk of ``queries``.

    The exact search on the CPU is :func:`faiss_exact_search`; IVF, or any search on a GPU, goes through an index.
    """
    gpu = index_options.get("gpu")
    if index_options.get("index", "flat") == "flat" and not (gpu if gpu is not None else faiss_gpu_available()):
        yield from faiss_exact_search(bank, queries, k, chunk)
        return
    built, _resources = build_index(bank, **index_options)  # the generator's frame keeps both alive while it searches
    for start in range(0, len(queries), chunk):
        similarities, indices = built.search(_unit(queries[start:start + chunk]), k)
        yield torch.from_numpy(similarities), torch.from_numpy(indices)


def faiss_exact_search(bank: Tensor, queries: Tensor, k: int, chunk: int = QUERY_CHUNK,
                       bank_chunk: int = BANK_CHUNK) -> Iterator[tuple[Tensor, Tensor]]:
    """The exact search on the CPU without an index: ``faiss.knn`` (faiss's blocked BLAS product and top-k) of all
    queries against each bank chunk, normalised as it comes, and a running top-k over the chunks.

    Building an ``IndexFlatIP`` first copies the whole normalised bank into a growing buffer: at 1M x 512 that
    copy is 2 GB and a quarter of the search's time (docs/BENCHMARKS.md, kNN search). Here memory holds one
    normalised bank chunk and every query's k best so far.
    """
    faiss = import_faiss()
    query = _unit(queries)
    best = empty_top_k(len(query))
    for offset in range(0, len(bank), bank_chunk):
        rows = _unit(bank[offset:offset + bank_chunk])
        sims, idx = faiss.knn(query, rows, min(k, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
        best = merge_top_k(best, (torch.from_numpy(sims), torch.from_numpy(idx) + offset), k)
    for start in range(0, len(query), chunk):
        yield best[0][start:start + chunk], best[1][start:start + chunk]


def variants(ks: list[int], temperature: float) -> list[tuple[str, int, float | None]]:
    """(metric suffix, k, temperature or None): the weighted vote at each k, then the majority vote at each k."""
    return [(f"k{k}", k, temperature) for k in ks] + [(f"k{k}_majority", k, None) for k in ks]


def knn_metrics(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (200, 20),
    temperature: float = 0.07,
    backend: str = "auto",
    **index_options,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of each vote of :func:`variants`, by cosine similarity."""
    ks = [min(k, len(bank)) for k in ks]
    search = nearest(bank, queries, max(ks), backend, **index_options)
    tops = [t for t in (1, 5) if t <= num_classes]
    correct = {(name, t): 0 for name, _, _ in variants(ks, temperature) for t in tops}
    start = 0
    for similarities, indices in search:
        labels = query_labels[start:start + len(indices)]
        start += len(indices)
        for name, k, tau in variants(ks, temperature):
            predicted = vote(similarities, indices, bank_labels, num_classes, k, tau).topk(max(tops), dim=1).indices
            hits = predicted == labels[:, None]
            for t in tops:
                correct[name, t] += int(hits[:, :t].any(dim=1).sum())
    return {f"top{t}_{name}": 100.0 * count / len(queries) for (name, t), count in correct.items()}


def predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int = 200, temperature: float | None = 0.07,
            backend: str = "auto", **index_options) -> Tensor:
    """Top-1 class of each query under one vote, by cosine similarity (for tests and scripts)."""
    k = min(k, len(bank))
    search = nearest(bank, queries, k, backend, **index_options)
    return torch.cat([vote(s, i, bank_labels, num_classes, k, temperature).argmax(dim=1) for s, i in search])


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise SeedError(f"--k {text}: give whole numbers separated by commas, e.g. 200,20") from None
    if not ks or min(ks) < 1:
        raise SeedError(f"--k {text}: every k must be at least 1")
    return list(dict.fromkeys(ks))


def evaluate(config: KnnConfig) -> dict:
    """The protocol: features of train (the bank) and val (the queries), the votes, ``results.json``."""
    started = time.perf_counter()
    ks = parse_ks(config.k)
    checkpoint = open_checkpoint(config)
    run_dir = eval_folder(config, "knn", checkpoint)
    train, val = train_val_features(checkpoint, config)
    options = {"index": config.index, "nlist": config.nlist, "nprobe": config.nprobe}
    metrics = knn_metrics(train.features, train.labels, val.features, val.labels, len(train.classes), ks, config.temperature, config.backend, **options)
    ks = [min(k, len(train)) for k in ks]
    settings = {"k": ks, "temperature": config.temperature, "backend": config.backend, "search": search_name(config.backend, config.index),
                "index": config.index,
                "train_images": len(train), "val_images": len(val), "feature_dim": train.features.shape[1]}
    results = write_results(run_dir, "knn", metrics, f"top1_k{ks[0]}", config, checkpoint, settings, time.perf_counter() - started)
    rows = [(f"{'weighted' if tau else 'majority'} k={k}", [metrics.get(f"top{t}_{name}") for t in (1, 5)])
            for name, k, tau in variants(ks, config.temperature)]
    print_table(f"kNN on {config.data} ({len(val)} val images, {len(train)} train images as bank, tau={config.temperature})",
                ["vote", "top-1 %", "top-5 %"], rows, run_dir)
    return results


def main(argv: list[str] | None) -> None:
    description = "kNN classification (InstDisc's weighted vote) on frozen features of train (bank) and val (queries)."
    evaluate(load_config(KnnConfig, argv, "seed-eval knn", description))
