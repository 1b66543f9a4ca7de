"""Evaluation: zero-shot classification, image-text retrieval, and plots.

All metrics take L2-normalised embeddings (tensors on any device) and return
plain floats; plots take records and write PNGs through a given path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def class_embeddings(
    text_embed_fn, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(C, d) zero-shot classifier: the mean of each class's prompt embeddings, renormalised.

    `text_embed_fn(list[str]) -> (m, d)` L2-normalised text embeddings.
    """
    prompts = [t.format(c) for c in class_names for t in templates]
    return class_means(text_embed_fn(prompts), len(class_names))


def class_means(embeddings: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, d): the mean of each class's rows of L2-normalised ``embeddings`` ((C · T, d),
    class-major: T prompts per class), renormalised."""
    e = embeddings.reshape(n_classes, -1, embeddings.shape[-1]).mean(1)
    return torch.nn.functional.normalize(e, dim=-1)


def zero_shot_accuracy(
    image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, topk: int = 1
) -> float:
    """Fraction of images whose label is among the top-k classes by cosine similarity."""
    if len(image) == 0:
        raise ValueError("zero-shot accuracy needs at least one image.")
    k = min(topk, classes.shape[0])
    top = (image @ classes.T).topk(k, dim=1).indices
    return float((top == labels.view(-1, 1)).any(dim=1).float().mean())


def _groups(captions: Sequence[str]) -> torch.Tensor:
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions])


def retrieval_recall(
    image: torch.Tensor, text: torch.Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval over paired embeddings (n, d).

    A retrieved item counts as a hit when its caption text equals the query's own
    (identical captions of different images are all correct answers).
    """
    g = _groups(captions).to(image.device)
    sim = image @ text.T  # (n_img, n_txt)
    same = g.view(-1, 1) == g.view(1, -1)  # (n, n): caption i and caption j are equal
    out = {}
    kmax = min(max(ks), sim.shape[1])
    i2t = sim.topk(kmax, dim=1).indices  # texts for each image
    t2i = sim.T.topk(kmax, dim=1).indices  # images for each text
    for k in ks:
        kk = min(k, kmax)
        out[f"i2t_r{k}"] = float(torch.gather(same, 1, i2t[:, :kk]).any(1).float().mean())
        out[f"t2i_r{k}"] = float(torch.gather(same, 1, t2i[:, :kk]).any(1).float().mean())
    return out


def _savefig(fig, path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})


def plot_score_hist(path, scores: np.ndarray, truth: np.ndarray | None, title: str) -> None:
    """Histogram of detection scores, split clean vs noisy when the truth is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(float(np.min(scores)), float(np.max(scores)) + 1e-9, 40)
    if truth is not None and truth.any():
        ax.hist(
            scores[~truth],
            bins=bins,
            alpha=0.6,
            label=f"clean ({(~truth).sum()})",
            color="tab:blue",
        )
        ax.hist(
            scores[truth], bins=bins, alpha=0.6, label=f"noisy ({truth.sum()})", color="tab:red"
        )
        ax.legend()
    else:
        ax.hist(scores, bins=bins, color="tab:blue")
    ax.set_xlabel("score (higher = cleaner)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    _savefig(fig, path)
    plt.close(fig)


def plot_comparison(
    path,
    rows: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    title: str = "base vs fine-tuned (clean test split)",
) -> None:
    """Grouped bars: one group per metric, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(rows)
    x = np.arange(len(metrics))
    w = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.1 * len(metrics) + 2, 3.5))
    for i, m in enumerate(models):
        vals = [rows[m].get(k, np.nan) for k in metrics]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * w, vals, w, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, metrics, rotation=0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend()
    _savefig(fig, path)
    plt.close(fig)


