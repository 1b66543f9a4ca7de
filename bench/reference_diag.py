"""Detection against a clean reference set (`otcurate.detect.reference`) on `bench/quality.py`
cells: AUROC of each scorer against the planted noise, on the cell's own train embeddings,
with the cell's clean val split as the reference. No training.

    .venv/bin/python -m bench.reference_diag --work /tmp/qwork/shapes-near-0.5-0 ...

Scorers: `clip_score` (the cosine, the baseline), `knn_k` (mean joint cosine to the k
nearest val pairs: the reference without transport) and `refot_<reg>_<reg_m>` (semi-relaxed
unbalanced OT to the val pairs). Writes bench/results/reference_diag.{json,md} (flat rows:
cell, group, name, metric, value).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from bench.results_io import RESULTS, command, save

KNN = (1, 10, 50)
REFOT = ((0.02, 0.05), (0.02, 0.2), (0.05, 0.1), (0.01, 0.05))
TITLE = "Detection against a clean reference (train split, planted truth; val as reference)"


def table(rows: list[dict], title: str = TITLE, bench: str = "reference_diag") -> str:
    """Per group and scorer: mean AUROC, its lead over `clip_score`'s (paired by cell), seconds."""
    import numpy as np

    by: dict = defaultdict(list)
    for r in rows:
        by[(r["group"], r["name"], r["metric"])].append(r["value"])
    lines = [
        f"# {title}",
        "",
        f"`{command(bench)}`",
        "",
        "Mean ± std over the cells of a group (a group: the cells' name without the seed, "
        "and after a colon the part of the noise scored, where the file says so).",
        "",
        "| group | name | auroc | Δ auroc vs clip_score | seconds | cells |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for g, name in dict.fromkeys((r["group"], r["name"]) for r in rows):
        a, s = by[(g, name, "auroc")], by[(g, name, "seconds")]
        d = np.asarray(a) - np.asarray(by[(g, "clip_score", "auroc")][: len(a)])
        lines.append(
            f"| {g} | {name} | {np.mean(a):.3f} ± {np.std(a):.3f} | {np.mean(d):+.3f} ± "
            f"{np.std(d):.3f} | {f'{np.mean(s):.1f}' if s else '—'} | {len(a)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, nargs="+", required=True, help="bench/quality cells")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from otcurate.data.shards import read_split
    from otcurate.detect import reference as ref
    from otcurate.detect.scorers import clip_score
    from otcurate.runtime import make_reproducible
    from otcurate_pipeline import artifacts

    make_reproducible(0, 2, torch.device("cpu"))
    scorers = {"clip_score": lambda i, t, ri, rt: clip_score(i, t)}
    for k in KNN:
        scorers[f"knn_{k}"] = lambda i, t, ri, rt, k=k: ref.reference_knn_score(i, t, ri, rt, k=k)
    for reg, reg_m in REFOT:
        scorers[f"refot_{reg}_{reg_m}"] = lambda i, t, ri, rt, a=reg, b=reg_m: (
            ref.reference_ot_score(i, t, ri, rt, reg=a, reg_m=b)
        )
    rows = []
    for w in args.work:
        truth_t = read_split(w / "data" / "ingest", "train", columns=["uid", "noisy"])
        truth = np.asarray(truth_t["noisy"].to_pylist(), dtype=bool)
        _, image, text = artifacts.read_embeddings(
            w / "data" / "embed", "train", truth_t["uid"].to_pylist()
        )
        val = read_split(w / "data" / "ingest", "val", columns=["uid"])["uid"].to_pylist()
        _, rimage, rtext = artifacts.read_embeddings(w / "data" / "embed", "val", val)
        group = w.name.rsplit("-", 1)[0]
        for name, fn in scorers.items():
            t0 = time.perf_counter()
            scores = np.asarray(fn(image, text, rimage, rtext), dtype=np.float64)
            sec = time.perf_counter() - t0
            auroc = float(roc_auc_score(truth, -scores))
            for metric, value in (("auroc", auroc), ("seconds", sec)):
                rows.append({"bench": "reference_diag", "cell": w.name, "group": group,
                             "name": name, "metric": metric, "value": value})  # fmt: skip
            print(f"[reference_diag] {w.name} {name}: auroc {auroc:.4f} ({sec:.1f} s)", flush=True)
        save("reference_diag", rows, table(rows), args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
