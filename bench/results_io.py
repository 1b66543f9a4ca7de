"""Benchmark results: flat JSON rows and a markdown table under bench/results/."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def command(name: str) -> str:
    """The command line that ran benchmark `name`, as a reader would type it."""
    return " ".join([".venv/bin/python", "-m", f"bench.{name}", *sys.argv[1:]])


def save(name: str, rows: list[dict], markdown: str, out: Path = RESULTS) -> None:
    """<out>/<name>.json (the rows) and <name>.md, each written atomically: the one writer of
    every benchmark's results."""
    from otcurate.io import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{name}.json", json.dumps(rows, indent=1) + "\n")
    write_text(out / f"{name}.md", markdown)


def write_results(
    name: str, title: str, setup: str, rows: list[dict], notes: list[str] | None = None
) -> None:
    """bench/results/<name>.json (the rows) and <name>.md (the command, the machine, the
    ``notes`` as paragraphs, a table)."""
    lines = [
        f"# {title}",
        "",
        f"`{command(name)}` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {setup}.",
        "",
        *[line for note in notes or [] for line in (note, "")],
        "| case | n | metric | value |",
        "|---|---:|---|---:|",
    ]
    lines += [f"| {r['case']} | {r['n']} | {r['metric']} | {r['value']:.4g} |" for r in rows]
    save(name, rows, "\n".join(lines) + "\n")
