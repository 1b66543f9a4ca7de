"""Data-at-scale benchmark: streaming ingest, embedding throughput, detect and coreset scaling.

    .venv/bin/python -m bench.data                         # 10k, 100k, 1M (the 1M ingest takes a while)
    .venv/bin/python -m bench.data --sizes 10000 100000 --skip embed

- ingest: the ingest stage itself (a subprocess, `python -m stages.ingest`) on the built-in
  `shapes` source, a procedural stream (each image drawn when it is read; nothing
  pre-materialised); records/s over the whole stage and the stage's peak RSS
  (`getrusage(RUSAGE_CHILDREN)`, the largest resident size of the process).
- embed: `otcurate.data.embed_work.embed_shards` (the embed stage's code path) on ingest
  shards, with the default tiny model and with ViT-B-32 (random weights), 0 vs 2 DataLoader
  workers.
- pipeline: every stage in order on the shapes source at --pipeline-sizes (the repo's params;
  --coreset-fraction overrides coreset.fraction): seconds and peak RSS per stage.
- detect, coreset: the library on planted embeddings of the tiny model's width at each size
  (detect.method ot with its default minibatches; coreset goracs choosing 1% of n), seconds and
  the fitted exponent of seconds ~ n^a.

Writes bench/results/data.json (flat rows {"bench": "data", "case", "n", "metric", "value"})
and data.md. One run, one machine, wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.results_io import command, write_results
from otcurate_pipeline import layout
from otcurate_pipeline.tracking import git_state

ROOT = Path(__file__).resolve().parents[1]


def row(case: str, n: int, metric: str, value: float) -> dict:
    return {"bench": "data", "case": case, "n": n, "metric": metric, "value": float(value)}


def params_file(folder: Path, n: int, shard_size: int) -> Path:
    from otcurate_pipeline.params import parse_yaml

    p = parse_yaml((ROOT / "params.yaml").read_text())
    p["ingest"].update({"source": "shapes", "size": n, "shard_size": shard_size})
    p["base"]["device"] = "cpu"
    out = folder / "params.yaml"
    out.write_text(yaml.safe_dump(json.loads(json.dumps(p))))
    return out


def bench_ingest(args, work: Path, rows: list) -> dict[int, Path]:
    made = {}
    for n in args.sizes:
        folder = work / f"ingest-{n}"
        folder.mkdir()
        params = params_file(folder, n, args.shard_size)
        cmd = [sys.executable, "-m", "stages.ingest", "--params", str(params)]
        cmd += layout.stages(ROOT)["ingest"].argv(folder)  # dvc.yaml's paths under folder
        # a fresh process per size: RUSAGE_CHILDREN's maximum is then this child's
        probe = [sys.executable, "-c", _PROBE, json.dumps(cmd)]
        t0 = time.perf_counter()
        out = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, check=True)
        sec = time.perf_counter() - t0
        rss_mb = json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024
        rows += [
            row("ingest/shapes", n, "records_per_s", n / sec),
            row("ingest/shapes", n, "seconds", sec),
            row("ingest/shapes", n, "peak_rss_mb", rss_mb),
        ]
        print(
            f"ingest {n}: {sec:.1f} s ({n / sec:.0f} records/s), peak RSS {rss_mb:.0f} MB",
            flush=True,
        )
        made[n] = folder / layout.stages(ROOT)["ingest"].paths["out"]
    return made


_PROBE = """
import json, resource, subprocess, sys
subprocess.run(json.loads(sys.argv[1]), check=True, stdout=subprocess.DEVNULL)
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _head(shards: list[str], limit: int, path: Path) -> str:
    """The first `limit` pairs of the shards, as one shard file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts, n = [], 0
    for s in shards:
        t = pq.read_table(s).slice(0, limit - n)
        parts.append(t)
        n += t.num_rows
        if n >= limit:
            break
    pq.write_table(pa.concat_tables(parts), path)
    return str(path)


def bench_embed(args, data: Path, rows: list) -> None:
    from otcurate import models
    from otcurate.data.embed_work import embed_shards
    from otcurate.data.shards import shard_files

    shards = [str(f) for f in shard_files(data, "train")]
    for arch, limit in (("otcurate-tiny", args.embed_pairs), ("ViT-B-32", args.embed_pairs_vit)):
        folder = data.parent / f"model-{arch}"
        folder.mkdir(exist_ok=True)
        models.save(models.create(arch), folder)
        use = [_head(shards, limit, data.parent / f"head-{limit}.parquet")]
        for workers in (0, 2):
            t0 = time.perf_counter()
            n = sum(
                len(u)
                for _, u, _, _ in embed_shards(
                    use,
                    str(folder),
                    batch_size=args.embed_batch,
                    device="cpu",
                    threads=args.threads,
                    seed=0,
                    workers=workers,
                )
            )
            sec = time.perf_counter() - t0
            rows.append(row(f"embed/{arch}/workers_{workers}", n, "pairs_per_s", n / sec))
            print(f"embed {arch} workers={workers}: {n} pairs, {n / sec:.0f} pairs/s", flush=True)


def bench_pipeline(args, work: Path, rows: list) -> None:
    """Every stage in order (as dvc repro runs them) on the shapes source of each size, with
    the repo's params (coreset.fraction from --coreset-fraction when given); seconds and peak RSS."""
    for n in args.pipeline_sizes:
        root = work / f"pipeline-{n}"
        root.mkdir()
        params = params_file(root, n, args.shard_size)
        y = yaml.safe_load(params.read_text())
        if args.coreset_fraction is not None:
            y["coreset"]["fraction"] = args.coreset_fraction
            params.write_text(yaml.safe_dump(y))
        total = 0.0
        for stage in layout.stages(ROOT).values():  # in order, as dvc repro runs them
            cmd = [sys.executable, "-m", stage.module, "--params", str(params), *stage.argv(root)]
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", _PROBE, json.dumps(cmd)],
                cwd=ROOT, capture_output=True, text=True,
            )  # fmt: skip
            sec = time.perf_counter() - t0
            if out.returncode != 0:
                raise SystemExit(f"{stage.name} failed at n={n}:\n{out.stderr[-3000:]}")
            rss = json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024
            total += sec
            rows += [
                row(f"pipeline/{stage.name}", n, "seconds", sec),
                row(f"pipeline/{stage.name}", n, "peak_rss_mb", rss),
            ]
            print(f"pipeline {n} {stage.name}: {sec:.1f} s, peak RSS {rss:.0f} MB", flush=True)
        rows.append(row("pipeline/total", n, "seconds", total))
        m = json.loads((root / "results/evaluate/metrics.json").read_text())
        for k in ("base_zs_acc", "finetune_zs_acc", "base_i2t_r1", "finetune_i2t_r1"):
            rows.append(row(f"pipeline/evaluate/{k}", n, "value", m[k]))


