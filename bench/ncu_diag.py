"""Fine-tuning ablations on one `bench/quality.py` cell: any `finetune.method` with option
overrides, at equal steps, judged on the clean **val** split (choosing settings on test
would leak), with each loss term's first and last values.

Runs `otcurate.finetuning.finetune` in-process on a cell that `bench/quality.py` left
(data/ingest, models/pretrain, data/detect-<detector>):

    .venv/bin/python -m bench.ncu_diag --work bench/work/shapes-near-0.5-0 --seeds 0 1 \\
        'ncu={}' 'B_only={"phase_a_fraction":0.0}' 'filter={"method":"filter"}'

Each spec is NAME=JSON: "method" (default ncu), the method's options fields, and the shared
optimisation keywords (steps, batch_size, lr, warmup, weight_decay) over --steps and --lr.
Writes bench/results/ncu_diag.json (flat rows: cell, name, seed, metric, value) and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

from bench.results_io import RESULTS, command, save

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("steps", "batch_size", "lr", "warmup", "weight_decay")


def table(rows: list[dict]) -> str:
    import numpy as np

    agg: dict = defaultdict(list)
    for r in rows:
        agg[(r["cell"], r["name"], r["metric"])].append(r["value"])
    metrics = ["zs_acc", "i2t_r1", "t2i_r1"]
    lines = [
        "# Fine-tuning ablations (clean val split)",
        "",
        f"`{command('ncu_diag')}`",
        "",
        "Mean ± std over seeds (the fine-tuning seed; one base per cell).",
        "",
        "| cell | name | " + " | ".join(metrics) + " | seeds |",
        "|---|---|" + "---:|" * (len(metrics) + 1),
    ]
    for cell, name in dict.fromkeys((r["cell"], r["name"]) for r in rows):
        cells, n = [], 0
        for m in metrics:
            v = agg.get((cell, name, m), [])
            n = max(n, len(v))
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "—")
        lines.append(f"| {cell} | {name} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("specs", nargs="+", help="NAME=JSON: method, its options, shared keywords")
    ap.add_argument("--work", type=Path, nargs="+", required=True, help="bench/quality cells")
    ap.add_argument("--detect", default="clip_score", help="detector whose flags are used")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import numpy as np
    import torch

    from otcurate import finetuning, models
    from otcurate.data.shards import read_classes, read_split
    from otcurate.evaluate import split_metrics
    from otcurate.runtime import make_reproducible
    from otcurate_pipeline import artifacts

    rows = []
    for w in args.work:
        data = w / "data" / "ingest"
        train_t = read_split(data, "train", columns=["uid", "image", "caption"])
        val = read_split(data, "val", columns=["image", "caption", "label"])
        info = read_classes(data)
        uids = train_t["uid"].to_pylist()
        noisy = artifacts.read_scores(w / "data" / f"detect-{args.detect}", uids).noisy
        base = models.load(w / "models" / "pretrain")
        images, tokens = models.pairs_to_tensors(
            train_t["image"].to_pylist(), train_t["caption"].to_pylist(), base
        )

        def metrics(clip, val=val, info=info) -> dict[str, float]:
            m = split_metrics(clip, val, info, [1], 512)
            return {k: m[k] for k in ("zs_acc", "i2t_r1", "t2i_r1")}

        def add(name, seed, values, cell=w.name):
            for k, v in values.items():
                rows.append(
                    {"bench": "ncu_diag", "cell": cell, "name": name, "seed": seed, "metric": k,
                     "value": float(v)}
                )  # fmt: skip

        add("base", 0, metrics(base))
        for spec in args.specs:
            name, over = spec.split("=", 1)
            over = json.loads(over)
            method = over.pop("method", "ncu")
            cls = finetuning.FINETUNE_METHODS[method].options
            own = {f.name for f in dataclasses.fields(cls)}
            unknown = set(over) - own - set(SHARED)
            if unknown:
                raise SystemExit(
                    f"{name}: {sorted(unknown)} are neither {method} options nor {SHARED}"
                )
            opts = cls(**{k: v for k, v in over.items() if k in own})
            kw = {"steps": args.steps, "batch_size": 128, "lr": args.lr, "warmup": 15}
            kw |= {"weight_decay": 0.2} | {k: v for k, v in over.items() if k in SHARED}
            for seed in args.seeds:
                make_reproducible(seed, 2, torch.device("cpu"))
                clip = models.load(w / "models" / "pretrain")
                logs: dict[str, list[float]] = defaultdict(list)
                finetuning.finetune(
                    method, clip.model, images, tokens, opts, noisy=noisy, seed=seed,
                    log=lambda k, v, s, logs=logs: logs[k].append(v), **kw,
                )  # fmt: skip
                values = metrics(clip)
                terms = {
                    k: (float(np.mean(v[:5])), float(np.mean(v[-5:]))) for k, v in logs.items()
                }
                add(name, seed, values)
                print(json.dumps({"cell": w.name, "name": name, "seed": seed, **values,
                                  "terms_first5_last5": terms}), flush=True)  # fmt: skip
                save("ncu_diag", rows, table(rows), args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
