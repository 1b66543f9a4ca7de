"""What OT detection's Sinkhorn budget buys on real embeddings (#14's recipe cost, #18).

On `bench/quality.py` cells (their base model's train embeddings, data/embed): the `ot`
detector at several ``max_iter`` and ``passes`` (its other options the defaults), its
seconds and its AUROC against the planted noise, beside the cosine's. No training.

    .venv/bin/python -m bench.ot_budget --work /tmp/qwork/shapes-near-0.5-0 ...

Writes bench/results/ot_budget.{json,md} (flat rows: cell, group, name, metric, value).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.reference_diag import table
from bench.results_io import RESULTS, save

TITLE = "OT detection's Sinkhorn budget on real embeddings (train split, planted truth)"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, nargs="+", required=True, help="bench/quality cells")
    ap.add_argument("--max-iter", type=int, nargs="+", default=[50, 200, 1000])
    ap.add_argument("--passes", type=int, nargs="+", default=[1, 4])
    ap.add_argument(
        "--batch-size", type=int, default=None, help="detect.ot.batch_size (default: its default)"
    )
    ap.add_argument("--relative-to", choices=["row", "both"], default=None)
    ap.add_argument("--trim", choices=["none", "mixture"], default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from otcurate import detect as det
    from otcurate.data.shards import read_split
    from otcurate_pipeline import artifacts

    torch.set_num_threads(2)
    rows = []
    for w in args.work:
        t = read_split(w / "data" / "ingest", "train", columns=["uid", "noisy"])
        uids = t["uid"].to_pylist()
        noisy = np.asarray(t["noisy"].to_pylist(), dtype=bool)
        _, image, text = artifacts.read_embeddings(w / "data" / "embed", "train", uids)
        runs = {"clip_score": ("clip_score", None)}
        fixed = {k: v for k, v in (("batch_size", args.batch_size),
                 ("relative_to", args.relative_to), ("trim", args.trim)) if v is not None}  # fmt: skip
        label = "".join(f" {k}={v}" for k, v in fixed.items())
        for p in args.passes:
            for it in args.max_iter:
                opts = det.options("ot", passes=p, max_iter=it, **fixed)
                runs[f"ot{label} p={p} it={it}"] = ("ot", opts)
        for name, (method, opts) in runs.items():
            t0 = time.perf_counter()
            s = det.score(method, image, text, opts, seed=0)
            sec = time.perf_counter() - t0
            auroc = float(roc_auc_score(noisy, -np.asarray(s)))
            group = w.name.rsplit("-", 1)[0]
            for metric, value in (("auroc", auroc), ("seconds", sec)):
                rows.append({"bench": "ot_budget", "cell": w.name, "group": group,
                             "name": name, "metric": metric, "value": value})  # fmt: skip
            print(f"[ot_budget] {w.name} {name}: auroc {auroc:.4f}, {sec:.1f} s", flush=True)
    md = table(rows, TITLE, "ot_budget")
    save("ot_budget", rows, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
