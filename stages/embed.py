"""embed: L2-normalised image and text embeddings of every split, once, one shard per ingest shard.

Writes `<out>/<split>-<k>.safetensors` + `<split>-<k>.uids.parquet`. With `embed.dask`
the shards are embedded on a Dask cluster (same results as in-process).
"""

from __future__ import annotations

from otcurate.data.records import SPLITS
from otcurate.data.shards import shard_files, write_embedding_shard
from otcurate.io import atomic_dir
from stages._common import main_process, parser, read_params, run


def embed(args) -> None:
    base, p = read_params(args.params, "embed")
    shards = [str(f.resolve()) for s in SPLITS for f in shard_files(args.data, s)]
    if not shards:
        raise FileNotFoundError(f"{args.data}/train-*.parquet")
    where = f" on Dask ({p.dask})" if p.dask else ""
    print(f"embed: {len(shards)} shards with the model in {args.model}{where}", flush=True)
    # torch and open_clip load now, after the params and inputs are read (#18)
    import torch

    from otcurate.data.embed_work import embed_shards
    from otcurate.runtime import resolve_device

    n = 0
    with atomic_dir(args.out) as out:
        for shard, uids, img, txt in embed_shards(
            shards,
            args.model,
            batch_size=p.batch_size,
            device=base.device,
            threads=base.threads,
            seed=base.seed,
            dask=p.dask,
            workers=p.workers,
            precision=p.resolved_precision(resolve_device(base.device).type),
        ):
            name = shard.rsplit("/", 1)[-1].removesuffix(".parquet")
            write_embedding_shard(out, name, uids, torch.from_numpy(img), torch.from_numpy(txt))
            n += len(uids)
    print(f"embed: {n} pairs from {len(shards)} shards{where} -> {args.out}")


def main(argv=None) -> int:
    ap = parser("embed", __doc__)
    ap.add_argument("--data", required=True, help="ingest output folder")
    ap.add_argument("--model", required=True, help="pretrain output folder")
    ap.add_argument("--out", required=True)
    return run("embed", embed, ap.parse_args(argv))


if __name__ == "__main__":
    main_process(main, __spec__ and __spec__.name)
