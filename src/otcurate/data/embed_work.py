"""The unit of embedding work (one ingest shard -> its embeddings), in-process or on a Dask cluster.

`embed_shard` reads one parquet shard and returns (uids, image embeddings, text embeddings);
it is importable by Dask workers (it lives in the installed package) and loads the model
once per worker process. `embed_shards` yields the results in job order, from this
process or from a Dask cluster: the same function on the same shard with the same batch
boundaries, so the embeddings do not depend on where they were computed.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from otcurate.data.cluster import LOCAL
from otcurate.progress import track

_MODELS: dict[tuple[str, str], object] = {}


class ShardBatches(torch.utils.data.Dataset):
    """Batch k of the pairs in `shards` (in shard order), decoded with the model's own
    open_clip preprocessing: (shard index, uids, images (B, 3, H, W), tokens (B, L)).

    Each DataLoader worker reads a shard once (it keeps the last one it read) and decodes
    whole batches, so workers=0 and workers=N give the same tensors.
    """

    def __init__(self, shards: list[str], clip, batch_size: int):
        self.shards, self.clip, self.batch_size = shards, clip, batch_size
        self.items: list[tuple[int, int, int]] = []
        for k, s in enumerate(shards):
            n = pq.read_metadata(s).num_rows
            self.items += [(k, i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        self._cached: tuple[int, object] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, b: int):
        from otcurate import models

        k, lo, hi = self.items[b]
        if self._cached is None or self._cached[0] != k:
            self._cached = (k, pq.read_table(self.shards[k], columns=["uid", "image", "caption"]))
        t = self._cached[1].slice(lo, hi - lo)
        x, tok = models.pairs_to_tensors(
            t["image"].to_pylist(), t["caption"].to_pylist(), self.clip
        )
        return k, t["uid"].to_pylist(), x, tok


def _loader_workers(requested: int) -> int:
    # A daemonic process (a Dask worker) may not start DataLoader workers.
    return 0 if multiprocessing.current_process().daemon else requested


def _model(model_dir: str, device: str, threads: int, seed: int):
    """Seed and threads set, the model loaded once per process (and device)."""
    from otcurate import models
    from otcurate.runtime import make_reproducible, resolve_device

    dev = resolve_device(device)
    make_reproducible(seed, threads, dev)
    key = (str(Path(model_dir).resolve()), str(dev))
    if key not in _MODELS:
        _MODELS[key] = models.load(model_dir, device=dev)
    return _MODELS[key]


def _embed_batches(
    shards: list[str], clip, batch_size: int, workers: int, precision: str
) -> Iterator[tuple[int, list[str], np.ndarray, np.ndarray]]:
    """(shard index, uids, image, text) per shard, in order, through a DataLoader."""
    from otcurate import models

    data = ShardBatches(shards, clip, batch_size)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=_loader_workers(workers),
        pin_memory=clip.device.type == "cuda",
    )
    current, uids, img_e, txt_e = None, [], [], []
    for k, u, x, tok in loader:
        if current is not None and k != current:
            yield current, uids, torch.cat(img_e).numpy(), torch.cat(txt_e).numpy()
            uids, img_e, txt_e = [], [], []
        current = k
        ie, te = models.encode(clip, x, tok, batch_size=batch_size, precision=precision)
        uids += u
        img_e.append(ie)
        txt_e.append(te)
    if current is not None:
        yield current, uids, torch.cat(img_e).numpy(), torch.cat(txt_e).numpy()


def embed_shard(
    shard: str,
    model_dir: str,
    batch_size: int,
    device: str,
    threads: int,
    seed: int,
    precision: str = "fp32",
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Embeddings of one ingest shard: (uids, (n, d) image, (n, d) text), float32, L2-normalised.

    The unit of work on a Dask worker: the model is loaded once per worker process.
    """
    clip = _model(model_dir, device, threads, seed)
    for _, uids, img, txt in _embed_batches([shard], clip, batch_size, 0, precision):
        return uids, img, txt
    return [], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)


@contextmanager
def dask_client(address: str, threads: int):
    """A Dask client: a LocalCluster bound to 127.0.0.1 (no dashboard) or a running scheduler."""
    from distributed import Client, LocalCluster

    m = LOCAL.match(address)
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
    workers: int = 0,
    precision: str = "fp32",
) -> Iterator[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """(shard, uids, image, text) for each shard, in order.

    In-process: one DataLoader over all shards with `workers` decoding processes.
    With `dask`: one task per shard on the cluster (decoding in the task).
    """
    desc = "embed: shards"
    if dask is None:
        clip = _model(model_dir, device, threads, seed)
        batches = _embed_batches(shards, clip, batch_size, workers, precision)
        for k, uids, img, txt in track(batches, total=len(shards), description=desc):
            yield shards[k], uids, img, txt
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
            precision=precision,
        )
        futures = client.map(work, shards, pure=False)
        for s, fut in track(
            zip(shards, futures, strict=True), total=len(shards), description=f"{desc} (dask)"
        ):
            yield (s, *fut.result())
            fut.release()
