"""Training loops and losses: contrastive pre-training and fine-tuning.

Loops are bounded by optimisation steps (never wall-clock), draw batches from
an explicit `torch.Generator`, and clamp `logit_scale` after every step.
Fine-tuning methods are registered in `FINETUNE_METHODS` and dispatched by
`otcurate.finetuning`, so that pre-training does not import NCU, filtering in rounds or the
detectors it rescores with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import ClipLoss

from otcurate import faults
from otcurate.optim import batches, make_optimizer, param_groups, update
from otcurate.options import GradientAscentOptions, RematchOptions
from otcurate.parallel import shard_map
from otcurate.progress import track
from otcurate.rematch import rematch_loss


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]  # one per step
    lrs: list[float]
    metrics: dict[str, float] = field(default_factory=dict)  # a method's own, for metrics.json


def loop(
    model: torch.nn.Module,
    n: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    seed: int,
    log: Callable[[str, float, int], None] | None,
    description: str,
    replay=None,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """``steps`` updates on ``batch_loss`` of random pair batches, plus ``replay.weight *
    replay.loss(model, generator)`` when given (a soft-labelled distilled set,
    `otcurate.distill.SoftReplay`; alone when there are fewer than 2 pairs). The pair
    batches are the same with or without it: its draws come from their own generator.
    ``after_step(k)`` runs after the k-th update (k = 1 .. steps), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    replay_gen = torch.Generator().manual_seed(seed + 2)
    opt, sched = make_optimizer(
        param_groups(model, weight_decay), lr=lr, steps=steps, warmup=warmup
    )
    model.train()
    losses, lrs = [], []
    pairs = batches(n, batch_size, steps, gen) if n >= 2 or replay is None else [None] * steps
    for step, idx in enumerate(track(pairs, total=steps, description=description)):
        loss = batch_loss(idx) if idx is not None else None
        if replay is not None:
            kd = replay.weight * replay.loss(model, replay_gen)
            loss = kd if loss is None else loss + kd
            if log is not None:
                log("soft_label_loss", float(kd.detach()), step)
        lrs.append(update(model, opt, sched, loss))
        losses.append(loss.item())
        if log is not None:
            log("loss", losses[-1], step)
        if after_step is not None:
            model.eval()
            after_step(step + 1)
            model.train()
        faults.point(f"{description}:step:{step + 1}")
    model.eval()
    return TrainResult(losses, lrs)


def train_contrastive(
    model: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    description: str = "train",
    **kw,
) -> TrainResult:
    """CLIP's symmetric InfoNCE (open_clip `ClipLoss`) on (images[i], tokens[i]) pairs.

    images: (N, 3, H, W) float, tokens: (N, L) long, on any device (batches move to the model's).
    Keywords: steps, batch_size, lr, warmup, weight_decay, seed, log.
    """
    return loop(
        model, len(images), contrastive_loss(model, images, tokens), description=description,
        log=kw.pop("log", None), **kw,
    )  # fmt: skip


def contrastive_loss(
    model: torch.nn.Module, images, tokens: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batch loss of `train_contrastive`: rows (B,) -> ClipLoss of those pairs."""
    device = next(model.parameters()).device
    loss_fn = ClipLoss()

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        # model(images, tokens) split in its two towers, so that each can be sharded.
        img = shard_map(lambda b: model.encode_image(b, normalize=True), images[idx].to(device))
        txt = shard_map(lambda b: model.encode_text(b, normalize=True), tokens[idx].to(device))
        return loss_fn(img, txt, model.logit_scale.exp())

    return batch_loss


def finetune_clip(model, images, tokens, opts=None, *, noisy=None, **kw) -> TrainResult:
    """Plain fine-tuning with the contrastive loss on every pair: the baseline every method is compared with."""
    return train_contrastive(model, images, tokens, description="finetune (clip)", **kw)


def finetune_gradient_ascent(
    model, images, tokens, opts: GradientAscentOptions | None = None, *, noisy=None, **kw
) -> TrainResult:
    """Descend the contrastive loss on the unflagged pairs and ascend it on the flagged ones.

    Per-pair InfoNCE (both directions) over the whole batch; the ascent term is capped at
    chance level (log B) so that it cannot diverge: loss = mean_clean − w · mean_noisy(min(ℓ, log B)).
    """
    if noisy is None:
        raise ValueError(
            "finetune.method 'gradient_ascent' needs the detect flags of the training pairs."
        )
    ascent_weight = (opts or GradientAscentOptions()).ascent_weight
    flags = torch.as_tensor(np.asarray(noisy, dtype=bool))
    device = next(model.parameters()).device

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        img = F.normalize(shard_map(model.encode_image, images[idx].to(device)), dim=-1)
        txt = F.normalize(shard_map(model.encode_text, tokens[idx].to(device)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(idx), device=device)
        per_pair = 0.5 * (
            F.cross_entropy(logits, target, reduction="none")
            + F.cross_entropy(logits.T, target, reduction="none")
        )
        nz = flags[idx].to(device)
        loss = per_pair[~nz].mean() if (~nz).any() else per_pair.sum() * 0
        if nz.any():
            loss = loss - ascent_weight * per_pair[nz].clamp(max=math.log(len(idx))).mean()
        return loss

    return loop(
        model,
        len(images),
        batch_loss,
        description="finetune (gradient_ascent)",
        log=kw.pop("log", None),
        **kw,
    )


def finetune_rematch(
    model, images, tokens, opts: RematchOptions | None = None, *, noisy=None, **kw
) -> TrainResult:
    """CLIP loss on the unflagged pairs of each batch, and L2RM's rematching of the flagged
    ones (otcurate.rematch): their images learn soft targets from a partial OT plan over the
    batch's captions instead of being dropped."""
    if noisy is None:
        raise ValueError("finetune.method 'rematch' needs the detect flags of the training pairs.")
    o = opts or RematchOptions()
    flags = torch.as_tensor(np.asarray(noisy, dtype=bool))
    device = next(model.parameters()).device
    loss_fn = ClipLoss()

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        img = F.normalize(shard_map(model.encode_image, images[idx].to(device)), dim=-1)
        txt = F.normalize(shard_map(model.encode_text, tokens[idx].to(device)), dim=-1)
        nz = flags[idx].to(device)
        clean = ~nz
        loss = img.sum() * 0  # keeps the graph when a batch has no clean pair
        if int(clean.sum()) >= 2:
            loss = loss_fn(img[clean], txt[clean], model.logit_scale.exp())
        extra = rematch_loss(img, txt, nz, o)
        if extra is not None:
            loss = loss + o.weight * extra
        return loss

    return loop(
        model, len(images), batch_loss, description="finetune (rematch)",
        log=kw.pop("log", None), **kw,
    )  # fmt: skip
