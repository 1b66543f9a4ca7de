"""NCU: unlearning the noisy correspondence (ICCV 2025; reference code hhc1997/NCU).

Two phases on an open_clip CLIP already pre-trained on noisy pairs:

A. *Learn the hardest negative.* A learnable prompt of ``n_ctx`` context vectors is
   inserted right after the start token of every caption (CoOp-style), giving a
   "negated" text embedding ``N_i``. Image tower frozen; text tower and prompt
   trained on the clean rows with four losses: structure
   ``10·B·mean((T Tᵀ − N Nᵀ)²)``, opposition ``10·mean(relu(cos+0.2)+relu(−0.7−cos))``,
   and two SigLIP-style pair losses (I, T: +1 on the diagonal; I, N: −1 on it).
B. *Unlearn with one OT problem.* ``S_aug = [I Tᵀ | ⟨I_i, N_i⟩]`` (B×(B+1)); masked,
   balanced, entropic OT (log domain, ``reg`` 0.03, ≤ 100 iterations, no gradient)
   in both directions on ``M = (1 − S_aug)/max``; targets ``γ·rownorm(π) + (1−γ)·L``;
   loss ``½[KL(Y_v‖softmax(Z)) + KL(Y_t‖softmax(Zᵀ))]`` plus the opposition term.
   Prompt, positional embedding and the first text blocks (5 of 12 in the reference,
   scaled to depth) stay frozen; the token embedding trains (the reference's
   ``model.token_embedding.requires_grad = False`` sets an attribute and freezes nothing).

The defaults follow the reference (``src/ul_clip.py``, ``src/train.py``, LaCLIP
``models.py``); each departure is an option, listed in ``NCUOptions``. Remaining
departures: the negated caption's augmentation is EDA's random swap and deletion on
tokens only (synonym replacement and insertion need WordNet); with
``nc_source='detect'`` the noisy rows come from `detect` (capped per batch by
``unlearn_cap``) instead of the per-batch rule alone.

Everything here takes tensors and returns tensors or records; nothing reads files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from otcurate.optim import batches, make_optimizer, param_groups, update
from otcurate.options import NCUOptions
from otcurate.ot import sinkhorn_log
from otcurate.parallel import shard_map
from otcurate.progress import track


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding/positional_embedding/transformer/ln_final/text_projection."""
    tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if (
        tower is None
        or not all(hasattr(tower, a) for a in needed)
        or getattr(tower, "cls_emb", None) is not None
    ):
        raise ValueError(
            "NCU needs an open_clip text transformer (CLIP or CustomTextCLIP with a TextTransformer); "
            f"{type(model).__name__} has a different text encoder."
        )
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool != "argmax":
        raise ValueError(
            f"NCU supports argmax (end-of-text) pooling; this model pools by {pool!r}."
        )
    return tower


class NegationPrompt(nn.Module):
    """``n_ctx`` learnable context vectors, initialised N(0, 0.02) as in CoOp."""

    def __init__(self, n_ctx: int, width: int, generator: torch.Generator | None = None):
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1; got {n_ctx}.")
        self.ctx = nn.Parameter(torch.randn(n_ctx, width, generator=generator) * 0.02)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]


def encode_text(
    model: nn.Module, tokens: torch.Tensor, prompt: NegationPrompt | None = None
) -> torch.Tensor:
    """L2-normalised text embeddings (B, d); with ``prompt``, its vectors follow the start token.

    The caption is shifted right by ``n_ctx`` and cut to the context length, keeping its
    end-of-text token (argmax pooling then reads the right position).
    """
    tower = _text_tower(model)
    if prompt is None:
        return F.normalize(model.encode_text(tokens), dim=-1)
    B, L = tokens.shape
    k = prompt.n_ctx
    if k >= L - 1:
        raise ValueError(
            f"ncu.n_ctx={k} leaves no room for the caption in a context of {L} tokens."
        )
    eot_pos = tokens.argmax(dim=-1)
    eot_id = tokens.gather(1, eot_pos[:, None])
    shifted = torch.cat([tokens[:, :1], tokens.new_zeros(B, k), tokens[:, 1 : L - k]], dim=1)
    cut = eot_pos + k >= L
    if cut.any():
        shifted[cut, L - 1] = eot_id[cut, 0]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(shifted).to(cast)
    x = torch.cat([x[:, :1], prompt.ctx.to(cast).expand(B, -1, -1), x[:, 1 + k :]], dim=1)
    x = x + tower.positional_embedding.to(cast)
    x = tower.transformer(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x)
    x = x[torch.arange(B, device=x.device), shifted.argmax(dim=-1)]
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1)


