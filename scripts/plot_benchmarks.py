"""Draws the tables of BENCHMARKS.md as PNG charts in docs/.

Reads the CPU speed, serving and strategy tables back from BENCHMARKS.md,
so the charts always show the numbers the file states. Needs matplotlib;
the benchmark scripts install it into .venv-bench.
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tables(text):
    """Yields (heading, rows) for each markdown table, rows as lists of cells."""
    heading = ""
    rows = []
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            yield heading, rows
            rows = []


def number(cell):
    return float(re.sub(r"[^0-9.]", "", cell) or "nan")


def cpu_chart(rows, path):
    labels = [r[0] for r in rows[1:]]
    prefill = [number(r[1]) for r in rows[1:]]
    decode = [number(r[3]) for r in rows[1:]]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([i - 0.2 for i in x], prefill, width=0.4, label="prefill")
    ax.bar([i + 0.2 for i in x], decode, width=0.4, label="decode")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("tokens/s")
    ax.set_title("SmolLM2-135M on 2 CPU cores, mistral.rs engine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def strategy_chart(heading, rows, path):
    labels = [r[0] for r in rows[1:]]
    tokens = [number(r[4]) for r in rows[1:]]
    seconds = [number(r[6]) for r in rows[1:]]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([i - 0.2 for i in x], tokens, width=0.4, label="engine tokens")
    ax.bar([i + 0.2 for i in x], seconds, width=0.4, label="wall time")
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, rotation=15)
    ax.set_ylabel("ratio to greedy (log scale)")
    ax.set_title(heading)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def serving_chart(rows, path):
    """Throughput and time per output token against concurrency, per server."""
    servers = {}
    for row in rows[1:]:
        servers.setdefault(row[0], []).append((number(row[1]), number(row[2]), number(row[6])))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, points in servers.items():
        concurrency = [p[0] for p in points]
        left.plot(concurrency, [p[1] for p in points], marker="o", label=name)
        right.plot(concurrency, [p[2] for p in points], marker="o", label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16], ["1", "4", "16"])
        ax.set_xlabel("concurrent requests")
    left.set_ylabel("output tokens/s")
    left.set_title("Throughput")
    right.set_ylabel("ms per output token (p50)")
    right.set_title("Time per output token")
    left.legend()
    fig.suptitle("SmolLM2-135M Q4_1 on 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    text = (ROOT / "BENCHMARKS.md").read_text()
    for heading, rows in tables(text):
        if rows[0][0].startswith("format"):
            cpu_chart(rows, docs / "cpu-speed.png")
        elif rows[0][0] == "server" and rows[0][1] == "concurrency":
            serving_chart(rows, docs / "serving.png")
        elif rows[0][0] == "decoding" and "handbook" not in heading:
            label = heading.split(":")[0].strip()
            strategy_chart(heading, rows, docs / f"strategies-{label}.png")


if __name__ == "__main__":
    main()