def planted(n: int, d: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    img = torch.nn.functional.normalize(base + 0.3 * torch.randn(n, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(base + 0.3 * torch.randn(n, d, generator=g), dim=1)
    k = n // 5
    txt[:k] = txt[torch.roll(torch.arange(k), 1)]
    return img, txt


def bench_detect_coreset(args, rows: list) -> None:
    from otcurate import coreset as cs
    from otcurate import detect as det

    secs: dict[str, list[tuple[int, float]]] = {"detect/ot": [], "coreset/goracs": []}
    # one small call of each first: the first call imports POT (about 2.4 s) and warms the
    # allocator; timed at the smallest size, it flattened the fitted exponent (0.44)
    img, txt = planted(2000, seed=2)
    scores = det.score("ot", img, txt, seed=0)
    pool = cs.Pool(np.arange(2000), img, txt, scores, target_image=img, target_text=txt)
    cs.select("goracs", pool, 20, seed=0)
    for n in args.sizes:
        img, txt = planted(n)
        t0 = time.perf_counter()
        scores = det.score("ot", img, txt, seed=0)
        secs["detect/ot"].append((n, time.perf_counter() - t0))
        tgt_img, tgt_txt = planted(2000, seed=1)
        pool = cs.Pool(np.arange(n), img, txt, scores, target_image=tgt_img, target_text=tgt_txt)
        t0 = time.perf_counter()
        cs.select("goracs", pool, max(10, n // 100), seed=0)
        secs["coreset/goracs"].append((n, time.perf_counter() - t0))
        for case, pts in secs.items():
            print(f"{case} {n}: {pts[-1][1]:.1f} s", flush=True)
    for case, pts in secs.items():
        for n, s in pts:
            rows.append(row(case, n, "seconds", s))
        if len(pts) >= 2:
            a = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]
            rows.append(row(case, pts[-1][0], "scaling_exponent", a))


def write(rows: list, args) -> None:
    """data.json and data.md. With --merge, the rows of the cases not rerun are kept, and so
    are data.md's paragraphs on where earlier rows came from, with one more for this run."""
    notes = []
    if args.merge:  # keep the rows of the cases not rerun
        old = json.loads((ROOT / "bench" / "results" / "data.json").read_text())
        redone = {(r["case"], r["n"], r["metric"]) for r in rows}
        rows = [r for r in old if (r["case"], r["n"], r["metric"]) not in redone] + rows
        paragraphs = (ROOT / "bench" / "results" / "data.md").read_text().split("\n\n")
        before = paragraphs[1].split("`")[1]  # the command that wrote the file last
        cases = sorted({case.split("/")[0] for case, _, _ in redone})
        for p in paragraphs[2:]:
            if p.startswith("| case |"):
                break
            rerun = set(re.findall(r"`(\w+)/\*`", p)) if p.startswith("Rows ") else set()
            if not rerun or not rerun <= set(cases):  # (a rerun of only these cases: replaced)
                notes.append(p.replace("the command above", f"`{before}`"))
        commit, dirty = git_state(ROOT, "src", "bench/*.py")
        rev = f"{commit[:7] if commit != 'none' else '?'}"
        rev += " with uncommitted changes" if dirty else ""
        notes.append(
            f"Rows {', '.join(f'`{c}/*`' for c in cases)} rerun by `{command('data')}` at {rev}"
            " (where a paragraph above says otherwise of them, this one holds)."
        )
    write_results(
        "data", "Data-at-scale benchmark", f"CPU, {args.threads} torch threads", rows, notes
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--embed-pairs", type=int, default=8192)
    ap.add_argument("--embed-pairs-vit", type=int, default=512)
    ap.add_argument("--embed-batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--merge", action="store_true", help="keep other rows of data.json")
    ap.add_argument("--pipeline-sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--coreset-fraction", type=float, default=None, help="default: params.yaml's")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["ingest", "embed", "scaling", "pipeline"]
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        made = {}
        if "ingest" not in args.skip or "embed" not in args.skip:
            sizes = args.sizes if "ingest" not in args.skip else [min(args.sizes)]
            made = bench_ingest(
                argparse.Namespace(**{**vars(args), "sizes": sizes}), Path(tmp), rows
            )
            if "ingest" in args.skip:
                rows.clear()
        if "embed" not in args.skip:
            bench_embed(args, made[min(made)], rows)
        if "scaling" not in args.skip:
            bench_detect_coreset(args, rows)
        if "pipeline" not in args.skip:
            bench_pipeline(args, Path(tmp), rows)
    write(rows, args)
    print(
        f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
