"""evaluate: base vs fine-tuned on the clean test split and on the clean sets of evaluate.sets.

Zero-shot accuracy (class-name prompts), image->text and text->image recall@k,
and detection quality from `detect`. Writes `<results>/metrics.json`,
`<results>/report.md` and `<results>/plots/{comparison,scores}.png`.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch

from otcurate import detect as det
from otcurate import evaluate as ev
from otcurate import models
from otcurate.data.shards import read_classes, read_split
from otcurate.io import atomic_dir, write_json, write_text
from otcurate.runtime import make_reproducible, resolve_device
from otcurate_pipeline import artifacts
from stages._common import StageError, parser, read_params, run


def _model_metrics(clip: models.Clip, test, info, ks, batch_size: int) -> dict[str, float]:
    images, tokens = models.pairs_to_tensors(
        test["image"].to_pylist(), test["caption"].to_pylist(), clip
    )
    img, txt = models.encode(clip, images, tokens, batch_size=batch_size)
    out = ev.retrieval_recall(img, txt, test["caption"].to_pylist(), ks)
    labels = torch.tensor(test["label"].to_pylist())
    if info is not None and (labels >= 0).all():
        embed_text = functools.partial(models.encode_texts, clip, batch_size=batch_size)
        classes = ev.class_embeddings(embed_text, info.class_names, info.templates)
        out["zs_acc"] = ev.zero_shot_accuracy(img, classes, labels)
        out["zs_acc_top5"] = ev.zero_shot_accuracy(img, classes, labels, topk=5)
    return out


def _set_metrics(clip: models.Clip, cset, spec, ks, batch_size: int) -> dict[str, float]:
    """Metrics of one evaluate.sets entry (distinct images encoded once)."""
    img, _ = models.encode(clip, models.decode_images(cset.images, clip), batch_size=batch_size)
    if spec.task == "retrieval":
        txt = models.encode_texts(clip, cset.captions, batch_size=batch_size)
        return ev.retrieval_recall_grouped(img, txt, torch.from_numpy(cset.caption_image), ks)
    labels = torch.from_numpy(cset.labels)
    if cset.info is None or (labels < 0).any():
        raise StageError(
            f"evaluate.sets {spec.name}: a classification set needs a label for every image and "
            "class names (hf.label_column, hf.class_names)."
        )
    templates = spec.templates or cset.info.templates
    embed_text = functools.partial(models.encode_texts, clip, batch_size=batch_size)
    classes = ev.class_embeddings(embed_text, cset.info.class_names, templates)
    return {
        "zs_acc": ev.zero_shot_accuracy(img, classes, labels),
        "zs_acc_top5": ev.zero_shot_accuracy(img, classes, labels, topk=5),
    }


def _load_sets(sets) -> list:
    from otcurate.data.evalsets import load_clean
    from otcurate.data.hf import SourceError

    out = []
    for spec in sets:
        try:
            cset = load_clean(spec)
        except (SourceError, ValueError) as exc:
            raise StageError(f"evaluate.sets {spec.name}: {exc}") from exc
        if not cset.images:
            raise StageError(f"evaluate.sets {spec.name}: the source gave no usable pairs.")
        out.append((spec, cset))
    return out


def evaluate(args) -> None:
    base, p = read_params(args.params, "evaluate")
    device = resolve_device(base.device)
    make_reproducible(base.seed, base.threads, device)
    test = read_split(args.data, "test", columns=["image", "caption", "label"])
    if test.num_rows == 0:
        raise StageError(f"the test split in {args.data} is empty; raise ingest.test_fraction.")
    info = read_classes(args.data)
    sets = _load_sets(p.sets)
    rows = {}
    for name, folder in (("base", args.base), ("finetune", args.finetuned)):
        clip = models.load(folder, device=device)
        rows[name] = _model_metrics(clip, test, info, p.recall_at, p.batch_size)
        for spec, cset in sets:
            for k, v in _set_metrics(clip, cset, spec, p.recall_at, p.batch_size).items():
                rows[name][f"{spec.name}_{k}"] = v

    truth_t = read_split(args.data, "train", columns=["uid", "noisy"])
    scores = artifacts.read_scores(args.detect, truth_t["uid"].to_pylist(), against=args.data)
    s, flags = scores.score, scores.noisy
    truth = np.asarray(truth_t["noisy"].to_pylist(), dtype=bool)
    detection = (
        det.quality(s, flags, truth) if truth.any() else {"est_noise_rate": float(flags.mean())}
    )

    metrics = {f"{m}_{k}": v for m, r in rows.items() for k, v in r.items()}
    metrics.update({f"detect_{k}": v for k, v in detection.items()})
    for k in rows["base"]:
        metrics[f"delta_{k}"] = rows["finetune"][k] - rows["base"][k]

    shown = [
        k
        for k in ("zs_acc", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10")
        if k in rows["base"]
    ]
    lines = [
        "# otcurate: base vs fine-tuned",
        "",
        f"Clean test split: {test.num_rows} pairs. Higher is better.",
        "",
        "| metric | base | fine-tuned | change |",
        "|---|---:|---:|---:|",
    ]
    for k in shown:
        b, f = rows["base"][k], rows["finetune"][k]
        lines.append(f"| {k} | {b:.4f} | {f:.4f} | {f - b:+.4f} |")
    for spec, cset in sets:
        what = (
            f"{len(cset.images)} images, {len(cset.captions)} captions"
            if spec.task == "retrieval"
            else f"{len(cset.images)} images, {len(cset.info.class_names)} classes"
        )
        lines += ["", f"## {spec.name} ({spec.task}; {what})", ""]
        lines += ["| metric | base | fine-tuned | change |", "|---|---:|---:|---:|"]
        for k in rows["base"]:
            if k.startswith(f"{spec.name}_"):
                b, f = rows["base"][k], rows["finetune"][k]
                lines.append(f"| {k[len(spec.name) + 1 :]} | {b:.4f} | {f:.4f} | {f - b:+.4f} |")
    lines += ["", "## Detection (train split, against planted noise)", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in sorted(detection.items())]
    lines += ["", "![comparison](plots/comparison.png)", "", "![scores](plots/scores.png)", ""]
    with atomic_dir(args.results) as res:
        (res / "plots").mkdir()
        ev.plot_comparison(res / "plots" / "comparison.png", rows, shown)
        ev.plot_score_hist(
            res / "plots" / "scores.png",
            s,
            truth if truth.any() else None,
            "detection scores on train",
        )
        write_text(res / "report.md", "\n".join(lines))
        write_json(res / "metrics.json", metrics)
    print("\n".join(lines[4 : 6 + len(shown)]))


def main(argv=None) -> int:
    ap = parser("evaluate", __doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--base", required=True, help="pretrain output folder")
    ap.add_argument("--finetuned", required=True, help="finetune output folder")
    ap.add_argument("--detect", required=True)
    ap.add_argument("--results", required=True)
    return run("evaluate", evaluate, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
