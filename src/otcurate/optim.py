"""Optimisation primitives every training loop shares (contrastive, gradient ascent, NCU):
step-bounded batches, AdamW parameter groups, warm-up + cosine schedule, one update step."""

from __future__ import annotations

import math

import torch

from otcurate.models import clamp_logit_scale
from otcurate.parallel import average_gradients


def warmup_cosine(step: int, *, steps: int, warmup: int) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield `steps` index batches: epoch-wise random permutations, last partial batch dropped."""
    if n < 2:
        raise ValueError(f"need at least 2 training pairs for a contrastive batch; got {n}.")
    bs = min(batch_size, n)
    done = 0
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - bs + 1, bs):
            yield perm[i : i + bs]
            done += 1
            if done == steps:
                return


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as open_clip_train: no weight decay on gains, biases, embeddings and
    logit_scale; frozen parameters left out."""
    # As open_clip_train: no weight decay on gains, biases, embeddings and logit_scale.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = (
            p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        )
        (no_decay if exclude else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def make_optimizer(
    groups: list[dict], *, lr: float, steps: int, warmup: int, offset: int = 0
) -> tuple:
    """AdamW (betas 0.9/0.98, as open_clip and NCU) with linear warm-up then cosine decay
    over `steps`; `offset`: the schedule starts at that step (a later phase of one schedule).

    The fused kernel where every parameter allows it (CPU or CUDA floats): the same update
    to rounding, one kernel per step instead of a loop over the parameters; on this CPU an
    update of otcurate-tiny took 27 ms with the loop and 6 with the fused kernel
    (`python -m bench.speed --only optimizer`; #18).
    """
    opt = torch.optim.AdamW(
        groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=_fusable(groups) or None
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s + offset, steps=steps, warmup=warmup)
    )
    return opt, sched


def _fusable(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floats on the CPU or CUDA."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )


def update(model: torch.nn.Module, opt, sched, loss: torch.Tensor) -> float:
    """One optimisation step, then the temperature clamp; returns the learning rate used.

    Under torchrun the gradients are averaged over the processes first (otcurate.parallel).
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(p for g in opt.param_groups for p in g["params"])
    opt.step()
    sched.step()
    clamp_logit_scale(model)
    return sched.get_last_lr()[0]
