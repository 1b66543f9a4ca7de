"""distill: a few examples per class, written in the ingest record format so
`finetune` consumes them like real data.

Writes `<out>/train-00000.parquet` (+ classes.json) and `<results>/metrics.json`.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from otcurate import distill as dist
from otcurate.data.shards import (
    read_classes,
    read_embeddings,
    read_split,
    write_classes,
    write_split,
)
from otcurate.io import atomic_dir, write_json
from otcurate.runtime import make_reproducible
from stages._common import StageError, parser, read_params, run


def distill(args) -> None:
    base, p = read_params(args.params, "distill")
    make_reproducible(base.seed, base.threads)
    train = read_split(args.data, "train")
    subset = pq.read_table(f"{args.coreset}/subset.parquet", columns=["uid"])
    flagged = pq.read_table(f"{args.detect}/scores.parquet", columns=["uid", "noisy"])
    info = read_classes(args.data)
    if flagged["uid"].to_pylist() != train["uid"].to_pylist():
        raise StageError(f"{args.detect} does not match {args.data}; rerun detect.")
    labels = np.asarray(train["label"].to_pylist())
    if info is None or (labels < 0).any():
        _, _, text = read_embeddings(args.embed, "train")
        classes = dist.clusters(text.numpy(), p.clusters, seed=base.seed)
    else:
        classes = labels
    # Candidates: pairs detect did not flag, outside the coreset (so the two add up).
    in_subset = pc.is_in(train["uid"], value_set=subset["uid"]).to_numpy(zero_copy_only=False)
    ok = ~np.asarray(flagged["noisy"].to_pylist(), dtype=bool) & ~in_subset
    picked = dist.distill(p.method, classes, np.flatnonzero(ok), p.ipc, seed=base.seed)
    table = train.take(pa.array(picked.indices, pa.int64()))
    with atomic_dir(args.out) as out:
        write_split(out, "train", table, shard_size=max(1, table.num_rows))
        write_classes(out, info)
    metrics = {
        "pairs": table.num_rows,
        "classes": int(len(np.unique(picked.classes))),
        "ipc": p.ipc,
    }
    with atomic_dir(args.results) as res:
        write_json(res / "metrics.json", metrics)
    print(f"distill ({p.method}): {table.num_rows} pairs for {metrics['classes']} classes")


def main(argv=None) -> int:
    ap = parser("distill", __doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--embed", required=True)
    ap.add_argument("--detect", required=True)
    ap.add_argument("--coreset", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", required=True)
    return run("distill", distill, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
