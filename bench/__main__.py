"""``python -m bench``: run the benchmark suite, then render docs/BENCHMARKS.md.

    python -m bench                      # every CPU benchmark (`make bench`, about 4.7 hours on 2 cores: 2.5 of them quality, 1.2 labelled)
    python -m bench --gpu                # the speed benchmarks on a GPU at 224px (`make bench-gpu`; quality: --gpu --only quality)
    python -m bench --only knn,queue     # a subset; the page is re-rendered from all results
    python -m bench --list

Each benchmark is a script in bench/ that writes bench/results/<name>.json; a
failing one is reported and the others still run.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

from bench import common
from bench.common import ROOT, write_result
from bench.render import render
from bench.suite import GPU_OPTIONAL, OPTIONAL, SUITE


def failures(run: dict) -> str:
    """A complete run's status cell: ok, or how many of its benchmarks failed."""
    return f"{len(run['failed'])} failed" if run["failed"] else "ok"


def record_suite(seconds: dict[str, float], failed: list[str], wall: float | None = None) -> None:
    """Minutes per benchmark, each from the last ``python -m bench`` run that ran it, and a total that says what it is.

    ``wall``: this invocation's wall time when it ran every benchmark of ``make bench`` (None otherwise). The total is that one
    run's wall time while every ``make bench`` row still comes from it; once a partial rerun (``--only``) replaced some rows, it is
    the sum of the last runs, labelled so with each row's date (and the last complete run, if any, on a row of its own).
    """
    path = common.RESULTS / "suite.json"
    old = json.loads(path.read_text()).get("data", {}) if path.is_file() else {}  # never lose a finished suite over an old file
    last = old.get("runs", {})
    run, day = uuid.uuid4().hex[:12], common.utc_now()[:10]
    last.update({name: {"seconds": value, "status": "failed" if name in failed else "ok", "date": day, "run": run} for name, value in seconds.items()})
    runs = {name: last[name] for name in SUITE if name in last}
    complete = {"run": run, "date": day, "seconds": wall, "failed": failed} if wall is not None else old.get("complete_run")
    rows = [[name, f"{entry['seconds'] / 60:.1f}", entry["status"], entry["date"], "no (--only)" if name in OPTIONAL else "yes"]
            for name, entry in runs.items()]
    default = [name for name in SUITE if name not in OPTIONAL]
    one_run = complete is not None and all(runs.get(name, {}).get("run") == complete["run"] for name in default)
    if one_run:
        total = {"kind": "one run", "seconds": complete["seconds"], "date": complete["date"]}
        rows.append([f"**make bench: one run** ({len(default)} benchmarks in one invocation)", f"**{complete['seconds'] / 60:.1f}**", failures(complete),
                     complete["date"], ""])
        caption = f"Total: the wall time of one `make bench` run, {complete['date']}, that ran every benchmark above marked yes."
    elif all(name in runs for name in default):
        dates = sorted({runs[name]["date"] for name in default})
        total = {"kind": "sum of the last runs", "seconds": sum(runs[name]["seconds"] for name in default), "dates": dates}
        rows.append(["**sum of the last runs** (not one `make bench` run)", f"**{total['seconds'] / 60:.1f}**", "",
                     dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}", ""])
        caption = ("Total: the sum of each benchmark's last run, from different invocations (each row's date says when), not the wall time of "
                   "one `make bench` run.")
        if complete is not None:
            rows.append(["the last complete `make bench` run (one invocation; some rows above are newer)", f"{complete['seconds'] / 60:.1f}",
                         failures(complete), complete["date"], ""])
    else:
        total = None
        caption = "Total: none yet; some benchmarks of `make bench` have no recorded run."
    write_result("suite", {
        "title": "The suite: `make bench` wall time",
        "order": 0,
        "command": "make bench",
        "description": "Minutes each benchmark took the last time `python -m bench` ran it, on the machine named above, and a total: the wall "
                       "time of one `make bench` run when every row comes from it, otherwise the sum of the last runs (labelled so).",
        "tables": [{"caption": caption, "columns": ["benchmark", "minutes", "status", "ran on", "in make bench"], "rows": rows}],
        "data": {"runs": runs, "complete_run": complete, "total": total},
    })


def default_names(gpu: bool) -> list[str]:
    """What ``python -m bench`` runs without --only: ``make bench``, or with --gpu ``make bench-gpu``."""
    if gpu:
        return [name for name, (_, _, gpu_args) in SUITE.items() if gpu_args is not None and name not in GPU_OPTIONAL]
    return [name for name in SUITE if name not in OPTIONAL]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run the GPU variants (speed benchmarks at 224px)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (script, _, gpu_args) in SUITE.items():
            print(f"{name:16s} {script}{'' if gpu_args is None else '  (has --gpu variant)'}{'  (not in the default suite)' if name in OPTIONAL else ''}"
                  f"{'  (not in the default --gpu suite)' if name in GPU_OPTIONAL else ''}")
        return 0
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print(f"python -m bench --gpu: torch {torch.__version__} sees no CUDA GPU on this machine; run it on one that has a GPU "
                  "(`make bench-gpu`), or drop --gpu", file=sys.stderr)
            return 2
    names = [n for n in args.only.split(",") if n] or default_names(args.gpu)
    unknown = sorted(set(names) - SUITE.keys())
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    failed = []
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for name in names:
        script, cpu_args, gpu_args = SUITE[name]
        if args.gpu and gpu_args is None:
            continue
        module = script.removesuffix(".py").replace("/", ".")  # run as a module so that `bench.common` imports
        command = [sys.executable, "-m", module, *(gpu_args if args.gpu else cpu_args)]
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
            failed.append(name)
        seconds[name] = time.perf_counter() - start
        print(f"=== {name}: {seconds[name]:.0f} s", flush=True)
    if not args.gpu:
        complete = set(default_names(gpu=False)) <= set(seconds)  # every benchmark of make bench ran in this one invocation
        record_suite(seconds, failed, time.perf_counter() - started if complete else None)
    render()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