def plot_image_grid(path, pixels: np.ndarray, rows: Sequence[str], title: str) -> None:
    """Images (m, 3, H, W) in [0, 1] as a grid, one row per name in ``rows`` (equal counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(rows))
    per = {n: [i for i, r in enumerate(rows) if r == n] for n in names}
    cols = max(len(v) for v in per.values())
    fig, axes = plt.subplots(
        len(names), cols, figsize=(0.9 * cols + 1.2, 0.9 * len(names) + 0.4), squeeze=False
    )
    for r, n in enumerate(names):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(per[n]):
                ax.imshow(np.transpose(pixels[per[n][c]], (1, 2, 0)).clip(0, 1))
        axes[r][0].set_ylabel(n, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _savefig(fig, path)
    plt.close(fig)


def retrieval_recall_grouped(
    image: torch.Tensor,
    text: torch.Tensor,
    text_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k with several captions per image (COCO/Flickr protocol).

    image (M, d), text (N, d) L2-normalised; text_image (N,) the image each caption
    describes. Image->text: a hit when any of the image's captions is among its top k
    texts. Text->image: a hit when the caption's image is among its top k images.
    """
    if len(image) == 0 or len(text) == 0:
        raise ValueError("retrieval needs at least one image and one caption.")
    owner = text_image.to(image.device).long()
    sim = image @ text.T  # (M, N)
    out = {}
    kt, ki = min(max(ks), sim.shape[1]), min(max(ks), sim.shape[0])
    i2t = owner[sim.topk(kt, dim=1).indices]  # (M, kt): the image of each retrieved caption
    t2i = sim.T.topk(ki, dim=1).indices  # (N, ki)
    rows = torch.arange(len(image), device=image.device).view(-1, 1)
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t[:, : min(k, kt)] == rows).any(1).float().mean())
        out[f"t2i_r{k}"] = float((t2i[:, : min(k, ki)] == owner.view(-1, 1)).any(1).float().mean())
    return out


def split_metrics(clip, test, info, ks: Sequence[int], batch_size: int) -> dict[str, float]:
    """Retrieval recall@k (i2t, t2i) and, with labels and class names, zero-shot top-1/5 of
    `clip` (an `otcurate.models.Clip`) on a split: a table with image, caption, label."""
    from otcurate import models

    images, tokens = models.pairs_to_tensors(
        test["image"].to_pylist(), test["caption"].to_pylist(), clip
    )
    img, txt = models.encode(clip, images, tokens, batch_size=batch_size)
    out = retrieval_recall(img, txt, test["caption"].to_pylist(), ks)
    labels = torch.tensor(test["label"].to_pylist())
    if info is not None and (labels >= 0).all():
        embed_text = functools.partial(models.encode_texts, clip, batch_size=batch_size)
        classes = class_embeddings(embed_text, info.class_names, info.templates)
        out["zs_acc"] = zero_shot_accuracy(img, classes, labels)
        out["zs_acc_top5"] = zero_shot_accuracy(img, classes, labels, topk=5)
    return out


def clean_set_metrics(
    clip, cset, task: str, templates: Sequence[str] | None, ks: Sequence[int], batch_size: int
) -> dict[str, float]:
    """Metrics of one clean set (`otcurate.data.evalsets.CleanSet`; distinct images encoded
    once): recall@k for a retrieval set, zero-shot top-1/5 for a classification set."""
    from otcurate import models

    img, _ = models.encode(clip, models.decode_images(cset.images, clip), batch_size=batch_size)
    if task == "retrieval":
        txt = models.encode_texts(clip, cset.captions, batch_size=batch_size)
        return retrieval_recall_grouped(img, txt, torch.from_numpy(cset.caption_image), ks)
    labels = torch.from_numpy(cset.labels)
    if cset.info is None or (labels < 0).any():
        raise ValueError(
            "a classification set needs a label for every image and class names "
            "(hf.label_column, hf.class_names)."
        )
    templates = templates or cset.info.templates
    embed_text = functools.partial(models.encode_texts, clip, batch_size=batch_size)
    classes = class_embeddings(embed_text, cset.info.class_names, templates)
    return {
        "zs_acc": zero_shot_accuracy(img, classes, labels),
        "zs_acc_top5": zero_shot_accuracy(img, classes, labels, topk=5),
    }


