"""Benchmark results: flat JSON rows and a markdown table under bench/results/."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, title: str, setup: str, rows: list[dict]) -> None:
    """bench/results/<name>.json (the rows) and <name>.md (the command, the machine, a table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        f"# {title}",
        "",
        f"`{' '.join(['.venv/bin/python', f'bench/{name}.py', *sys.argv[1:]])}` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {setup}.",
        "",
        "| case | n | metric | value |",
        "|---|---:|---|---:|",
    ]
    lines += [f"| {r['case']} | {r['n']} | {r['metric']} | {r['value']:.4g} |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
