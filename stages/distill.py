"""distill: a few examples per class, written in the ingest record format so
`finetune` consumes them like real data: real picks (`random_real`) or images synthesised
from the class's Wasserstein barycenter in the base model's feature space (`wmdd`).

Either set is then relabelled (WMDD's third step, `distill.relabel`): the base model's soft
label over the class prompts for each of a few augmented views of every image, which
`finetune` learns by KL instead of reading the set as hard pairs.

Writes `<out>/train-00000.parquet` (+ classes.json, + soft_labels.* when relabelled) and
`<results>/metrics.json` (wmdd adds `plots/synthetic.png` and `plots/loss.tsv`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from otcurate.data.shards import read_classes, read_selected, read_split
from otcurate.io import atomic_dir, write_json, write_tsv
from otcurate_pipeline import artifacts
from stages._common import live_logger, main_process, parser, read_params, run


def distill(args) -> None:
    base, p = read_params(args.params, "distill")
    wmdd = p.method == "wmdd" and p.ipc > 0
    # random_real needs the images of the picked pairs only (read after picking)
    columns = None if wmdd else ["uid", "label", "caption"]  # captions: prompts of clusters
    train = read_split(args.data, "train", columns=columns)
    subset = artifacts.read_subset(args.coreset)
    train_uids = train["uid"].to_pylist()
    flagged = artifacts.read_scores(args.detect, train_uids, against=args.data)
    print(f"distill ({p.method}): {p.ipc} per class from {len(train_uids)} train pairs", flush=True)
    # torch and open_clip load now, after the params and inputs are read (#18)
    from otcurate import distill as dist
    from otcurate import models
    from otcurate.clusters import clusters
    from otcurate.runtime import make_reproducible, resolve_device

    make_reproducible(base.seed, base.threads)
    info = read_classes(args.data)
    labels = np.asarray(train["label"].to_pylist())
    labelled = info is not None and bool((labels >= 0).all())
    image = text = None
    if wmdd or not labelled:  # read once: clusters need the text, wmdd both
        _, image, text = artifacts.read_embeddings(
            args.embed, "train", train_uids, against=args.data
        )
    classes = labels if labelled else clusters(text.numpy(), p.clusters, seed=base.seed)
    # Candidates: pairs detect did not flag, outside the coreset (so the two add up).
    in_subset = pc.is_in(train["uid"], value_set=pa.array(subset.uids, pa.string()))
    ok = ~flagged.noisy & ~in_subset.to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(ok)
    made = clip = None
    relabel = p.relabel.views > 0 and p.ipc > 0 and len(candidates) > 0
    if wmdd and len(candidates) or relabel:
        clip = models.load(args.model, device=resolve_device(base.device))
    if wmdd and len(candidates):
        made = dist.wmdd(
            clip,
            image,
            text,
            lambda i, col=train["image"]: col[i].as_py(),  # only the images it samples
            train["caption"].to_pylist(),
            classes,
            candidates,
            p.ipc,
            info if labelled else None,
            p.method_options(),
            seed=base.seed,
            log=live_logger(),
        )
        table = artifacts.distilled_table(made.uids, made.images, made.captions, made.labels)
        metrics = made.metrics
    else:
        picked = dist.distill("random_real", classes, candidates, p.ipc, seed=base.seed)
        uids = train["uid"].take(pa.array(picked.indices, pa.int64()))
        table = read_selected(args.data, "train", uids)
        metrics = {"pairs": table.num_rows, "classes": int(len(np.unique(picked.classes)))}
    metrics["ipc"] = p.ipc
    soft = None
    if relabel and table.num_rows:
        # The base is the teacher: its soft label for every view, over every class's prompts.
        ids = range(len(info.class_names)) if labelled else np.unique(classes[candidates])
        prompts = dist.class_prompts(
            info if labelled else None,
            [int(c) for c in ids],
            captions=None if labelled else train["caption"].to_pylist(),
            text=text,
            classes=classes,
            candidates=candidates,
        )
        opts = dist.RelabelOptions(views=p.relabel.views, min_scale=p.relabel.min_scale)
        soft = dist.soft_label_set(clip, table["image"].to_pylist(), prompts, opts, seed=base.seed)
        metrics.update(
            dist.soft_label_metrics(soft, table["label"].to_pylist() if labelled else None)
        )
    with atomic_dir(args.out) as out:
        artifacts.write_distilled(out, table, info)
        if soft is not None:
            artifacts.write_soft_labels(out, table["uid"].to_pylist(), soft)
    with atomic_dir(args.results) as res:
        write_json(res / "metrics.json", metrics)
        if made is not None:
            from otcurate.evaluate import plot_image_grid

            (res / "plots").mkdir()
            plot_image_grid(
                res / "plots" / "synthetic.png",
                made.pixels,
                made.row_names,
                f"WMDD: {len(made.row_names)} synthetic images, one row per class",
            )
            steps = range(len(made.losses))
            write_tsv(res / "plots" / "loss.tsv", {"step": steps, "loss": made.losses})
    print(
        f"distill ({p.method}): {table.num_rows} pairs for {metrics['classes']} classes"
        + (f", soft labels on {p.relabel.views} views each" if soft is not None else "")
    )


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
    main_process(main, __spec__ and __spec__.name)
