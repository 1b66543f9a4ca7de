"""How long to pre-train the base: the val curve of pre-training on noisy pairs.

For each dataset x seed, one noisy ingest (the pipeline's stage), then `pretrain` for each
step budget of a ladder (each its own run: the cosine schedule follows the budget), and for
each model, on the clean val split: zero-shot top-1 and i2t / t2i R@1; on the noisy train
split: the in-sample AUROC of the pair cosine against the planted noise (it falls as the
model memorises the noisy pairs) and the share of noisy pairs whose own (wrong) caption is
their nearest among the train captions. The chosen length: the smallest budget whose val
zero-shot is within `--tol` of the best one.

Out-of-sample detection scores (`--crossfit` budgets): two models, each pre-trained from
scratch on one half of the train split (halves by a hash of the uid) with the same budget
and settings, score the other half (cleanlab's out-of-sample predictions, for CLIP); the
AUROC of those scores sits beside the in-sample one.

Writes bench/results/convergence.json (flat rows), convergence.md and convergence.png.

    .venv/bin/python -m bench.convergence --datasets shapes glyphs --steps 200 400 800 1600
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.quality import DATASETS, PRETRAIN, workspace
from bench.results_io import RESULTS, command, save

ROOT = Path(__file__).resolve().parents[1]


def crossfit_scores(ws, train, seed: int, steps: int, folds: int = 2):
    """Pair cosines of each train pair under a model pre-trained without it (k folds)."""
    import hashlib

    import numpy as np
    import torch

    from otcurate import models
    from otcurate.runtime import make_reproducible
    from otcurate.train import train_contrastive
    from otcurate_pipeline.params import load

    p = load(ws.params, "pretrain")
    kw = p.optim_kwargs() | {"steps": steps, "warmup": max(1, steps // 10)}
    uids = train["uid"].to_pylist()
    fold = np.array([int(hashlib.sha1(u.encode()).hexdigest(), 16) % folds for u in uids])
    scores = np.zeros(len(uids))
    for k in range(folds):
        make_reproducible(seed, 2, torch.device("cpu"))
        clip = models.create(p.arch)
        fit, out = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        images, tokens = models.lazy_pairs(
            [train["image"][int(i)].as_py() for i in fit],
            [train["caption"][int(i)].as_py() for i in fit],
            clip,
        )
        train_contrastive(clip.model, images, tokens, **kw, seed=seed, description=f"fold {k}")
        x, t = models.pairs_to_tensors(
            [train["image"][int(i)].as_py() for i in out],
            [train["caption"][int(i)].as_py() for i in out],
            clip,
        )
        img, txt = models.encode(clip, x, t, batch_size=512)
        scores[out] = (img * txt).sum(1).numpy()
    return scores


def curve(
    dataset: str,
    kind: str,
    noise: float,
    seed: int,
    ladder: list[int],
    work: Path,
    crossfit: list[int],
):
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from otcurate import models
    from otcurate.data.shards import read_classes, read_split
    from otcurate.evaluate import split_metrics

    over = {
        "base": {"seed": seed},
        "ingest": DATASETS[dataset] | {"noise": {"rate": noise, "kind": kind}},
        "pretrain": PRETRAIN[dataset],
    }
    ws = workspace(work / f"{dataset}-{kind}-{noise}-{seed}", over)
    ws.check("ingest")
    val = read_split(ws.p("data/ingest"), "val", columns=["image", "caption", "label"])
    train = read_split(ws.p("data/ingest"), "train", columns=["uid", "image", "caption", "noisy"])
    truth = np.asarray(train["noisy"].to_pylist(), dtype=bool)
    info = read_classes(ws.p("data/ingest"))
    rows = []
    for steps in ladder:
        out = f"models/pretrain-{steps}"
        warmup = max(1, steps // 10)
        sec = ws.check(
            "pretrain",
            {"pretrain": {"steps": steps, "warmup": warmup}},
            out=out,
            results=f"results/pretrain-{steps}",
        )
        clip = models.load(ws.p(out))
        m = split_metrics(clip, val, info, [1], 512)
        images, tokens = models.pairs_to_tensors(
            train["image"].to_pylist(), train["caption"].to_pylist(), clip
        )
        img, txt = models.encode(clip, images, tokens, batch_size=512)
        cos = (img * txt).sum(1).numpy()
        # image -> caption, by text: a planted caption always has an identical twin (its source)
        caps = train["caption"].to_pylist()
        best = (img @ txt.T).argmax(dim=1).numpy()
        own_top1 = np.array([caps[b] == caps[i] for i, b in enumerate(best)])
        values = {
            "val_zs_acc": m["zs_acc"],
            "val_i2t_r1": m["i2t_r1"],
            "val_t2i_r1": m["t2i_r1"],
            "train_auroc_in_sample": float(roc_auc_score(truth, -cos)) if truth.any() else 0.0,
            "noisy_own_top1": float(own_top1[truth].mean()) if truth.any() else 0.0,
            "seconds": sec,
        }
        if steps in crossfit and truth.any():
            oos = crossfit_scores(ws, train, seed, steps)
            values["train_auroc_crossfit"] = float(roc_auc_score(truth, -oos))
        for metric, value in values.items():
            rows.append(
                {
                    "bench": "convergence",
                    "dataset": dataset,
                    "kind": kind,
                    "noise": noise,
                    "seed": seed,
                    "steps": steps,
                    "metric": metric,
                    "value": float(value),
                }
            )
        print(f"[convergence] {dataset} seed={seed} steps={steps}: {values}", flush=True)
    return rows


def chosen(rows: list[dict], tol: float) -> dict[str, int]:
    """Per dataset: the smallest budget whose mean val zero-shot is within tol of the best."""
    import numpy as np

    out = {}
    for d in sorted({r["dataset"] for r in rows}):
        zs = {}
        for r in rows:
            if r["dataset"] == d and r["metric"] == "val_zs_acc":
                zs.setdefault(r["steps"], []).append(r["value"])
        mean = {s: float(np.mean(v)) for s, v in zs.items()}
        best = max(mean.values())
        out[d] = min(s for s, v in mean.items() if v >= best - tol)
    return out


def report(rows: list[dict], tol: float, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = ["val_zs_acc", "val_i2t_r1", "train_auroc_in_sample", "noisy_own_top1"]
    if any(r["metric"] == "train_auroc_crossfit" for r in rows):
        metrics.append("train_auroc_crossfit")
    datasets = sorted({r["dataset"] for r in rows})
    pick = chosen(rows, tol)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    lines = [
        "# Pre-training length: the val curve",
        "",
        f"`{command('convergence')}`",
        "",
        "Mean ± std over seeds. val: the clean val split; train: the noisy train split "
        "(in-sample AUROC of the pair cosine against the planted noise; the share of noisy "
        "pairs whose own caption retrieves their image first: memorised noise). "
        f"Chosen: the smallest budget whose val zero-shot is within {tol} of the best.",
        "",
        "| dataset | steps | " + " | ".join(metrics) + " | seeds |",
        "|---|---:|" + "---:|" * (len(metrics) + 1),
    ]
    for d in datasets:
        ladder = sorted({r["steps"] for r in rows if r["dataset"] == d})
        for s in ladder:
            cells, n = [], 0
            for k in metrics:
                v = [
                    r["value"] for r in rows if (r["dataset"], r["steps"], r["metric"]) == (d, s, k)
                ]
                n = max(n, len(v))
                cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "—")
            mark = " (chosen)" if s == pick[d] else ""
            lines.append(f"| {d} | {s}{mark} | " + " | ".join(cells) + f" | {n} |")
        for ax, k in zip(axes, metrics, strict=True):
            mean = [
                np.mean(
                    [
                        r["value"]
                        for r in rows
                        if (r["dataset"], r["steps"], r["metric"]) == (d, s, k)
                    ]
                )
                for s in ladder
            ]
            ax.plot(ladder, mean, marker="o", label=d)
            ax.set_xscale("log", base=2)
            ax.set_title(k)
            ax.set_xlabel("pre-training steps")
    axes[0].legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "convergence.png", dpi=110)
    plt.close(fig)
    lines += ["", "![val curve](convergence.png)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--datasets", nargs="+", default=["shapes", "glyphs"])
    ap.add_argument("--kind", default="mixed")
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", nargs="+", type=int, default=[200, 400, 800, 1600])
    ap.add_argument("--tol", type=float, default=0.01)
    ap.add_argument(
        "--crossfit", nargs="*", type=int, default=[400], help="budgets also scored out-of-sample"
    )
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "convergence")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = []
    for d in args.datasets:
        for s in args.seeds:
            t0 = time.perf_counter()
            rows += curve(d, args.kind, args.noise, s, sorted(args.steps), args.work, args.crossfit)
            print(f"[convergence] {d} seed={s}: {time.perf_counter() - t0:.0f} s", flush=True)
            save("convergence", rows, report(rows, args.tol, args.out), args.out)
    print(report(rows, args.tol, args.out))
    print(f"chosen: {chosen(rows, args.tol)}")


if __name__ == "__main__":
    main()
