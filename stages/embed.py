"""embed: L2-normalised image and text embeddings of every split, once, one shard per ingest shard.

Writes `<out>/<split>-<k>.safetensors` + `<split>-<k>.uids.parquet`.
"""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
import torch

from otcurate import models
from otcurate.data.records import SPLITS
from otcurate.data.shards import shard_files, write_embedding_shard
from otcurate.io import atomic_dir
from otcurate.progress import track
from otcurate.runtime import make_reproducible, resolve_device
from stages._common import parser, read_params, run


def embed(args) -> None:
    base, p = read_params(args.params, "embed")
    device = resolve_device(base.device)
    make_reproducible(base.seed, base.threads, device)
    clip = models.load(args.model, device=device)
    jobs = [(s, f) for s in SPLITS for f in shard_files(args.data, s)]
    if not jobs:
        raise FileNotFoundError(f"{args.data}/train-*.parquet")
    n = 0
    with atomic_dir(args.out) as out:
        for _split, f in track(jobs, total=len(jobs), description="embed: shards"):
            t = pq.read_table(f, columns=["uid", "image", "caption"])
            img_e, txt_e = [], []
            for i in range(0, t.num_rows, p.batch_size):
                part = t.slice(i, p.batch_size)
                x, tok = models.pairs_to_tensors(
                    part["image"].to_pylist(), part["caption"].to_pylist(), clip
                )
                ie, te = models.encode(clip, x, tok, batch_size=p.batch_size)
                img_e.append(ie)
                txt_e.append(te)
            write_embedding_shard(
                out, f.stem, t["uid"].to_pylist(), torch.cat(img_e), torch.cat(txt_e)
            )
            n += t.num_rows
    print(f"embed: {n} pairs from {len(jobs)} shards -> {args.out}")


def main(argv=None) -> int:
    ap = parser("embed", __doc__)
    ap.add_argument("--data", required=True, help="ingest output folder")
    ap.add_argument("--model", required=True, help="pretrain output folder")
    ap.add_argument("--out", required=True)
    return run("embed", embed, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
