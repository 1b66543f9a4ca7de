"""Scale-out benchmark: embedding throughput in-process vs a local Dask cluster, fine-tuning step
time in one process vs torchrun with two.

    .venv/bin/python -m bench.scale                        # defaults: 16384 pairs, 40 steps
    .venv/bin/python -m bench.scale --pairs 4096 --steps 20

Embedding runs the embed stage's own code path (`otcurate.data.embed_work.embed_shards`) on
ingest-format shards of the built-in shapes source, with a model of random weights (the
default tiny architecture, and --arch for more). Fine-tuning times plain CLIP fine-tuning
(`otcurate.train.finetune_clip`) at the same global batch, one process vs `torchrun
--nproc-per-node 2` (gloo on CPU, nccl on CUDA); the first `--warmup` steps are not timed.

Writes bench/results/scale.json (flat rows {"bench": "scale", "case", "n", "metric", "value"})
and scale.md. One run, one machine; wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.results_io import write_results

ROOT = Path(__file__).resolve().parents[1]


def make_shards(folder: Path, pairs: int, shard_size: int) -> list[str]:
    import pyarrow as pa

    from otcurate.data.builtin import shapes
    from otcurate.data.shards import write_split

    recs = list(shapes(0, pairs))
    table = pa.table(
        {
            "uid": pa.array([r.uid for r in recs], pa.string()),
            "split": pa.array(["train"] * len(recs), pa.string()),
            "image": pa.array([r.image for r in recs], pa.binary()),
            "caption": pa.array([r.caption for r in recs], pa.string()),
            "label": pa.array([r.label for r in recs], pa.int32()),
            "noisy": pa.array([False] * len(recs), pa.bool_()),
            "caption_from": pa.array([r.uid for r in recs], pa.string()),
        }
    )
    folder.mkdir(parents=True)
    write_split(folder, "train", table, shard_size)
    return [str(p) for p in sorted(folder.glob("train-*.parquet"))]


def bench_embed(args, work: Path, rows: list) -> None:
    from distributed import LocalCluster

    from otcurate import models
    from otcurate.data.embed_work import embed_shards

    shards = make_shards(work / "shards", args.pairs, args.shard_size)
    for arch in args.arch:
        model_dir = work / f"model-{arch}"
        model_dir.mkdir()
        models.save(models.create(arch), model_dir)
        results = {}

        def run(case, dask, threads=args.threads, arch=arch, model_dir=model_dir):
            t0 = time.perf_counter()
            out = list(
                embed_shards(
                    shards,
                    str(model_dir),
                    batch_size=args.batch_size,
                    device=args.device,
                    threads=threads,
                    seed=0,
                    dask=dask,
                )
            )
            sec = time.perf_counter() - t0
            n = sum(len(o[1]) for o in out)
            rows.append(row(f"embed/{arch}/{case}", n, "seconds", sec))
            rows.append(row(f"embed/{arch}/{case}", n, "pairs_per_s", n / sec))
            print(f"embed {arch} {case}: {n} pairs in {sec:.1f} s ({n / sec:.0f} pairs/s)")
            return out

        results["in_process"] = run("in_process", None)
        # A running cluster, reached by its scheduler address (the embed.dask: tcp://... path):
        # start-up, a first pass (each worker loads the model) and a warm pass, timed apart.
        t0 = time.perf_counter()
        with LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as cluster:
            rows.append(
                row(f"embed/{arch}/dask_2_workers_start", 2, "seconds", time.perf_counter() - t0)
            )
            # tasks on a running cluster use the threads they are given: 1 per worker here,
            # as local:2 splits them
            addr = cluster.scheduler_address
            results["dask_2_workers_first"] = run("dask_2_workers_first", addr, 1)
            results["dask_2_workers_warm"] = run("dask_2_workers_warm", addr, 1)
        run("dask_local_2_with_start", "local:2")  # embed.dask: local:2, start-up included
        same = all(
            a[1] == b[1] and (a[2] == b[2]).all() and (a[3] == b[3]).all()
            for a, b in zip(results["in_process"], results["dask_2_workers_warm"], strict=True)
        )
        rows.append(row(f"embed/{arch}/identical", args.pairs, "value", float(same)))


def bench_finetune(args, work: Path, rows: list) -> None:
    for nproc in (1, 2):
        out = work / f"ft-{nproc}.json"
        cmd = [sys.executable, __file__, "--_worker", str(out), "--steps", str(args.steps)]
        cmd += ["--warmup", str(args.warmup), "--ft-batch", str(args.ft_batch)]
        cmd += ["--threads", str(args.threads), "--device", args.device]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                   "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", "127.0.0.1:0", *cmd[1:]]  # fmt: skip
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(cmd, check=True, env=env)
        r = json.loads(out.read_text())
        rows.append(row(f"finetune/tiny/{nproc}_proc", args.ft_batch, "step_seconds", r["step"]))
        print(
            f"finetune {nproc} process(es): {r['step'] * 1000:.0f} ms/step at batch {args.ft_batch}"
        )


def worker(args) -> None:
    from otcurate import models, parallel
    from otcurate.runtime import make_reproducible, resolve_device
    from otcurate.train import finetune_clip

    device = parallel.init(resolve_device(args.device))
    rank, size = parallel.world()
    make_reproducible(0, max(1, args.threads // size), device)
    clip = models.create("otcurate-tiny", device=device)
    if size > 1:
        parallel.global_batchnorm(clip.model)
    g = torch.Generator().manual_seed(1)
    n = args.ft_batch * 4
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 400, (n, 16), generator=g)
    stamps: list[float] = []
    kw = dict(batch_size=args.ft_batch, lr=1e-4, warmup=1, weight_decay=0.1, seed=0)

    def log(key, value, step):
        stamps.append(time.perf_counter())

    finetune_clip(clip.model, images, tokens, steps=args.steps, log=log, **kw)
    parallel.shutdown()
    timed = stamps[args.warmup :]
    step = (timed[-1] - timed[0]) / max(1, len(timed) - 1)
    if rank == 0:
        Path(args._worker).write_text(json.dumps({"step": step, "world_size": size}))


def row(case: str, n: int, metric: str, value: float) -> dict:
    return {"bench": "scale", "case": case, "n": n, "metric": metric, "value": value}


def write(rows: list, args) -> None:
    write_results(
        "scale",
        "Scale-out benchmark",
        f"device {args.device}, {args.threads} torch threads in total",
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=16384)
    ap.add_argument("--shard-size", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--arch", nargs="+", default=["otcurate-tiny"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ft-batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", nargs="*", default=[], choices=["embed", "finetune"])
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        worker(args)
        return
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        if "embed" not in args.skip:
            bench_embed(args, Path(tmp), rows)
        if "finetune" not in args.skip:
            bench_finetune(args, Path(tmp), rows)
    write(rows, args)


if __name__ == "__main__":
    main()
