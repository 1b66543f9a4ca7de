"""NCU diagnostics: zero-shot / R@1 after NCU with parameter overrides, per-term losses.

Runs `otcurate.ncu.finetune_ncu` in-process on a workspace that `bench/quality.py` left
(base model, ingest shards, a detector's flags), so phase A alone, phase B alone and
single-knob changes can be compared at equal steps. Appends JSON lines to --out.

    .venv/bin/python -m bench.ncu_diag --work bench/work/shapes-0.5-0 \\
        'B_only={"phase_a_fraction":0.0}' 'B_g03={"phase_a_fraction":0.0,"gamma":0.3}'

Each spec is NAME=JSON of `finetune_ncu` keyword overrides on top of: 300 steps, batch 128,
lr 5e-4, warm-up 30, weight decay 0.2, seed 0, n_ctx 4 (phase A: 1-2 % of steps with
phase_a_fraction 0.98 and steps 60 gives "phase A only").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("specs", nargs="+", help="NAME=JSON overrides of finetune_ncu")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "shapes-0.5-0")
    ap.add_argument("--detect", default="detect-ot", help="folder (in --work) with the flags")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ncu_diag.jsonl")
    args = ap.parse_args()

    import numpy as np
    import torch

    from otcurate import models, ncu
    from otcurate.data.shards import read_classes, read_split
    from otcurate.evaluate import split_metrics
    from otcurate.runtime import make_reproducible
    from otcurate_pipeline import artifacts

    w = args.work
    make_reproducible(0, 2, torch.device("cpu"))
    train = read_split(w / "ingest", "train", columns=["uid", "image", "caption"])
    test = read_split(w / "ingest", "test", columns=["image", "caption", "label"])
    info = read_classes(w / "ingest")
    noisy = artifacts.read_scores(w / args.detect, train["uid"].to_pylist()).noisy
    base = models.load(w / "base")
    images, tokens = models.pairs_to_tensors(
        train["image"].to_pylist(), train["caption"].to_pylist(), base
    )

    def metrics(clip) -> dict[str, float]:
        m = split_metrics(clip, test, info, [1], 512)
        return {k: round(m[k], 4) for k in ("zs_acc", "i2t_r1", "t2i_r1")}

    rows = [{"name": "base", **metrics(base)}]
    for spec in args.specs:
        name, over = spec.split("=", 1)
        clip = models.load(w / "base")
        logs: dict[str, list[float]] = defaultdict(list)
        kw = dict(noisy=noisy, steps=300, batch_size=128, lr=5e-4, warmup=30)
        kw |= dict(weight_decay=0.2, seed=0)
        over_kw = json.loads(over)  # NCUOptions fields, or the shared optimisation keywords
        own = {f.name for f in dataclasses.fields(ncu.NCUOptions)}
        opts = ncu.NCUOptions(n_ctx=4, **{k: v for k, v in over_kw.items() if k in own})
        kw |= {k: v for k, v in over_kw.items() if k not in own}
        ncu.finetune_ncu(
            clip.model, images, tokens, opts, log=lambda k, v, s, logs=logs: logs[k].append(v), **kw
        )
        terms = {
            k: [round(float(np.mean(v[:5])), 3), round(float(np.mean(v[-5:])), 3)]
            for k, v in logs.items()
        }
        rows.append(
            {
                "name": name,
                "overrides": json.loads(over),
                **metrics(clip),
                "terms_first5_last5": terms,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