def batch_noisy(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor | float,
    nc_ratio: float,
    among: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference's per-batch rule: flag the int(nc_ratio·B) lowest ``softmax_row(s·S)_ii``
    (own-caption probabilities); with ``among`` (bool, (B,)), only rows it marks may be flagged."""
    with torch.no_grad():
        p = torch.softmax(scale * image @ text.T, dim=1).diagonal()
        k = int(nc_ratio * len(p))
        noisy = torch.zeros(len(p), dtype=torch.bool, device=p.device)
        if among is not None:
            k = min(k, int(among.sum()))
            p = p.masked_fill(~among, float("inf"))
        if k > 0:
            noisy[torch.topk(p, k, largest=False).indices] = True
    return noisy


def augment_tokens(
    tokens: torch.Tensor, generator: torch.Generator, alpha: float = 0.1
) -> torch.Tensor:
    """EDA's random swap or random deletion (one, at random, per caption) on the tokens
    between the start and end tokens; ``max(1, int(alpha·n))`` swaps or deletions of n tokens.

    The reference augments the caption it negates with EDA (``utils/eda.py``); its synonym
    replacement and insertion need WordNet, so only these two operations are here.
    """
    out = tokens.clone()
    eot = tokens.argmax(dim=-1)
    ops = torch.rand(len(tokens), generator=generator) < 0.5
    for i in range(len(tokens)):
        n = int(eot[i]) - 1  # tokens strictly between SOT and EOT
        if n < 2:
            continue
        body = tokens[i, 1 : 1 + n].clone()
        m = max(1, int(alpha * n))
        if ops[i]:  # swap m random pairs
            for _ in range(m):
                a, b = torch.randint(n, (2,), generator=generator).tolist()
                body[[a, b]] = body[[b, a]]
            out[i, 1 : 1 + n] = body
        else:  # delete m tokens, keep at least one; the end token moves up
            drop = torch.randperm(n, generator=generator)[:m]
            keep = torch.ones(n, dtype=torch.bool)
            keep[drop] = False
            body = body[keep]
            row = torch.zeros_like(tokens[i])
            row[0] = tokens[i, 0]
            row[1 : 1 + len(body)] = body
            row[1 + len(body)] = tokens[i, eot[i]]
            out[i] = row
    return out


def opposition(text: torch.Tensor, negated: torch.Tensor) -> torch.Tensor:
    """mean(relu(cos+0.2) + relu(−0.7−cos)): keeps cos(T_i, N_i) within [−0.7, −0.2]."""
    cos = (text * negated).sum(dim=1)
    return (F.relu(cos + 0.2) + F.relu(-0.7 - cos)).mean()


def _sigmoid_pairs(logits: torch.Tensor, positive_diagonal: bool) -> torch.Tensor:
    eye = torch.eye(len(logits), device=logits.device, dtype=logits.dtype)
    labels = 2 * eye - 1 if positive_diagonal else 1 - 2 * eye
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def phase_a_losses(
    image: torch.Tensor, text: torch.Tensor, negated: torch.Tensor, scale: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Phase A losses on the clean rows (all inputs L2-normalised, (B, d))."""
    B = len(text)
    structure = 10 * ((text @ text.T - negated @ negated.T) ** 2).mean() * B
    oppose = 10 * opposition(text, negated)
    sig_pos = _sigmoid_pairs(scale * image @ text.T, positive_diagonal=True)
    sig_neg = _sigmoid_pairs(scale * image @ negated.T, positive_diagonal=False)
    total = structure + oppose + sig_pos + sig_neg
    return {
        "loss": total,
        "structure": structure,
        "opposition": oppose,
        "sig_pos": sig_pos,
        "sig_neg": sig_neg,
    }


@dataclass(frozen=True)
class UnlearnTargets:
    """Phase B's OT plans and soft targets for one batch (no gradient)."""

    forbidden: torch.Tensor  # (B, B+1) bool
    plan_v: torch.Tensor  # (B, B+1) images -> texts (+ hardest negative)
    plan_t: torch.Tensor  # (B+1, B) texts (+ hardest negative) -> images
    target_v: torch.Tensor  # (B, B+1), rows sum to 1
    target_t: torch.Tensor  # (B+1, B), rows sum to 1


def unlearn_targets(
    s_aug: torch.Tensor,
    noisy: torch.Tensor,
    *,
    reg: float = 0.03,
    gamma: float = 0.7,
    max_iter: int = 100,
    tol: float = 1e-4,  # the reference stops at 1e-4
    text_targets: Literal["reference", "normalised"] = "reference",
) -> UnlearnTargets:
    """Masked balanced OT targets from the augmented similarities ``s_aug`` (B, B+1).

    Mask: the extra column is forbidden to clean rows; a noisy row may not use its own
    caption and may use the extra column. Labels ``L``: identity, except noisy rows put
    their 1 in the extra column. Image-side rows: ``γ·rownorm(π_v) + (1−γ)·L``.

    Text side, ``text_targets='reference'``: ``γ·rownorm(π_t) + (1−γ)·Lᵀ`` as written, so
    the extra row (the hardest negative as a query over images) carries
    ``γ + (1−γ)·k`` for k noisy rows and a noisy pair's caption row only ``γ``.
    ``'normalised'``: every row sums to 1 (the extra row's label spread over the noisy
    images, a noisy caption's row the plan alone), which weakens the extra row by
    ``(γ + (1−γ)k)`` times.
    """
    with torch.no_grad():
        B = s_aug.shape[0]
        dev, dt = s_aug.device, s_aug.dtype
        idx = torch.arange(B, device=dev)
        forbidden = torch.zeros(B, B + 1, dtype=torch.bool, device=dev)
        if noisy.any():
            forbidden[:, -1] = True
            forbidden[noisy, idx[noisy]] = True
            forbidden[noisy, -1] = False
            a = torch.full((B,), 1.0 / B, device=dev, dtype=dt)
            b = torch.full((B + 1,), 1.0 / (B + 1), device=dev, dtype=dt)
        else:
            # Without noisy rows nothing may reach the extra column: OT over the B captions only.
            forbidden[:, -1] = True
            a = torch.full((B,), 1.0 / B, device=dev, dtype=dt)
            b = torch.cat(
                [
                    torch.full((B,), 1.0 / B, device=dev, dtype=dt),
                    torch.zeros(1, device=dev, dtype=dt),
                ]
            )
        cost_v = 1 - s_aug
        cost_v = cost_v / cost_v.max()
        cost_t = cost_v.T  # (1 − S_augᵀ)/max(1 − S_augᵀ): the same normalisation
        plan_v = sinkhorn_log(a, b, cost_v, reg, mask=forbidden, max_iter=max_iter, tol=tol).plan
        plan_t = sinkhorn_log(b, a, cost_t, reg, mask=forbidden.T, max_iter=max_iter, tol=tol).plan
        plan_v = plan_v.masked_fill(forbidden, 0.0)
        plan_t = plan_t.masked_fill(forbidden.T, 0.0)

        labels = torch.zeros(B, B + 1, device=dev, dtype=dt)
        labels[idx[~noisy], idx[~noisy]] = 1.0
        labels[noisy, -1] = 1.0
        target_v = gamma * _rownorm(plan_v) + (1 - gamma) * labels
        lt = labels.T
        pt = _rownorm(plan_t)
        if text_targets == "reference":
            target_t = gamma * pt + (1 - gamma) * lt
        else:
            lt_sum = lt.sum(dim=1, keepdim=True)
            has = lt_sum.squeeze(1) > 0
            target_t = torch.where(
                has[:, None], gamma * pt + (1 - gamma) * lt / lt_sum.clamp_min(1e-12), pt
            )
        if not noisy.any():
            target_t[-1] = 0.0  # the extra row carries no mass and no target
    return UnlearnTargets(forbidden, plan_v, plan_t, target_v, target_t)


def _rownorm(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-30)


def phase_b_losses(
    image: torch.Tensor,
    text: torch.Tensor,
    negated: torch.Tensor,
    scale: torch.Tensor,
    noisy: torch.Tensor,
    *,
    reg: float = 0.03,
    gamma: float = 0.7,
    max_iter: int = 100,
    text_targets: Literal["reference", "normalised"] = "reference",
) -> dict[str, torch.Tensor]:
    """Phase B loss: KL to the OT targets in both directions, plus the opposition term (weight 1).

    KL is ``batchmean`` over unnormalised text targets as in the reference (``nn.KLDivLoss``)."""
    s_aug = torch.cat([image @ text.T, (image * negated).sum(dim=1, keepdim=True)], dim=1)
    z = scale * s_aug
    tg = unlearn_targets(
        s_aug.detach(), noisy, reg=reg, gamma=gamma, max_iter=max_iter, text_targets=text_targets
    )
    kl_v = F.kl_div(F.log_softmax(z, dim=1), tg.target_v, reduction="batchmean")
    zt = z.T
    if not noisy.any():
        zt = zt[:-1]
        target_t = tg.target_t[:-1]
    else:
        target_t = tg.target_t
    kl_t = F.kl_div(F.log_softmax(zt, dim=1), target_t, reduction="batchmean")
    unlearn = 0.5 * (kl_v + kl_t)
    oppose = opposition(text, negated)
    return {"loss": unlearn + oppose, "unlearn": unlearn, "opposition": oppose}


def image_projection(visual: nn.Module) -> list[nn.Parameter]:
    """The image tower's last projection to the joint space: ViT ``proj``, ModifiedResNet's
    attention-pool output, timm's ``head.proj``; [] when the tower has none of these."""
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        return [visual.proj]
    if hasattr(visual, "attnpool"):
        return list(visual.attnpool.c_proj.parameters())
    head = getattr(visual, "head", None)
    if head is not None and hasattr(head, "proj"):
        return list(head.proj.parameters())
    return []


def text_depth(model: nn.Module) -> int:
    return len(_text_tower(model).transformer.resblocks)


def reference_frozen_blocks(depth: int) -> int:
    """The reference freezes text blocks 0-4 of 12; the same share of a tower of ``depth``."""
    return int(round(5 / 12 * depth))


def set_phase(
    model: nn.Module,
    prompt: NegationPrompt,
    phase: str,
    frozen_text_blocks: int,
    *,
    train_image_projection: bool = True,
    freeze_token_embedding: bool = False,
) -> None:
    """requires_grad per phase.

    A: text tower and prompt train; the image tower is frozen except its projection when
    ``train_image_projection`` (in the reference it sits outside ``visual``).
    B: all but the prompt, the positional embedding and the first ``frozen_text_blocks``
    text blocks (and the token embedding when ``freeze_token_embedding``)."""
    tower = _text_tower(model)
    if phase == "A":
        for p in model.parameters():
            p.requires_grad_(True)
        for p in model.visual.parameters():
            p.requires_grad_(False)
        if train_image_projection:
            for p in image_projection(model.visual):
                p.requires_grad_(True)
        prompt.ctx.requires_grad_(True)
        return
    for p in model.parameters():
        p.requires_grad_(True)
    prompt.ctx.requires_grad_(False)
    tower.token_embedding.weight.requires_grad_(not freeze_token_embedding)
    tower.positional_embedding.requires_grad_(False)
    for block in list(tower.transformer.resblocks)[:frozen_text_blocks]:
        for p in block.parameters():
            p.requires_grad_(False)


@dataclass(frozen=True)
class NCUResult:
    losses: list[float]
    lrs: list[float]
    phase_a_steps: int
    noisy_seen: float  # mean fraction of noisy rows per batch

    @property
    def metrics(self) -> dict[str, float]:
        """The method's own metrics, as `otcurate.train.TrainResult.metrics`."""
        return {}


def finetune_ncu(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    opts: NCUOptions | None = None,
    *,
    noisy: np.ndarray | None,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    seed: int,
    log: Callable[[str, float, int], None] | None = None,
    replay=None,
) -> NCUResult:
    """NCU fine-tuning for ``steps`` optimisation steps in total (phase A then phase B).

    noisy: (N,) bool global flags (``nc_source='detect'``), or None with ``nc_source='batch'``.
    replay: a soft-labelled distilled set (`otcurate.distill.SoftReplay`) whose loss joins
    phase B's (phase A learns the negation prompt only).
    """
    o = opts or NCUOptions()
    if o.nc_source == "detect" and noisy is None:
        raise ValueError("nc_source='detect' needs the detect flags of the training pairs.")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    replay_gen = torch.Generator().manual_seed(seed + 2)
    width = _text_tower(model).token_embedding.weight.shape[1]
    prompt = NegationPrompt(o.n_ctx, width, gen).to(device)
    flags = None if noisy is None else torch.as_tensor(np.asarray(noisy, dtype=bool))
    frozen = o.frozen_text_blocks
    if frozen is None:
        frozen = reference_frozen_blocks(text_depth(model))
    steps_a = int(round(o.phase_a_fraction * steps))
    steps_b = steps - steps_a
    losses, lrs, seen = [], [], []
    batch_iter = batches(len(images), batch_size, steps, gen)

    def rows(idx, img_e, txt_e, scale):
        """(unlearn, keep): the rows to unlearn and the rows the batch keeps."""
        if o.nc_source == "batch":
            nz = batch_noisy(img_e, txt_e, scale, o.nc_ratio)
            return nz, torch.ones_like(nz)
        flagged = flags[idx].to(device)
        if o.unlearn_cap is None:
            return flagged, torch.ones_like(flagged)
        nz = batch_noisy(img_e, txt_e, scale, o.unlearn_cap, among=flagged)
        rest = flagged & ~nz
        return nz, (~rest if o.others == "drop" else torch.ones_like(rest))

    model.train()
    for phase, n_steps in (("A", steps_a), ("B", steps_b)):
        if n_steps == 0:
            continue
        set_phase(
            model,
            prompt,
            phase,
            frozen,
            train_image_projection=o.train_image_projection,
            freeze_token_embedding=o.freeze_token_embedding,
        )
        groups = param_groups(model, weight_decay)
        for g in groups:
            g["lr"] = o.lr_phase_a if phase == "A" else lr
        if phase == "A":
            groups.append(
                {"params": [prompt.ctx], "weight_decay": o.prompt_weight_decay, "lr": o.lr_prompt}
            )
        # Each group keeps its own lr; the schedule multiplies them all.
        if o.schedule == "one":  # one warm-up + cosine over all steps, as the reference
            opt, sched = make_optimizer(
                groups, lr=lr, steps=steps, warmup=min(warmup, steps // 2),
                offset=0 if phase == "A" else steps_a,
            )  # fmt: skip
        else:
            opt, sched = make_optimizer(
                groups, lr=lr, steps=n_steps, warmup=min(warmup, n_steps // 2)
            )
        for _ in track(range(n_steps), total=n_steps, description=f"finetune (ncu, phase {phase})"):
            idx = next(batch_iter)
            x, t = images[idx].to(device), tokens[idx].to(device)
            t_neg = augment_tokens(t.cpu(), aug_gen).to(device) if o.augment_negated else t
            scale = model.logit_scale.exp()
            if phase == "A" and not o.train_image_projection:
                with torch.no_grad():
                    img_e = F.normalize(shard_map(model.encode_image, x), dim=-1)
            else:  # phase A: the tower is frozen but its projection learns (set_phase)
                img_e = F.normalize(shard_map(model.encode_image, x), dim=-1)
            txt_e = shard_map(lambda b: encode_text(model, b), t)
            neg_e = shard_map(lambda b: encode_text(model, b, prompt), t_neg)
            nz, keep = rows(idx, img_e.detach(), txt_e.detach(), scale.detach())
            seen.append(float(nz.float().mean()))
            if phase == "A":
                clean = keep & ~nz
                if int(clean.sum()) < 2:
                    continue
                out = phase_a_losses(img_e[clean], txt_e[clean], neg_e[clean], scale)
            else:
                if int(keep.sum()) < 2:
                    continue
                out = phase_b_losses(
                    img_e[keep], txt_e[keep], neg_e[keep], scale, nz[keep],
                    reg=o.reg, gamma=o.gamma, text_targets=o.text_targets,
                )  # fmt: skip
                if replay is not None:
                    kd = replay.weight * replay.loss(model, replay_gen)
                    out["loss"] = out["loss"] + kd
            lrs.append(update(model, opt, sched, out["loss"]))
            step = len(losses)
            losses.append(out["loss"].item())
            if log is not None:
                for k, v in out.items():
                    log(f"ncu_{phase}_{k}", v.item(), step)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return NCUResult(losses, lrs, steps_a, float(np.mean(seen)) if seen else 0.0)
