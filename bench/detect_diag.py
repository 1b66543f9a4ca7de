"""Detector ablations on `bench/quality.py` cells: AUROC of each detector variant against
the planted noise, on the cell's own train embeddings (data/embed), no training.

    .venv/bin/python -m bench.detect_diag --work bench/work/shapes-near-0.5-0 \\
        'clip={"method":"clip_score"}' 'ot_both={"method":"ot","relative_to":"both"}'

Each spec is NAME=JSON: "method" (a `detect.method`) and that method's options fields.
Writes bench/results/detect_diag.json (flat rows: cell, name, metric, value) and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from bench.results_io import RESULTS, command, save


def table(rows: list[dict]) -> str:
    import numpy as np

    by: dict = defaultdict(list)
    for r in rows:
        by[(r["group"], r["name"], r["metric"])].append(r["value"])
    lines = [
        "# Detector ablations (train split, planted truth)",
        "",
        f"`{command('detect_diag')}`",
        "",
        "Mean ± std over the cells of a group (a group: the cells' name without the seed).",
        "",
        "| group | name | auroc | seconds | cells |",
        "|---|---|---:|---:|---:|",
    ]
    for g, name in dict.fromkeys((r["group"], r["name"]) for r in rows):
        a, s = by[(g, name, "auroc")], by[(g, name, "seconds")]
        lines.append(
            f"| {g} | {name} | {np.mean(a):.3f} ± {np.std(a):.3f} | {np.mean(s):.1f} | {len(a)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("specs", nargs="+", help="NAME=JSON: method and its options")
    ap.add_argument("--work", type=Path, nargs="+", required=True, help="bench/quality cells")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from otcurate import detect as det
    from otcurate.data.shards import read_split
    from otcurate.runtime import make_reproducible
    from otcurate_pipeline import artifacts

    rows = []
    for w in args.work:
        truth_t = read_split(w / "data" / "ingest", "train", columns=["uid", "noisy"])
        uids = truth_t["uid"].to_pylist()
        truth = np.asarray(truth_t["noisy"].to_pylist(), dtype=bool)
        _, image, text = artifacts.read_embeddings(w / "data" / "embed", "train", uids)
        group = w.name.rsplit("-", 1)[0]
        for spec in args.specs:
            name, over = spec.split("=", 1)
            over = json.loads(over)
            method = over.pop("method")
            opts = det.options(method, **over)
            make_reproducible(0, 2, torch.device("cpu"))
            t0 = time.perf_counter()
            scores = np.asarray(det.score(method, image, text, opts, seed=0))
            sec = time.perf_counter() - t0
            auroc = float(roc_auc_score(truth, -scores))
            for metric, value in (("auroc", auroc), ("seconds", sec)):
                rows.append({"bench": "detect_diag", "cell": w.name, "group": group,
                             "name": name, "metric": metric, "value": value})  # fmt: skip
            print(f"[detect_diag] {w.name} {name}: auroc {auroc:.4f} ({sec:.1f} s)", flush=True)
            save("detect_diag", rows, table(rows), args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
