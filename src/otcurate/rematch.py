"""Rematching flagged pairs by partial OT (L2RM, CVPR 2024; reference code hhc1997/L2RM).

Filtering drops the images of the pairs `detect` flagged. L2RM keeps them: within a batch,
the flagged images are matched to captions by entropic *partial* OT, which moves only a
share ``mass`` of the mass (the confident matches) and may leave an image unmatched; a
flagged image may never be matched to its own (suspect) caption. The plan, row- and
column-normalised, is a soft target for the similarities, learned with the symmetric KL
of the reference (``sym_KL_Divergence``: both retrieval directions, forward and reverse KL).

Reference settings: cost ``relu(1 − S)`` (the reference's learned cost network at its
initialisation), ``mass`` ρ = 0.1 of uniform marginals, ``reg`` 0.01, temperature ``tau``
0.05, the pool of captions = the flagged pairs' own captions. Departures: no learned cost
(its update needs clean pairs planted into a queue of images, `L2RM main_L2RM.py`), no
image queue (the flagged images of the batch itself), the partial OT solved by POT's
``entropic_partial_wasserstein`` (Bregman projections, log domain) rather than the
reference's dummy-row Sinkhorn; both solve the same entropic partial problem.

Everything here takes tensors and returns tensors; nothing reads files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from otcurate.options import RematchOptions

FORBIDDEN_COST = 1e3  # a forbidden cell: exp(-1e3 / reg) is 0 for any reg <= 1


def rematch_plan(
    sim: torch.Tensor,
    forbidden: torch.Tensor,
    *,
    mass: float,
    reg: float,
    max_iter: int = 1000,
    tol: float = 1e-3,
) -> torch.Tensor:
    """Entropic partial OT plan (n, m) between n images and m captions, uniform marginals of
    total 1 each, moving ``mass`` of it, on the cost relu(1 − sim); ``forbidden`` cells
    (bool, (n, m)) carry no mass. No gradient."""
    import ot

    with torch.no_grad():
        n, m = sim.shape
        cost = (1 - sim).clamp_min(0).masked_fill(forbidden, FORBIDDEN_COST)
        a = torch.full((n,), 1.0 / n, dtype=sim.dtype, device=sim.device)
        b = torch.full((m,), 1.0 / m, dtype=sim.dtype, device=sim.device)
        mass = min(mass, 1.0 - 1e-6)  # a full transport is balanced OT: keep the solver partial
        # (m as a tensor: POT 0.9.7's log-domain partial solver takes log(m) in the backend)
        plan = ot.partial.entropic_partial_wasserstein(
            a, b, cost, reg, m=a.new_tensor(mass), method="sinkhorn_log", numItermax=max_iter,
            stopThr=tol,
        )  # fmt: skip
    return plan.masked_fill(forbidden, 0.0)


def soft_target_loss(sim: torch.Tensor, plan: torch.Tensor, tau: float) -> torch.Tensor:
    """The reference's symmetric KL between softmax(sim / tau) and the normalised plan, in
    both directions (images -> captions over rows, captions -> images over columns)."""
    eps = 1e-10
    labels = plan.clamp_min(eps)
    loss = sim.new_zeros(())
    for logits, target in ((sim, labels), (sim.T, labels.T)):
        p = target / target.sum(dim=1, keepdim=True)
        log_q = F.log_softmax(logits / tau, dim=1)
        forward = F.kl_div(log_q, p, reduction="batchmean")
        reverse = F.kl_div(p.log(), log_q.exp(), reduction="batchmean")
        loss = loss + 0.5 * (forward + reverse)
    return loss


def rematch_loss(
    image: torch.Tensor, text: torch.Tensor, flagged: torch.Tensor, opts: RematchOptions
) -> torch.Tensor | None:
    """The rematch term of one batch (L2-normalised (B, d) embeddings, flagged (B,) bool),
    or None when fewer than two flagged rows give nothing to rematch."""
    rows = torch.nonzero(flagged).ravel()
    if len(rows) < 2:
        return None
    cols = rows if opts.pool == "flagged" else torch.arange(len(text), device=text.device)
    sim = image[rows] @ text[cols].T
    forbidden = rows[:, None] == cols[None, :]  # never a flagged image's own caption
    plan = rematch_plan(
        sim.detach(), forbidden, mass=opts.mass, reg=opts.reg, max_iter=opts.max_iter, tol=opts.tol
    )
    return soft_target_loss(sim, plan, opts.tau)
