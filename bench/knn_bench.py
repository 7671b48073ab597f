"""kNN search at scale: faiss vs chunked brute-force torch vs ``lightly.utils.benchmarking.knn_predict``.

Each (method, bank size) runs in a fresh process on random L2-normalised
features (d = 512, 1000 classes, 1000 queries, k = 200, weighted vote), timing
search + vote and measuring the peak resident memory the method adds on top
of the bank and queries (Linux: the high-water mark is reset after the data
is built). lightly's ``knn_predict`` builds the whole queries x bank
similarity matrix; ours never does. Writes ``bench/results/knn.json``; bank
sizes not measured this time (1M by default) are carried over from the
previous file, each with the machine and date it was measured on.

    python -m bench.knn_bench                       # N = 10k, 100k (about 1 min)
    python -m bench.knn_bench --sizes 10000,100000,1000000   # and 1M (several minutes, 8 GB of memory)
    python -m bench.knn_bench --sizes 10000 --methods faiss,torch
    python -m bench.knn_bench --device cuda --sizes 10000,100000,1000000   # on a GPU (faiss-gpu from the gpu extra): knn_gpu.json
"""

import argparse
import datetime
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

from bench.common import RESULTS, describe_machine, machine, memory_status, write_result
from bench.speed import check_device, result_name

METHODS = {"faiss": "faiss `knn`, bank chunked (ours)", "torch": "torch brute force, chunked (ours)", "lightly": "lightly `knn_predict`"}


def _run(method: str, size: int, dim: int, queries: int, k: int, classes: int, threads: int, device: str, answer: multiprocessing.Queue) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
    bank_labels = torch.randint(0, classes, (size,), generator=generator).to(device)
    query = F.normalize(torch.randn(queries, dim, generator=generator), dim=1).to(device)
    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
    from lightly.utils.benchmarking import knn_predict  # imports before the memory baseline

    from downstream.knn import predict, search_name

    def search(rows: int) -> torch.Tensor:
        if method == "lightly":
            return knn_predict(query, bank[:rows].T, bank_labels[:rows], classes, knn_k=min(k, rows), knn_t=0.07)[:, 0]
        return predict(bank[:rows], bank_labels[:rows], query, classes, k=k, temperature=0.07, backend=method)

    gpu = device.startswith("cuda")
    if gpu:
        search(min(size, 10_000))  # CUDA's first-call costs (context, cuBLAS, faiss's resources) are not the search's
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak-memory mark: count only what the method adds
        before = memory_status("VmRSS")
    start = time.perf_counter()
    predicted = search(size)
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if gpu else memory_status("VmHWM")
    answer.put({"method": method, "bank": size, "seconds": round(seconds, 3), "extra_peak_mb": round((peak - before) / 2**20, 1),
                "data_mb": round((bank.numel() + query.numel()) * 4 / 2**20, 1), "predictions": predicted.tolist(),
                **({"search": search_name(method, "flat")} if method != "lightly" else {})})


