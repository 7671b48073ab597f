"""What every benchmark shares: the machine it ran on, where results go, and the result format.

A benchmark script measures, then calls :func:`write_result` with its tables and
plots; ``python -m bench.render`` turns every ``bench/results/*.json`` into
``docs/BENCHMARKS.md`` and ``docs/bench/*.png``. Scripts never write the docs.

Result format (one JSON file per benchmark)::

    {"name": "knn", "title": "kNN search", "order": 40,
     "command": "python bench/knn_bench.py",
     "machine": {...},                      # machine(), filled in by write_result
     "provenance": {"date": "2026-12-02T05:50:09+00:00", "commit": "8a621f6...", "dirty": false,
                    "source_hash": "sha256 hex", "sources": ["seed/**/*.py", ..., "configs"], "machine": {...}},
                                            # provenance(), filled in by write_result
     "reused": [{"row": "r18 SimCLR alone, seed 0", "date": "...", "commit": "...", "run": "runs/..."}],
                                            # optional: rows read from runs an earlier invocation finished
     "description": "markdown paragraph(s): what is measured and how",
     "tables": [{"caption": "...", "columns": ["bank N", "faiss"], "rows": [["10k", "0.6 s"]]}],
     "plots": [{"file": "knn.png", "title": "...", "xlabel": "...", "ylabel": "...",
                "kind": "line" | "bar", "logx": false, "logy": false,
                "series": [{"label": "faiss", "x": [...], "y": [...], "yerr": [...] (optional)}]}],
     "notes": ["markdown bullet: a finding computed from the numbers"],
     "data": {...}}                         # raw numbers, free form
"""

import csv
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: The packages every benchmark measures: all their ``*.py`` enter :func:`source_hash`.
PACKAGES = ("seed", "pretrain", "downstream")
#: `make teacher` writes the reference teacher here (configs/teacher/reference.yaml); never in git.
MAKE_TEACHER = "make teacher"


def cache_dir() -> Path:
    """``$SEED_CACHE`` (default ``~/.cache/seed``): where the teachers the benchmarks read are trained, outside git."""
    return Path(os.environ.get("SEED_CACHE") or Path.home() / ".cache" / "seed")


def reference_teacher_dir() -> Path:
    """``$SEED_CACHE/reference-teacher``, where ``make teacher`` trains."""
    return cache_dir() / "reference-teacher"


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


def hashed_files(configs: Sequence[Path] | None = None) -> list[Path]:
    """What :func:`source_hash` reads: every ``*.py`` under the packages, and the config files (a folder: every file in it;
    default: all of ``configs/``), sorted and without repeats."""
    configs = [ROOT / "configs"] if configs is None else [Path(c) for c in configs]
    files = {path for package in PACKAGES for path in (ROOT / package).rglob("*.py") if "__pycache__" not in path.parts}
    for config in configs:
        files |= {path for path in config.rglob("*") if path.is_file()} if config.is_dir() else {config} if config.is_file() else set()
    return sorted(files, key=relative_name)


def relative_name(path: Path) -> str:
    """``path`` relative to the repository root (POSIX), or as given when it lies outside it."""
    path = Path(path).absolute()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()


def source_hash(configs: Sequence[Path] | None = None) -> str:
    """sha256 over the sorted relative paths and contents of :func:`hashed_files`: equal hashes, the same code and configs.

    Each file enters as its name, a NUL, its size, a NUL and its bytes, so no two different trees hash alike by moving
    bytes between names and contents.
    """
    digest = hashlib.sha256()
    for path in hashed_files(configs):
        content = path.read_bytes()
        digest.update(relative_name(path).encode() + b"\0" + str(len(content)).encode() + b"\0" + content)
    return digest.hexdigest()


#: What a benchmark run writes itself: its changes do not make the tree dirty.
OUTPUTS = ("bench/results", "docs/BENCHMARKS.md", "docs/bench")


