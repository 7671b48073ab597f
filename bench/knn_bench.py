"""kNN search at scale: faiss vs chunked brute-force torch vs ``lightly.utils.benchmarking.knn_predict``.

Each (method, bank size) runs in a fresh process on random L2-normalised
features (d = 512, 1000 classes, 1000 queries, k = 200, weighted vote), timing
search + vote and measuring the peak resident memory the method adds on top
of the bank and queries (Linux: the high-water mark is reset after the data
is built). lightly's ``knn_predict`` builds the whole queries x bank
similarity matrix; ours never does. Writes ``bench/results/knn.json``.

    python bench/knn_bench.py                       # N = 10k, 100k, 1M
    python bench/knn_bench.py --sizes 10000 --methods faiss,torch
"""

import argparse
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "knn.json"


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _run(method: str, size: int, dim: int, queries: int, k: int, classes: int, threads: int, answer: multiprocessing.Queue) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
    bank_labels = torch.randint(0, classes, (size,), generator=generator)
    query = F.normalize(torch.randn(queries, dim, generator=generator), dim=1)
    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
    from lightly.utils.benchmarking import knn_predict  # imports before the memory baseline

    from downstream.knn import predict

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak-memory mark: count only what the method adds
    before = _status("VmRSS")
    start = time.perf_counter()
    if method == "lightly":
        predicted = knn_predict(query, bank.T, bank_labels, classes, knn_k=k, knn_t=0.07)[:, 0]
    else:
        predicted = predict(bank, bank_labels, query, classes, k=k, temperature=0.07, backend=method)
    seconds = time.perf_counter() - start
    answer.put({"method": method, "bank": size, "seconds": round(seconds, 3), "extra_peak_mb": round((_status("VmHWM") - before) / 2**20, 1),
                "data_mb": round((bank.numel() + query.numel()) * 4 / 2**20, 1), "predictions": predicted.tolist()})


def measure(method: str, size: int, args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    process = context.Process(target=_run, args=(method, size, args.dim, args.queries, args.k, args.classes, args.threads, answer))
    process.start()
    process.join(args.timeout)
    if process.is_alive():
        process.kill()
        return {"method": method, "bank": size, "error": f"over {args.timeout} s"}
    if process.exitcode != 0:
        return {"method": method, "bank": size, "error": f"exit code {process.exitcode} (out of memory?)"}
    return answer.get()


def machine() -> dict:
    import faiss
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1), "torch": torch.__version__, "faiss": faiss.__version__,
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="bank sizes, comma-separated")
    parser.add_argument("--methods", default="faiss,torch,lightly")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run before it is given up")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        reference = None
        for method in args.methods.split(","):
            row = measure(method, size, args)
            predictions = row.pop("predictions", None)
            if predictions is not None:
                reference = reference or predictions
                row["agree_with_first"] = round(sum(a == b for a, b in zip(predictions, reference, strict=True)) / len(reference), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "sizes", "methods")}
    out.write_text(json.dumps({"benchmark": "knn search + weighted vote (top-1)", "machine": machine(), "settings": settings, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
