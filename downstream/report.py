"""``seed-eval report DIR``: every ``results.json`` below DIR as one Markdown table and a bar chart.

The table goes to stdout (``seed-eval report runs/ > table.md``), one row per
run with its headline metric (``--all-metrics``: one row per metric); the PNG
bar chart goes to ``--png`` (default ``DIR/report.png``).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from downstream.common import RESULTS
from seed.errors import SeedError

COLUMNS = ["run", "protocol", "metric", "value", "checkpoint", "data"]


def find_results(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(run name, content) of every readable ``results.json`` below ``root``, sorted by run; unreadable ones are skipped with a note."""
    found = []
    for path in sorted(root.rglob(RESULTS)):
        try:
            content = json.loads(path.read_text())
            content["metrics"].items()
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            print(f"seed-eval report: skipping {path}: not a seed-eval results file", file=sys.stderr)
            continue
        found.append((path.parent.relative_to(root).as_posix() or ".", content))
    return found


def checkpoint_label(content: dict[str, Any]) -> str:
    """``file name (first 8 hex digits of its SHA-256)``.

    ``seed-eval detection`` wrote the path as a string and the hash beside it
    before every protocol shared one schema; such files are still read.
    """
    checkpoint = content.get("checkpoint")
    if isinstance(checkpoint, dict):
        path, sha256 = checkpoint.get("path", "?"), checkpoint.get("sha256", "")
    else:
        path, sha256 = checkpoint or "?", content.get("checkpoint_sha256", "")
    return f"{Path(str(path)).name} ({str(sha256)[:8]})"


def table_rows(found: list[tuple[str, dict[str, Any]]], all_metrics: bool = False) -> list[dict[str, Any]]:
    """One row per run (its ``primary`` metric), or per metric with ``all_metrics``; an undefined (null) metric has the value ``None``."""
    rows = []
    for run, content in found:
        metrics = content["metrics"]
        names = list(metrics) if all_metrics else [content.get("primary") if content.get("primary") in metrics else next(iter(metrics), None)]
        for name in names:
            if name is not None:
                value = metrics[name]
                rows.append({"run": run, "protocol": content.get("protocol", "?"), "metric": name, "value": None if value is None else float(value),
                             "checkpoint": checkpoint_label(content), "data": str(content.get("data", "?"))})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table; values in % with two decimals, n/a when undefined."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---:" if c == "value" else "---" for c in COLUMNS) + "|"]
    for row in rows:
        cells = [("n/a" if row[c] is None else f"{row[c]:.2f}") if c == "value" else str(row[c]).replace("|", "\\|") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars, one per row with a value, labelled run / metric, coloured by protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["value"] is not None]
    labels = [f"{row['run']} / {row['metric']}" for row in rows]
    values = [row["value"] for row in rows]
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.4 * len(rows)))
    protocols = list(dict.fromkeys(row["protocol"] for row in rows))
    colours = [plt.get_cmap("tab10")(protocols.index(row["protocol"]) % 10) for row in rows]
    bars = axes.barh(range(len(rows)), values, color=colours)
    for protocol in protocols:
        axes.barh([0], [0], color=plt.get_cmap("tab10")(protocols.index(protocol) % 10), label=protocol)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    axes.set_xlim(0, max([100.0, *(v * 1.1 for v in values)]))
    axes.set_xlabel("accuracy or AP (%)")
    axes.set_title("seed-eval results")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="seed-eval report", description="Collect every results.json below DIR into a Markdown table "
                                     "(stdout) and a PNG bar chart.")
    parser.add_argument("dir", help="folder to search, e.g. runs/")
    parser.add_argument("--png", help="bar chart path (default: DIR/report.png)")
    parser.add_argument("--all-metrics", action="store_true", help="one row per metric instead of each run's headline metric")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        raise SeedError(f"{root} is not a folder; pass the folder that holds your runs, e.g. runs/")
    rows = table_rows(find_results(root), args.all_metrics)
    if not rows:
        raise SeedError(f"no {RESULTS} below {root}; run seed-eval knn|linear|semi|transfer|detection first")
    print(markdown(rows), end="")
    png = Path(args.png) if args.png else root / "report.png"
    bar_chart(rows, png)
    print(f"bar chart: {png}", file=sys.stderr)
