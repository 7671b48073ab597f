"""What every benchmark shares: the machine it ran on, where results go, and the result format.

A benchmark script measures, then calls :func:`write_result` with its tables and
plots; ``python -m bench.render`` turns every ``bench/results/*.json`` into
``docs/BENCHMARKS.md`` and ``docs/bench/*.png``. Scripts never write the docs.

Result format (one JSON file per benchmark)::

    {"name": "knn", "title": "kNN search", "order": 40,
     "command": "python bench/knn_bench.py",
     "machine": {...},                      # machine(), filled in by write_result
     "description": "markdown paragraph(s): what is measured and how",
     "tables": [{"caption": "...", "columns": ["bank N", "faiss"], "rows": [["10k", "0.6 s"]]}],
     "plots": [{"file": "knn.png", "title": "...", "xlabel": "...", "ylabel": "...",
                "kind": "line" | "bar", "logx": false, "logy": false,
                "series": [{"label": "faiss", "x": [...], "y": [...], "yerr": [...] (optional)}]}],
     "notes": ["markdown bullet: a finding computed from the numbers"],
     "data": {...}}                         # raw numbers, free form
"""

import csv
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: `make teacher` writes the reference teacher here (configs/teacher/reference.yaml); never in git.
MAKE_TEACHER = "make teacher"


def reference_teacher_dir() -> Path:
    """``$SEED_CACHE/reference-teacher`` (default ``~/.cache/seed/reference-teacher``), where ``make teacher`` trains."""
    return Path(os.environ.get("SEED_CACHE") or Path.home() / ".cache" / "seed") / "reference-teacher"


def training_minutes(run: Path) -> dict[int, float]:
    """Cumulative training wall time (minutes) at each epoch end of a run of ours, from its images/s log
    (start-up, the final kNN table and the export are not training time)."""
    batch = yaml.safe_load((run / "config.yaml").read_text())["batch_size"]
    minutes, total = {}, 0.0
    with open(run / "logs" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            if row.get("img_s"):
                total += batch / float(row["img_s"]) / 60
                minutes[int(row["epoch"])] = total
    return minutes


def machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, memory, torch version and, on a GPU run, the GPU: printed with every figure."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory_gib = round(total_kib / 2**20, 1)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for a figure caption."""
    text = f"{info['cpu']}, {info['cores']} cores, {info.get('memory_gib')} GiB, torch {info['torch']}"
    return f"{text}, {info['gpu']}" if info.get("gpu") else text


def memory_status(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes: what a benchmark process holds or held at most."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_result(name: str, result: dict[str, Any], device: str = "cpu") -> Path:
    """Write ``bench/results/<name>.json`` in the format above, with the machine filled in."""
    missing = {"title", "description", "tables"} - result.keys()
    if missing:
        raise ValueError(f"benchmark result {name} lacks {sorted(missing)}")
    payload = {"name": name, "machine": machine(device), "plots": [], "notes": [], **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path
