"""The unit of embedding work (one ingest shard -> its embeddings), in-process or on a Dask cluster.

`embed_shard` reads one parquet shard and returns (uids, image embeddings, text embeddings);
it is importable by Dask workers (it lives in the installed package) and loads the model
once per worker process. `embed_shards` yields the results in job order, from this
process or from a Dask cluster: the same function on the same shard with the same batch
boundaries, so the embeddings do not depend on where they were computed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from otcurate.progress import track

_MODELS: dict[tuple[str, str], object] = {}
_LOCAL = re.compile(r"^local(?::(\d+))?$")


def embed_shard(
    shard: str, model_dir: str, batch_size: int, device: str, threads: int, seed: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Embeddings of one ingest shard: (uids, (n, d) image, (n, d) text), float32, L2-normalised."""
    from otcurate import models
    from otcurate.runtime import make_reproducible, resolve_device

    dev = resolve_device(device)
    make_reproducible(seed, threads, dev)
    key = (str(Path(model_dir).resolve()), str(dev))
    if key not in _MODELS:
        _MODELS[key] = models.load(model_dir, device=dev)
    clip = _MODELS[key]
    t = pq.read_table(shard, columns=["uid", "image", "caption"])
    img_e, txt_e = [], []
    for i in range(0, t.num_rows, batch_size):
        part = t.slice(i, batch_size)
        x, tok = models.pairs_to_tensors(
            part["image"].to_pylist(), part["caption"].to_pylist(), clip
        )
        ie, te = models.encode(clip, x, tok, batch_size=batch_size)
        img_e.append(ie)
        txt_e.append(te)
    img = torch.cat(img_e).numpy() if img_e else np.zeros((0, 0), np.float32)
    txt = torch.cat(txt_e).numpy() if txt_e else np.zeros((0, 0), np.float32)
    return t["uid"].to_pylist(), img, txt


def check_dask_address(value: str | None) -> None:
    """None, 'local', 'local:N' (N worker processes on this machine) or a scheduler address."""
    if value is None or _LOCAL.match(value) or "://" in value:
        return
    raise ValueError(
        f"embed.dask must be null (in-process), 'local' / 'local:N' (a local cluster of N worker "
        f"processes) or a scheduler address such as tcp://127.0.0.1:8786; got {value!r}."
    )


@contextmanager
def dask_client(address: str, threads: int):
    """A Dask client: a LocalCluster bound to 127.0.0.1 (no dashboard) or a running scheduler."""
    from distributed import Client, LocalCluster

    m = _LOCAL.match(address)
    if m is None:
        with Client(address, timeout="30s") as client:
            yield client, threads
        return
    workers = int(m.group(1) or 2)
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        # the workers share this machine's cores: the same total torch threads as one process
        yield client, max(1, threads // workers)


def embed_shards(
    shards: list[str],
    model_dir: str,
    *,
    batch_size: int,
    device: str,
    threads: int,
    seed: int,
    dask: str | None = None,
) -> Iterator[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """(shard, uids, image, text) for each shard, in order; on a Dask cluster when `dask` is set."""
    desc = "embed: shards"
    if dask is None:
        for s in track(shards, total=len(shards), description=desc):
            yield (s, *embed_shard(s, model_dir, batch_size, device, threads, seed))
        return
    with dask_client(dask, threads) as (client, worker_threads):
        # (a partial: Client.map has its own batch_size keyword)
        work = partial(
            embed_shard,
            model_dir=str(Path(model_dir).resolve()),
            batch_size=batch_size,
            device=device,
            threads=worker_threads,
            seed=seed,
        )
        futures = client.map(work, shards, pure=False)
        for s, fut in track(
            zip(shards, futures, strict=True), total=len(shards), description=f"{desc} (dask)"
        ):
            yield (s, *fut.result())
            fut.release()
