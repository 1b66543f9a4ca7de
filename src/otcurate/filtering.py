"""Filtering in rounds: drop the pairs `detect` flagged, fine-tune, and let the model being
fine-tuned score the pairs again.

A detector is only as good as the embeddings it scores; at high noise the pre-trained model's
are poor (bench/results/quality.md: `clip_score` AUROC 0.67 on shapes, near-miss captions at
rate 0.5). After a share of the steps on the unflagged pairs the model is cleaner, and its own
scores separate better, so each later round drops what it now finds. Every round flags as
many pairs as detect did, so the budget and the kept count are those of plain filtering.

One round (the default) is plain filtering. Kept apart from `otcurate.train` so that
pre-training does not import the detectors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from otcurate import train
from otcurate.options import FilterOptions


def finetune_filter(
    model,
    images,
    tokens,
    opts: FilterOptions | None = None,
    *,
    noisy=None,
    scored=None,
    rescore_options=None,
    **kw,
) -> train.TrainResult:
    """Drop the pairs `detect` flagged noisy, then plain contrastive fine-tuning.

    With ``opts.rounds`` = R > 1 the steps are cut into R equal rounds under one schedule;
    after each round but the last, every pair is embedded by the model being fine-tuned and
    the ``scored`` ones ((n,) bool, the pairs detect scored; None: all, so a distilled set
    appended after them is never dropped) are scored again by the detect method
    ``opts.rescore`` with ``rescore_options`` (its options record; None: its defaults;
    ``rescore`` 'detect' is the caller's to resolve into a method and its options); as
    many as detect flagged, the lowest, are dropped for the next round. The batch draws go
    on over the new kept set (of the same size), mid-epoch. ``metrics``:
    ``filter_flags_changed_round_<r>``, the share of the scored pairs whose flag differs
    from detect's in round r.

    The rescoring model has trained on round 1's kept pairs (the noisy ones it kept among
    them too) and never on the dropped ones, which may bias it towards its first choice."""
    if noisy is None:
        raise ValueError("finetune.method 'filter' needs the detect flags of the training pairs.")
    o = opts or FilterOptions()
    flags = np.asarray(noisy, dtype=bool)
    if o.rounds == 1:  # a mask keeps lazily decoded images lazy
        keep = torch.as_tensor(~flags)
        return train.train_contrastive(
            model, images[keep], tokens[keep], description="finetune (filter)", **kw
        )
    if o.rescore == "detect":
        raise ValueError(
            "finetune.filter.rescore 'detect' names detect's own method and options: pass the "
            "method as opts.rescore and its options as rescore_options."
        )
    if not flags.any():
        raise ValueError(
            f"finetune.filter.rounds is {o.rounds} but none of the {len(flags)} pairs is flagged: "
            "rescoring needs detect's flagged pairs among them; set coreset.exclude_flagged: "
            "false (or finetune.filter.rounds: 1)."
        )
    steps = kw["steps"]
    ends = sorted({round(steps * r / o.rounds) for r in range(1, o.rounds)} - {0, steps})
    if not ends:
        raise ValueError(
            f"finetune.filter.rounds ({o.rounds}) needs at least as many steps; got {steps}."
        )
    scored = np.ones_like(flags) if scored is None else np.asarray(scored, dtype=bool)
    kept = torch.as_tensor(np.flatnonzero(~flags))
    pair_loss = train.contrastive_loss(model, images, tokens)
    log = kw.pop("log", None)
    changed: dict[str, float] = {}

    def rescore(step: int) -> None:
        nonlocal kept
        if step not in ends:
            return
        from otcurate.detect import score  # here: a one-round filter does not load the detectors

        image, text = embed_pairs(model, images, tokens, batch_size=kw["batch_size"])
        rows = np.flatnonzero(scored)
        s = score(o.rescore, image[rows], text[rows], rescore_options, seed=kw["seed"] + step)
        new = np.zeros_like(flags)
        new[rows[np.argsort(s, kind="stable")[: int(flags.sum())]]] = True  # as many as detect
        kept = torch.as_tensor(np.flatnonzero(~new))
        r = ends.index(step) + 2  # the round these flags serve
        changed[f"filter_flags_changed_round_{r}"] = float((new != flags)[rows].mean())
        if log is not None:
            log("filter_flags_changed", changed[f"filter_flags_changed_round_{r}"], step - 1)

    res = train.loop(
        model, len(kept), lambda idx: pair_loss(kept[idx]),
        description=f"finetune (filter, {o.rounds} rounds)", log=log, after_step=rescore, **kw,
    )  # fmt: skip
    return dataclasses.replace(res, metrics=changed)


@torch.no_grad()
def embed_pairs(
    model: torch.nn.Module, images, tokens: torch.Tensor, *, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (n, d) image and text embeddings of every pair, in batches, on the
    model's device (index batches: lazily decoded images decode one batch at a time)."""
    device = next(model.parameters()).device
    img, txt = [], []
    for i in range(0, len(tokens), batch_size):
        rows = torch.arange(i, min(i + batch_size, len(tokens)))
        img.append(model.encode_image(images[rows].to(device), normalize=True).float())
        txt.append(model.encode_text(tokens[rows].to(device), normalize=True).float())
    return torch.cat(img), torch.cat(txt)
