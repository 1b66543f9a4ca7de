"""Scores against a clean reference set: how well each training pair is explained by a small
set of pairs known to be clean (the clean val split, or `coreset.target`).

A pair is embedded jointly, ``z_i = [I_i; T_i] / sqrt(2)`` (unit norm when both halves are):
a mismatched pair puts an image beside a caption that no clean pair puts beside it, so its
joint embedding lies off the reference's support even where the cross-modal cosine
``<I_i, T_i>`` (which the noisy model learned to make high) cannot tell.

- :func:`reference_knn_score`: the mean joint cosine to the ``k`` nearest reference pairs
  (the plain density baseline, no transport).
- :func:`reference_ot_score`: semi-relaxed entropic unbalanced OT from the training pairs
  (marginal relaxed, ``reg_m``) to the reference pairs (marginal kept): every reference pair
  must be explained, a training pair may send less than its share. The mass a pair sends,
  times n, is its score. Unlike the nearest-neighbour density, the reference's column
  constraint makes pairs compete: a noisy pair beside a reference pair that clean pairs
  already explain gets little mass.

Both take L2-normalised (n, d) train and (m, d) reference embeddings and return (n,) scores
(higher = more likely clean), on the inputs' device; nothing reads files.
"""

from __future__ import annotations

import math

import torch


def joint(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(n, 2d) joint embeddings of L2-normalised (n, d) halves, unit norm."""
    if image.shape != text.shape:
        raise ValueError(
            f"image and text embeddings must have the same shape; got {tuple(image.shape)} and {tuple(text.shape)}."
        )
    return torch.cat([image, text], dim=1) / math.sqrt(2.0)


def _joints(image, text, ref_image, ref_text) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pairs' and the reference's joint embeddings; an empty reference is an error."""
    if len(ref_image) == 0:
        raise ValueError("the reference set is empty.")
    return joint(image, text), joint(ref_image, ref_text)


@torch.no_grad()
def reference_knn_score(
    image: torch.Tensor,
    text: torch.Tensor,
    ref_image: torch.Tensor,
    ref_text: torch.Tensor,
    *,
    k: int = 10,
    chunk: int = 4096,
) -> torch.Tensor:
    """Mean joint cosine of each training pair to its ``k`` nearest reference pairs, (n,)."""
    z, r = _joints(image, text, ref_image, ref_text)
    k = min(k, len(r))
    out = [
        (z[i : i + chunk] @ r.T).topk(k, dim=1).values.mean(dim=1) for i in range(0, len(z), chunk)
    ]
    return torch.cat(out)


@torch.no_grad()
def reference_ot_score(
    image: torch.Tensor,
    text: torch.Tensor,
    ref_image: torch.Tensor,
    ref_text: torch.Tensor,
    *,
    reg: float = 0.02,
    reg_m: float = 0.05,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> torch.Tensor:
    r"""Mass each training pair sends to the clean reference, times n, (n,).

    Solves :math:`\min_\gamma \langle\gamma, M\rangle + \mathrm{reg}\,KL(\gamma\,|\,ab^\top)
    + \mathrm{reg_m}\,KL(\gamma 1\,|\,a)` s.t. :math:`\gamma^\top 1 = b`, with uniform
    ``a`` (n,), ``b`` (m,) and :math:`M = (1 - z r^\top) / \max`, by POT's stabilised
    unbalanced Sinkhorn on the inputs' backend. Returns :math:`n\,\gamma 1`.
    """
    import ot

    if not reg > 0 or not reg_m > 0:
        raise ValueError(f"reg and reg_m must be > 0; got {reg} and {reg_m}.")
    z, r = _joints(image, text, ref_image, ref_text)
    M = 1.0 - z @ r.T
    M = M / M.max().clamp_min(1e-12)
    a = torch.full((len(z),), 1.0 / len(z), dtype=M.dtype, device=M.device)
    b = torch.full((len(r),), 1.0 / len(r), dtype=M.dtype, device=M.device)
    plan = ot.unbalanced.sinkhorn_unbalanced(
        a, b, M, reg, (reg_m, float("inf")), method="sinkhorn_stabilized",
        numItermax=max_iter, stopThr=tol,
    )  # fmt: skip
    return plan.sum(dim=1) * len(z)