def git_state() -> tuple[str | None, bool | None]:
    """The commit checked out at the repository root and whether the tree differs from it (untracked files count; the
    benchmarks' own outputs do not, so that a suite's later results are not dirty by its earlier ones);
    ``(None, None)`` without git or outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--", ".", *(f":(exclude){path}" for path in OUTPUTS))
    return commit.strip(), None if status is None else bool(status.strip())


def utc_now() -> str:
    """Now, ISO 8601 in UTC to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def provenance(configs: Sequence[Path] | None = None, machine_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where a result came from: date (UTC), git commit and dirtiness, the source hash of the code and ``configs``
    (default: all of ``configs/``) and the machine (default :func:`machine`)."""
    commit, dirty = git_state()
    configs = [ROOT / "configs"] if configs is None else list(configs)
    return {"date": utc_now(), "commit": commit, "dirty": dirty, "source_hash": source_hash(configs),
            "sources": [f"{package}/**/*.py" for package in PACKAGES] + [relative_name(config) for config in configs],
            "machine": machine() if machine_info is None else machine_info}


def finished_marker(source: str, **fields: Any) -> dict[str, Any]:
    """What a benchmark writes beside a run of ours once it finished: ``fields`` (its command, its recipe, ...), the source hash
    it ran on, and when (UTC) and at which commit it finished; :func:`reusable` reads it back."""
    commit, dirty = git_state()
    return {**fields, "source_hash": source, "date": utc_now(), "commit": commit, "dirty": dirty}


def reusable(marker: Path, source: str, **fields: Any) -> dict[str, Any] | None:
    """The :func:`finished_marker` at ``marker`` when its run may stand for the one asked for: the same ``fields`` and the same
    ``source`` hash (the code and configs of now); None when there is no marker, an unreadable or older-format one, or any difference."""
    try:
        kept = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("source_hash") != source or any(kept.get(key) != value for key, value in fields.items()):
        return None
    return kept


def reused_entry(row: str, kept: dict[str, Any], run: Path) -> dict[str, Any]:
    """One entry of a result's ``reused`` list: the row, the run folder, and that run's own date and commit."""
    return {"row": row, "run": relative_name(run), "date": kept.get("date"), "commit": kept.get("commit"), "dirty": kept.get("dirty")}


def write_result(name: str, result: dict[str, Any], device: str = "cpu", configs: Sequence[Path] | None = None) -> Path:
    """Write ``bench/results/<name>.json`` in the format above, with the machine and the provenance filled in
    (``configs``: the config files or folders the benchmark reads; default all of ``configs/``)."""
    missing = {"title", "description", "tables"} - result.keys()
    if missing:
        raise ValueError(f"benchmark result {name} lacks {sorted(missing)}")
    payload = {"name": name, "machine": machine(device), "plots": [], "notes": [], **result}
    payload["provenance"] = provenance(configs, payload["machine"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


#: Where our commands are: beside this Python (the venv's bin).
BIN = Path(sys.executable).parent


def run(command: list[str], log: Path, threads: int, quiet: bool = False) -> float:
    """One of our commands (``seed-pretrain ...``, from this Python's bin folder), its output in ``log``; returns its wall time.
    A failure stops the benchmark with the command's own error line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    if not quiet:
        print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        program = str(BIN / command[0])
        code = subprocess.run([program, *command[1:]], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        text, error = log.read_text(errors="replace"), f"{command[0]}: error: "
        if error in text:  # our one-line error, wherever a progress bar or buffered output put it
            said = text[text.rindex(error) + len(error):].splitlines()[0]
        else:
            said = (text.strip().splitlines() or ["(no output)"])[-1][-400:]
        sys.exit(f"{command[0]} failed (exit {code}): {said}; see {log}")
    return time.perf_counter() - start


def finished_run(folder: Path, exported: str, argv: list[str], recipe: str, teacher: str | None, source: str) -> dict[str, Any] | None:
    """The ``.done`` marker of a finished run in ``folder`` that this benchmark may keep instead of running ``argv`` again: the run
    exported ``exported``, and its marker holds the same command, the same recipe text, the same teacher (``teacher``: the sha256
    of its file) and the same source hash (package sources and the recipe); None means run it."""
    if not (folder / exported).is_file():
        return None
    return reusable(folder.with_suffix(".done"), source, command=" ".join(argv), recipe=recipe, teacher=teacher)


def run_or_keep(argv: list[str], folder: Path, exported: str, recipe_file: Path, teacher: str | None, threads: int,
                quiet: bool = False) -> dict[str, Any] | None:
    """Run ``argv`` into ``folder`` and mark it finished (``<folder>.done``), unless :func:`finished_run` finds a finished run that
    may stand for it: then returns that run's marker (its date and commit), else None. ``teacher``: what the run reads besides
    the recipe (the sha256 of its teacher files), which must match too."""
    recipe, source = recipe_file.read_text(), source_hash([recipe_file])
    kept = finished_run(folder, exported, argv, recipe, teacher, source)
    if kept is not None:
        print(f"finished {kept['date']} at commit {kept['commit']} on the same sources, kept: {folder}", flush=True)
        return kept
    marker = folder.with_suffix(".done")
    marker.unlink(missing_ok=True)
    run(argv, folder.with_suffix(".log"), threads, quiet)
    marker.write_text(json.dumps(finished_marker(source, command=" ".join(argv), recipe=recipe, teacher=teacher), indent=2) + "\n")
    return None
