"""distill: a few examples per class, written in the ingest record format so
`finetune` consumes them like real data: real picks (`random_real`) or images synthesised
from the class's Wasserstein barycenter in the base model's feature space (`wmdd`).

Writes `<out>/train-00000.parquet` (+ classes.json) and `<results>/metrics.json`
(wmdd adds `plots/synthetic.png` and `plots/loss.tsv`).
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from otcurate import distill as dist
from otcurate.data.builtin import png_bytes
from otcurate.data.records import SCHEMA
from otcurate.data.shards import (
    read_classes,
    read_selected,
    read_split,
    write_classes,
    write_split,
)
from otcurate.io import atomic_dir, write_json, write_tsv
from otcurate.runtime import make_reproducible, resolve_device
from otcurate_pipeline import artifacts
from stages._common import live_logger, parser, read_params, run


def distill(args) -> None:
    base, p = read_params(args.params, "distill")
    make_reproducible(base.seed, base.threads)
    wmdd = p.method == "wmdd" and p.ipc > 0
    # random_real needs the images of the picked pairs only (read after picking)
    train = read_split(args.data, "train", columns=None if wmdd else ["uid", "label"])
    subset = artifacts.read_subset(args.coreset)
    train_uids = train["uid"].to_pylist()
    flagged = artifacts.read_scores(args.detect, train_uids, against=args.data)
    info = read_classes(args.data)
    labels = np.asarray(train["label"].to_pylist())
    labelled = info is not None and bool((labels >= 0).all())
    image = text = None
    if wmdd or not labelled:  # read once: clusters need the text, wmdd both
        _, image, text = artifacts.read_embeddings(
            args.embed, "train", train_uids, against=args.data
        )
    classes = labels if labelled else dist.clusters(text.numpy(), p.clusters, seed=base.seed)
    # Candidates: pairs detect did not flag, outside the coreset (so the two add up).
    in_subset = pc.is_in(train["uid"], value_set=pa.array(subset.uids, pa.string()))
    ok = ~flagged.noisy & ~in_subset.to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(ok)
    extra: dict = {}
    if wmdd and len(candidates):
        table, metrics, extra = _wmdd(
            args, base, p, train, image, text, classes, candidates, info if labelled else None
        )
    else:
        picked = dist.distill("random_real", classes, candidates, p.ipc, seed=base.seed)
        uids = train["uid"].take(pa.array(picked.indices, pa.int64()))
        table = read_selected(args.data, "train", uids)
        metrics = {"pairs": table.num_rows, "classes": int(len(np.unique(picked.classes)))}
    metrics["ipc"] = p.ipc
    with atomic_dir(args.out) as out:
        write_split(out, "train", table, shard_size=max(1, table.num_rows))
        write_classes(out, info)
    with atomic_dir(args.results) as res:
        write_json(res / "metrics.json", metrics)
        if extra:
            (res / "plots").mkdir()
            from otcurate.evaluate import plot_image_grid

            plot_image_grid(
                res / "plots" / "synthetic.png",
                extra["pixels"],
                extra["row_names"],
                f"WMDD: {len(extra['row_names'])} synthetic images, one row per class",
            )
            losses = extra["losses"]
            write_tsv(res / "plots" / "loss.tsv", {"step": range(len(losses)), "loss": losses})
    print(f"distill ({p.method}): {table.num_rows} pairs for {metrics['classes']} classes")


def _wmdd(args, base, p, train, image, text, classes, candidates, info):
    """Barycenters of the candidates' image features per class, then synthesised images.

    ``info`` is None when ``classes`` are text clusters (no usable labels)."""
    import functools
    import time

    import torch

    from otcurate import models
    from otcurate.evaluate import class_embeddings, zero_shot_accuracy

    t0 = time.perf_counter()
    device = resolve_device(base.device)
    bary = dist.barycenters(
        image, classes, candidates, p.ipc, seed=base.seed, max_iter=p.barycenter_iter
    )
    clip = models.load(args.model, device=device)
    cls_ids = [int(c) for c in np.unique(bary.classes)]
    index = {c: i for i, c in enumerate(cls_ids)}
    captions = train["caption"].to_pylist()
    labelled = info is not None
    if labelled:
        names = [info.class_names[c] for c in cls_ids]
        embed_text = functools.partial(models.encode_texts, clip, batch_size=512)
        classifier = class_embeddings(embed_text, names, info.templates)
    else:  # clusters: the members' mean text embedding stands in for a class prompt
        names = [f"cluster {c}" for c in cls_ids]
        classifier = torch.stack(
            [text[candidates[classes[candidates] == c]].mean(0) for c in cls_ids]
        )
        classifier = torch.nn.functional.normalize(classifier, dim=-1)
    rng = np.random.default_rng(base.seed)
    real = {}
    images_col = train["image"]
    for c in cls_ids:
        members = candidates[classes[candidates] == c]
        take = np.sort(rng.choice(members, size=min(p.stat_samples, len(members)), replace=False))
        x, _ = models.pairs_to_tensors(
            [images_col[int(i)].as_py() for i in take], [captions[int(i)] for i in take], clip
        )
        real[c] = x.to(device)
    stats = dist.class_statistics(clip.model, real)
    cfg = clip.preprocess_cfg
    size = models.input_size(cfg) or (32, 32)
    syn = dist.synthesize(
        clip.model,
        bary,
        classifier,
        index,
        stats,
        size=size,
        mean=tuple(cfg.get("mean")),
        std=tuple(cfg.get("std")),
        scale=float(clip.model.logit_scale.exp().clamp(max=100.0)),
        steps=p.steps,
        lr=p.lr,
        w_feat=p.w_feat,
        w_ce=p.w_ce,
        w_stat=p.w_stat,
        seed=base.seed,
        log=live_logger(),
    )
    from PIL import Image

    uid, cap, lab, png = [], [], [], []
    count: dict[int, int] = {}
    for j, c in enumerate(bary.classes.tolist()):
        n = count.get(c, 0)
        count[c] = n + 1
        uid.append(f"wmdd-{c}-{n}")
        if labelled:
            cap.append(info.templates[n % len(info.templates)].format(info.class_names[c]))
        else:  # the real caption nearest (in image features) to the barycenter point
            cap.append(captions[int(bary.nearest[j])])
        lab.append(c if labelled else -1)
        arr = (syn.pixels[j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        png.append(png_bytes(Image.fromarray(arr)))
    table = pa.table(
        {
            "uid": uid,
            "split": ["train"] * len(uid),
            "image": png,
            "caption": cap,
            "label": pa.array(lab, pa.int32()),
            "noisy": [False] * len(uid),
            "caption_from": uid,
        },
        schema=SCHEMA,
    )
    # Sanity: does the base model read each synthetic image as its class?
    x, _ = models.pairs_to_tensors(png, cap, clip)
    img, _ = models.encode(clip, x)
    y = torch.tensor([index[c] for c in bary.classes.tolist()])
    metrics = {
        "pairs": table.num_rows,
        "classes": len(cls_ids),
        "synthetic_zs_acc": zero_shot_accuracy(img, classifier.cpu(), y),
        "final_loss": syn.losses[-1] if syn.losses else float("nan"),
        **{f"final_{k}": v for k, v in syn.terms.items()},
        "barycenter_w2": float(np.mean(list(bary.cost.values()))),
    }
    print(
        f"distill (wmdd): {time.perf_counter() - t0:.1f} s"
    )  # not in metrics: same inputs, same bytes
    extra = {
        "pixels": syn.pixels.numpy(),
        "row_names": [names[index[c]] for c in bary.classes.tolist()],
        "losses": syn.losses,
    }
    return table, metrics, extra


def main(argv=None) -> int:
    ap = parser("distill", __doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--embed", required=True)
    ap.add_argument("--detect", required=True)
    ap.add_argument("--coreset", required=True)
    ap.add_argument("--model", required=True, help="pretrain output folder (wmdd's feature space)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", required=True)
    return run("distill", distill, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