def _profile(size: int, dim: int, queries: int, k: int, threads: int, answer: multiprocessing.Queue) -> None:
    """Where an exact search's time goes: normalising the bank, the fp32 similarity product, top-k; and that product in bf16."""
    import torch
    import torch.nn.functional as F

    from seed.knn import torch_search

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
    query = F.normalize(torch.randn(queries, dim, generator=generator), dim=1)
    chunk, seconds = 65536, {}

    def timed(name: str, work) -> None:
        work(bank[:chunk])  # warm-up: first-call costs are not the search's
        start = time.perf_counter()
        for offset in range(0, size, chunk):
            work(bank[offset:offset + chunk])
        seconds[name] = round(time.perf_counter() - start, 3)

    timed("normalise", lambda rows: F.normalize(rows, dim=1))
    timed("fp32 product", lambda rows: query @ rows.T)
    timed("fp32 product + top-k", lambda rows: (query @ rows.T).topk(k, dim=1))
    timed("bf16 product", lambda rows: query.bfloat16() @ rows.bfloat16().T)
    import faiss

    from downstream.knn import build_index

    faiss.omp_set_num_threads(threads)
    unit_query = query.numpy()
    timed("faiss fp32 product + top-1", lambda rows: faiss.knn(unit_query, rows.numpy(), 1, metric=faiss.METRIC_INNER_PRODUCT))
    timed("faiss fp32 product + top-k", lambda rows: faiss.knn(unit_query, rows.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT))
    start = time.perf_counter()
    build_index(bank, gpu=False)
    seconds["faiss IndexFlatIP build"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    for _ in torch_search(bank, query, k):
        pass
    seconds["torch search (all of it)"] = round(time.perf_counter() - start, 3)
    answer.put(seconds)


def profile(size: int, args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    process = context.Process(target=_profile, args=(size, args.dim, args.queries, args.k, args.threads, answer))
    process.start()
    process.join(args.timeout)
    return answer.get() if process.exitcode == 0 else {}


def measure(method: str, size: int, args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    process = context.Process(target=_run, args=(method, size, args.dim, args.queries, args.k, args.classes, args.threads, args.device, answer))
    process.start()
    process.join(args.timeout)
    if process.is_alive():
        process.kill()
        return {"method": method, "bank": size, "error": f"over {args.timeout} s"}
    if process.exitcode != 0:
        return {"method": method, "bank": size, "error": f"exit code {process.exitcode} (out of memory?)"}
    return answer.get()


def previous_runs(path: Path) -> list[dict]:
    """Runs of the last result file, each with the machine and date it was measured on (old and common format)."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if "data" in saved:  # the common format: runs measured then, plus those it had carried over itself
        measured = [{**run, "machine": saved["machine"], "measured": saved["data"].get("measured")} for run in saved["data"]["runs"]]
        return measured + saved["data"].get("carried", [])
    return [{**run, "machine": {**saved["machine"], "threads": saved["settings"]["threads"], "device": "cpu"}, "measured": None}
            for run in saved.get("runs", [])]


def human(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def megabytes(mb: float) -> str:
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb:.0f} MB"


def cell(run: dict | None) -> str:
    if run is None:
        return "—"
    if "error" in run:
        return run["error"]
    return f"{run['seconds']:.1f} s, +{megabytes(run['extra_peak_mb'])}"


def table(runs: list[dict], methods: list[str], caption: str) -> dict:
    sizes = sorted({run["bank"] for run in runs})
    rows = [[human(size), *[cell(next((r for r in runs if r["bank"] == size and r["method"] == m), None)) for m in methods]] for size in sizes]
    return {"caption": caption, "columns": ["bank N", *[METHODS[m] for m in methods]], "rows": rows}


def profile_note(costs: dict, size: int, runs: list[dict], args: argparse.Namespace) -> str:
    """Where an exact search's time goes at the largest bank, against lightly's whole time."""
    product, topk = costs["fp32 product"], costs["fp32 product + top-k"] - costs["fp32 product"]
    floor = costs.get("faiss fp32 product + top-1")
    rate = 2 * args.queries * size * args.dim / 1e9  # GFLOP of the product
    lightly = next((r["seconds"] for r in runs if r["method"] == "lightly" and r["bank"] == size and "error" not in r), None)
    text = (f"Profile at N = {human(size)} (one process, same data): the torch search takes {costs['torch search (all of it)']:.1f} s, of which "
            f"the fp32 similarity product is {product:.1f} s ({rate / product:.0f} GFLOP/s: torch's BLAS, MKL), top-k {topk:.1f} s and "
            f"normalising the bank {costs['normalise']:.1f} s. ")
    if floor:
        text += (f"faiss's product on its own BLAS (OpenBLAS) takes {floor:.1f} s with a top-1 ({rate / floor:.0f} GFLOP/s) and "
                 f"{costs['faiss fp32 product + top-k']:.1f} s with the top-{args.k}: that product is the floor of any exact fp32 search "
                 f"here. Building an `IndexFlatIP` first (a normalised copy of the bank) took "
                 f"{costs['faiss IndexFlatIP build']:.1f} s more, which is why the search runs `faiss.knn` on bank chunks instead. ")
    if lightly:
        text += (f"lightly's `knn_predict` takes {lightly:.1f} s and computes the product with torch: a search on torch's product can be at most "
                 f"{lightly / product:.1f}x faster than it" + (f", one on faiss's at most {lightly / floor:.1f}x" if floor else "") + ". ")
    return text + (f"The product in bf16 takes {costs['bf16 product']:.1f} s ({product / costs['bf16 product']:.1f}x torch's fp32); a bf16 screen "
                   "re-ranked in fp32 finds the exact neighbours only when the k-th lies clear of bf16's error (about 0.01 in cosine), "
                   "which learned features' dense neighbourhoods rarely give, so it is not used.")


def notes(runs: list[dict], args: argparse.Namespace, costs: dict | None = None) -> list[str]:
    ok = [r for r in runs if "error" not in r]
    found = []
    agreement = [r["agree_with_first"] for r in ok if "agree_with_first" in r]
    if agreement:
        found.append("All methods return the same predictions for every query." if min(agreement) == 1.0 else
                     f"Predictions agree with the first method's on {100 * min(agreement):.2f}% of queries at worst (ties broken differently).")
    by = {(r["method"], r["bank"]): r for r in ok}
    sizes = sorted({r["bank"] for r in ok})
    one_hot_gb = args.queries * args.k * args.classes * 4 / 1e9
    matrix = ", ".join(f"{megabytes(args.queries * n * 4 / 1e6)} at N = {human(n)}" for n in sorted({*sizes, 1_000_000}))
    if all(("lightly", n) in by for n in sizes):
        ours = {n: max(by[(m, n)]["extra_peak_mb"] for m in ("faiss", "torch") if (m, n) in by) for n in sizes}
        found.append(f"lightly's `knn_predict` builds the whole {args.queries} x N similarity matrix ({matrix}) and a ({args.queries}·k) x classes "
                     f"one-hot tensor ({one_hot_gb:.1f} GB at {args.classes} classes, whatever N): it adds "
                     + ", ".join(f"{megabytes(by[('lightly', n)]['extra_peak_mb'])} at N = {human(n)}" for n in sizes)
                     + "; ours search against bank chunks of 65,536 rows, normalised as they come, and keep each query's k best so far "
                     "(at most " + ", ".join(f"{megabytes(ours[n])} at {human(n)}" for n in sizes) + ").")
    if all((m, n) in by for m in ("faiss", "torch") for n in sizes):
        largest = sizes[-1]
        ratio = by[("faiss", largest)]["seconds"] / by[("torch", largest)]["seconds"]
        faster = (f"the chunked torch search (matmul + topk) is {ratio:.1f}x faster than faiss's" if ratio > 1.1 else
                  f"faiss's exact search is {1 / ratio:.1f}x faster than the chunked torch search" if ratio < 1 / 1.1 else
                  "faiss's exact search and the chunked torch search take about the same time")
        processor = "GPU" if args.device.startswith("cuda") else "CPU"
        found.append(f"At N = {human(largest)} on this {processor} {faster} at k = {args.k} with {args.queries} queries. `--backend auto` takes faiss "
                     "whenever it is installed; `--backend torch` selects the other.")
    if all((m, n) in by for m in ("lightly", "faiss") for n in sizes):
        found.append("Our default search (`--backend auto` with faiss installed) against lightly's `knn_predict`: " + ", ".join(
            f"{by[('lightly', n)]['seconds'] / by[('faiss', n)]['seconds']:.2f}x its speed at N = {human(n)}" for n in sizes) + ".")
    if all((m, n) in by for m in ("lightly", "torch") for n in sizes):
        found.append("lightly against our torch search: " + ", ".join(
            f"{by[('lightly', n)]['seconds'] / by[('torch', n)]['seconds']:.1f}x the time at N = {human(n)}" for n in sizes) + ".")
    if costs:
        found.append(profile_note(costs, max(sizes), runs, args))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="bank sizes, comma-separated (add 1000000 for 1M)")
    parser.add_argument("--methods", default="faiss,torch,lightly")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run before it is given up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the bank, the queries and the searches are")
    args = parser.parse_args()
    check_device(args.device)
    gpu = args.device.startswith("cuda")
    sizes, methods = [int(s) for s in args.sizes.split(",")], args.methods.split(",")
    unknown = sorted(set(methods) - METHODS.keys())
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    load_before = os.getloadavg()
    runs = []
    for size in sizes:
        reference = None
        for method in methods:
            row = measure(method, size, args)
            predictions = row.pop("predictions", None)
            if predictions is not None:
                reference = reference or predictions
                row["agree_with_first"] = round(sum(a == b for a, b in zip(predictions, reference, strict=True)) / len(reference), 4)
            runs.append(row)
            print(json.dumps(row), flush=True)
    costs = {} if gpu else profile(max(sizes), args)  # the profile times CPU products
    if costs:
        print(json.dumps({"profile": costs}), flush=True)
    load_after = os.getloadavg()
    carried = [run for run in previous_runs(RESULTS / f"{result_name('knn', args.device)}.json") if run["bank"] not in sizes]
    import faiss
    import lightly

    tables = [table(runs, methods, f"{args.queries} queries, d = {args.dim}, {args.classes} classes, k = {args.k}; seconds for search + vote, "
                                   "and the peak memory the method adds:")]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in carried:
        groups.setdefault((describe_machine(run["machine"]), f"a run on {run['measured']}" if run["measured"] else "an earlier run"), []).append(run)
    for (where, when), rows in groups.items():
        tables.append(table(rows, [m for m in METHODS if any(r["method"] == m for r in rows)],
                            f"Carried over from {when} (`python -m bench.knn_bench --sizes {','.join(str(n) for n in sorted({r['bank'] for r in rows}))}`; "
                            f"{where}, {rows[0]['machine'].get('threads')} threads); not measured this time, compare within this table only:"))
    plot_runs = [r for r in runs if "error" not in r]
    on_gpu = " (GPU)" if gpu else ""
    plots = [{"file": f"{result_name('knn_time', args.device)}.png", "title": f"kNN search + vote, 1000 queries{on_gpu}", "xlabel": "bank N",
              "ylabel": "seconds", "logx": True, "logy": True,
              "series": [{"label": METHODS[m].replace("`", ""), "x": [r["bank"] for r in plot_runs if r["method"] == m],
                          "y": [r["seconds"] for r in plot_runs if r["method"] == m]} for m in methods]},
             {"file": f"{result_name('knn_memory', args.device)}.png", "title": f"Memory the search adds{on_gpu}", "xlabel": "bank N", "ylabel": "MB",
              "logx": True, "logy": True,
              "series": [{"label": METHODS[m].replace("`", ""), "x": [r["bank"] for r in plot_runs if r["method"] == m],
                          "y": [r["extra_peak_mb"] for r in plot_runs if r["method"] == m]} for m in methods]}]
    faiss_search_used = next((r["search"] for r in runs if r.get("search") and r["method"] == "faiss"), "faiss")
    description = (
        f"The search and weighted vote of `seed-eval knn` (k = {args.k}, τ = 0.07, top-1) for {args.queries} queries against a bank of N "
        f"random L2-normalised features, d = {args.dim}, {args.classes} classes, "
        + (f"on the GPU (bank and queries in GPU memory; the faiss rows search with {faiss_search_used}), after a warm-up "
           "search of 10k rows. Each run is a fresh process; “+memory” is the peak GPU memory torch's allocator adds on top of the bank "
           "and queries (faiss-gpu's own allocations are not in it)" if gpu else
           f"on the CPU with {args.threads} thread(s). Each run is a fresh process; “+memory” is the peak resident memory the method adds "
           "on top of the bank and queries")
        + f" (the bank alone is {args.dim * 4 * 10_000 / 1e6:.0f} MB per 10k rows). faiss {faiss.__version__}, lightly {lightly.__version__}. "
        + ("" if gpu else f"The CPU was shared with other jobs (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on "
                          f"{os.cpu_count()} cores); timings on a loaded machine vary by about 2x between runs, so compare methods within one row.")
    )
    info = machine(args.device)
    info["threads"] = args.threads
    write_result(result_name("knn", args.device), {
        "title": "kNN search" + (" (GPU)" if gpu else ""), "order": 40 if not gpu else 41, "machine": info,
        "command": "python " + " ".join(["-m", "bench.knn_bench", *sys.argv[1:]]),
        "description": description, "tables": tables, "plots": plots, "notes": notes(runs, args, costs),
        "data": {"settings": {k: v for k, v in vars(args).items() if k not in ("sizes", "methods")},
                 "measured": datetime.date.today().isoformat(), "load_average": [load_before, load_after], "runs": runs, "carried": carried,
                 "profile": {"bank": max(sizes), "seconds": costs}},
    })


if __name__ == "__main__":
    main()