HEADLINE = ("zs_acc", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10")


def describe_set(cset, task: str) -> str:
    if task == "retrieval":
        return f"{task}; {len(cset.images)} images, {len(cset.captions)} captions"
    return f"{task}; {len(cset.images)} images, {len(cset.info.class_names)} classes"


def _comparison(rows: Mapping[str, Mapping[str, float]], keys: Sequence[str], strip: int = 0):
    lines = ["| metric | base | fine-tuned | change |", "|---|---:|---:|---:|"]
    for k in keys:
        b, f = rows["base"][k], rows["finetune"][k]
        lines.append(f"| {k[strip:]} | {b:.4f} | {f:.4f} | {f - b:+.4f} |")
    return lines


def _forgetting(rows: Mapping[str, Mapping[str, float]], zs_sets: Sequence[str]) -> list[str]:
    """Zero-shot top-1 on each clean classification set: what fine-tuning cost or gained
    where its data may not reach, with the fine-tuned weights as trained beside the
    WiSE-FT mix when finetune mixed them."""
    mixed = "unmixed" in rows
    head = (
        "| set | base | fine-tuned as trained | WiSE-FT | change |"
        if mixed
        else ("| set | base | fine-tuned | change |")
    )
    lines = ["", "## Forgetting (zero-shot top-1 on the clean sets)", "", head]
    lines.append("|---|" + "---:|" * (4 if mixed else 3))
    for name in zs_sets:
        k = f"{name}_zs_acc"
        b, f = rows["base"][k], rows["finetune"][k]
        cells = [f"{b:.4f}"] + ([f"{rows['unmixed'][k]:.4f}"] if mixed else []) + [f"{f:.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {f - b:+.4f} |")
    return lines


def headline_table(rows: Mapping[str, Mapping[str, float]], shown: Sequence[str]) -> str:
    """The base vs fine-tuned table of the headline metrics (markdown)."""
    return "\n".join(_comparison(rows, shown))


def report_markdown(
    rows: Mapping[str, Mapping[str, float]],
    shown: Sequence[str],
    sets: Sequence[tuple[str, str]],
    detection: Mapping[str, float],
    n_test: int,
    test_clean: bool = True,
    zs_sets: Sequence[str] = (),
) -> str:
    """evaluate's report.md: one table per clean set (``sets``: (name, description)) first,
    then the held-out test split (``test_clean``: known clean, as a built-in source's is; else
    carved from the same possibly noisy data), detection quality, and the two plots."""
    lines = ["# otcurate: base vs fine-tuned", "", "Higher is better.", ""]
    for name, what in sets:
        lines += [f"## {name} ({what})", "", "A clean set, from evaluate.sets.", ""]
        keys = [k for k in rows["base"] if k.startswith(f"{name}_")]
        lines += _comparison(rows, keys, strip=len(name) + 1) + [""]
    if not sets and not test_clean:
        lines += [
            "**Nothing clean judged this model**: the test split is carved from the same "
            "data as the training pairs and may hold as much noise; add a clean set under "
            "`evaluate.sets`.",
            "",
        ]
    split = "clean test split" if test_clean else "held-out test split (may contain noise)"
    lines += [f"## {split}: {n_test} pairs", ""]
    lines += _comparison(rows, shown)
    if zs_sets:
        lines += _forgetting(rows, zs_sets)
    truth = "against planted noise" if "auroc" in detection else "no planted noise to judge by"
    lines += ["", f"## Detection (train split, {truth})", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in sorted(detection.items())]
    lines += ["", "![comparison](plots/comparison.png)", "", "![scores](plots/scores.png)", ""]
    return "\n".join(lines)
