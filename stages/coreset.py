"""coreset: choose the train pairs to fine-tune on (uids, never copies of images).

The target of `goracs` is the val split (clean by construction: noise is planted in train
only), or the clean source named in `coreset.target`. Writes `<out>/subset.parquet` (uid, weight, score) and `<results>/metrics.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from otcurate.data.shards import read_split
from otcurate.io import atomic_dir, write_json
from otcurate_pipeline import artifacts
from stages._common import StageError, main_process, model_logit_scale, parser, read_params, run


def _labels(data_dir: str, split: str, uids: list[str]) -> np.ndarray:
    t = read_split(data_dir, split, columns=["uid", "label"])
    artifacts.check_uids(
        Path(data_dir), t["uid"].to_pylist(), uids, f"the {split} embeddings", "embed"
    )
    return np.asarray(t["label"].to_pylist(), dtype=np.int64)


def _named_target(spec, args, base):
    """Embeddings (one row per caption) and labels of the clean source in coreset.target.

    Its labels are used only when it has the ingest source's classes (same names, same
    order); otherwise the groups come from text clusters.
    """
    from otcurate import models
    from otcurate.data.evalsets import load_clean
    from otcurate.data.hf import SourceError
    from otcurate.data.shards import read_classes
    from otcurate.runtime import resolve_device

    try:
        cset = load_clean(spec, key="coreset.target.hf")
    except (SourceError, ValueError) as exc:
        raise StageError(f"coreset.target: {exc}") from exc
    if len(cset.captions) < 2:
        raise StageError("coreset.target: the source gave fewer than 2 usable pairs.")
    clip = models.load(args.model, device=resolve_device(base.device))
    images, tokens = models.pairs_to_tensors(*cset.pairs(), clip)
    img, txt = models.encode(clip, images, tokens)
    labels = cset.labels[cset.caption_image]
    ours = read_classes(args.data)
    if cset.info is None or ours is None or cset.info.class_names != ours.class_names:
        labels = np.full(len(labels), -1, np.int64)
    return img, txt, labels


def coreset(args) -> None:
    base, p = read_params(args.params, "coreset")
    flags = artifacts.read_scores(args.detect)
    print(f"coreset ({p.method}): choosing among {len(flags.uids)} train pairs", flush=True)
    # torch loads now, after the params and inputs are read (#18)
    from otcurate import coreset as cs
    from otcurate.runtime import make_reproducible

    make_reproducible(base.seed, base.threads)
    uids, image, text = artifacts.read_embeddings(args.embed, "train")
    artifacts.check_uids(Path(args.detect), flags.uids, uids, args.embed, "detect")
    scores, flagged = flags.score, flags.noisy
    candidates = np.flatnonzero(~flagged) if p.exclude_flagged else np.arange(len(uids))
    try:
        k = cs.budget(len(uids), len(candidates), fraction=p.fraction, size=p.size)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    extra = {}
    if p.method == "goracs":
        if p.target is not None:
            v_image, v_text, v_labels = _named_target(p.target, args, base)
        else:
            try:
                v_uids, v_image, v_text = artifacts.read_embeddings(args.embed, "val")
            except FileNotFoundError:
                v_uids, v_image, v_text = [], None, None
            if not v_uids:
                raise StageError(
                    "coreset.method goracs needs a clean target: the val split is empty; "
                    "raise ingest.val_fraction, or name a clean source in coreset.target."
                )
            v_labels = _labels(args.data, "val", v_uids)
        extra = dict(
            labels=_labels(args.data, "train", uids),
            target_image=v_image,
            target_text=v_text,
            target_labels=v_labels,
            logit_scale=model_logit_scale(args.model),
        )
    pool = cs.Pool(candidates, image, text, scores, **extra)
    try:
        sel = cs.select(p.method, pool, k, p.method_options(), seed=base.seed)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    u = np.asarray(uids, dtype=object)
    with atomic_dir(args.out) as out:
        artifacts.write_subset(out, u[sel.indices].tolist(), sel.weights, sel.scores)
    metrics = {
        "size": len(sel.indices),
        "candidates": len(candidates),
        "train_pairs": len(uids),
        "fraction_of_train": len(sel.indices) / len(uids),
        "mean_score": float(np.mean(sel.scores)),
        **sel.info,
    }
    with atomic_dir(args.results) as res:
        write_json(res / "metrics.json", metrics)
    print(
        f"coreset ({p.method}): {len(sel.indices)} of {len(candidates)} candidates ({len(uids)} train pairs)"
    )


def main(argv=None) -> int:
    ap = parser("coreset", __doc__)
    ap.add_argument("--embed", required=True)
    ap.add_argument("--detect", required=True)
    ap.add_argument("--data", required=True, help="ingest output folder (labels for groups)")
    ap.add_argument("--model", required=True, help="pretrain output folder (temperature)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", required=True)
    return run("coreset", coreset, ap.parse_args(argv))


if __name__ == "__main__":
    main_process(main, __spec__ and __spec__.name)
