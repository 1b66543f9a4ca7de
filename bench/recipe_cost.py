"""What the two-round OT recipe costs per fine-tuning step, against a plain CLIP step (#14).

The recipe (`finetune.method: filter`, `finetune.filter.rounds: 2`,
`finetune.filter.rescore: ot`) runs plain CLIP steps on the unflagged pairs, and between the
rounds embeds every pair with the model being fine-tuned and scores them by OT detection.
That rescoring is paid once per run, so its cost per step depends on the pairs and the
steps: this times whole runs at the benchmark's size (shapes, ``--pairs`` pairs, half of them
flagged, ``--steps`` steps at batch 128 on otcurate-tiny) and divides by the steps; then
times the rescoring's parts alone (embedding every pair; OT scoring, and the cosine for
comparison).

    .venv/bin/python -m bench.recipe_cost --pairs 9669 --steps 150 --repeats 5

Writes bench/results/recipe_cost.{json,md}: rows {bench, case, n, metric, value}, each time
the median of ``--repeats`` runs after a warm-up, with its spread (`spread`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from bench import speed
from bench.results_io import save

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=9669)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from otcurate import finetuning, models
    from otcurate.data import builtin
    from otcurate.options import FilterOptions, OTOptions

    recs = [builtin.shapes_record(0, i) for i in range(args.pairs)]
    noisy = np.zeros(len(recs), dtype=bool)
    noisy[::2] = True  # rate 0.5, as the benchmark's cells
    kw = dict(batch_size=128, lr=1e-4, warmup=0, weight_decay=0.2, seed=0)
    two_rounds = FilterOptions(rounds=2, rescore="ot")
    ot50 = OTOptions(max_iter=50)  # bench/results/ot_budget.md: the same AUROC, 1/20 the time
    recipes = {  # name -> (method, options, extra keywords)
        "clip": ("clip", None, {}),
        "filter": ("filter", None, {}),
        "filter_ot_2r": ("filter", two_rounds, {}),
        "filter_ot50_2r": ("filter", two_rounds, {"rescore_options": ot50}),
    }
    case = f"finetune run otcurate-tiny B=128, {args.pairs} pairs, {args.steps} steps"
    rows, per_step = [], {}
    for name, (method, opts, extra) in recipes.items():
        torch.manual_seed(0)
        clip = models.create("otcurate-tiny")
        x, t = models.pairs_to_tensors([r.image for r in recs], [r.caption for r in recs], clip)

        def run(n, method=method, opts=opts, extra=extra, clip=clip, x=x, t=t):
            finetuning.finetune(method, clip.model, x, t, opts, noisy=noisy, steps=n, **extra, **kw)

        run(4)  # warm-up: allocators and kernels (two rounds of 2 steps for the recipe)
        times, _ = speed.timed(lambda run=run: run(args.steps), args.repeats)
        per_step[name] = [s / args.steps for s in times]
        rows += speed.spread(case, args.pairs, f"seconds_{name}_step", per_step[name])
        print(f"[recipe_cost] {name}: {statistics.median(per_step[name]):.4f} s/step", flush=True)
    # The rescoring's two parts, on the last model: embedding every pair, then scoring.
    from otcurate.detect import score
    from otcurate.filtering import embed_pairs

    parts = {}
    emb, (image, text) = speed.timed(
        lambda: embed_pairs(clip.model.eval(), x, t, batch_size=128), args.repeats
    )
    parts["embed"] = emb
    for name, method, opts in (
        ("ot", "ot", None),
        ("ot50", "ot", ot50),
        ("clip_score", "clip_score", None),
    ):
        parts[f"score_{name}"], _ = speed.timed(
            lambda m=method, o=opts: score(m, image, text, o, seed=0), args.repeats
        )
    for name, times in parts.items():
        rows += speed.spread(case, args.pairs, f"seconds_rescore_{name}", times)
        print(f"[recipe_cost] rescore {name}: {statistics.median(times):.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    for name in ("filter", "filter_ot_2r", "filter_ot50_2r"):
        rows.append(
            {"case": case, "n": args.pairs, "metric": f"{name}_over_clip_step",
             "value": med[name] / med["clip"]}
        )  # fmt: skip
    rows = [{"bench": "recipe_cost", **r} for r in rows]
    lines = [
        "# The recipe's cost per fine-tuning step",
        "",
        f"`.venv/bin/python -m bench.recipe_cost --pairs {args.pairs} --steps {args.steps} "
        f"--repeats {args.repeats}`: whole runs divided by the steps (the recipe's rescoring "
        "between rounds included), median (min-max) of the repeats. `filter_ot50_2r`: the "
        "recipe with OT rescoring at `max_iter` 50 instead of 1000 (`detect.ot.max_iter: 50` "
        "with `finetune.filter.rescore: detect`).",
        "",
        "| method | seconds per step | over a plain CLIP step |",
        "|---|---:|---:|",
    ]
    for name, v in per_step.items():
        lines.append(
            f"| {name} | {med[name]:.4f} ({min(v):.4f}-{max(v):.4f}) | {med[name] / med['clip']:.2f} |"
        )
    lines += [
        "",
        "The rescoring between the rounds, in parts (seconds, once per run):",
        "",
        "| part | seconds |",
        "|---|---:|",
    ]
    for name, v in parts.items():
        lines.append(f"| {name} | {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f}) |")
    save("recipe_cost", rows, "\n".join(lines) + "\n", args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
