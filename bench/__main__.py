"""``python -m bench``: run the benchmark suite, then render docs/BENCHMARKS.md.

    python -m bench                      # every CPU benchmark (`make bench`, under an hour on 2 cores)
    python -m bench --gpu                # the speed benchmarks on a GPU at 224px (`make bench-gpu`)
    python -m bench --only knn,queue     # a subset; the page is re-rendered from all results
    python -m bench --list

Each benchmark is a script in bench/ that writes bench/results/<name>.json; a
failing one is reported and the others still run.
"""

import argparse
import os
import subprocess
import sys
import time

from bench.common import ROOT
from bench.render import render

# name -> (script, CPU arguments, GPU arguments or None when the benchmark is CPU-only)
SUITE: dict[str, tuple[str, list[str], list[str] | None]] = {}


def register(name: str, script: str, cpu_args: list[str], gpu_args: list[str] | None = None) -> None:
    SUITE[name] = (script, cpu_args, gpu_args)


register("quality", "bench/quality.py", [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run the GPU variants (speed benchmarks at 224px)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (script, _, gpu_args) in SUITE.items():
            print(f"{name:16s} {script}{'' if gpu_args is None else '  (has --gpu variant)'}")
        return 0
    names = [n for n in args.only.split(",") if n] or list(SUITE)
    unknown = sorted(set(names) - SUITE.keys())
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    failed = []
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
        print(f"=== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    render()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
