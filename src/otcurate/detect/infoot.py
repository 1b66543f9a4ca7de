"""Fused InfoOT (Chuang et al., ICML 2023; chingyaoc/InfoOT) on minibatches, and its fitted
plan's conditional projection, which scores new pairs without re-solving."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otcurate.detect.minibatch import Sinkhorn, check_pairs, over_batches
from otcurate.options import InfoOTOptions
from otcurate.ot import cost_cosine, normalize_cost


def sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances, (..., n, d) x (..., m, d) -> (..., n, m)."""
    xx = (x * x).sum(-1)[..., :, None]
    yy = (y * y).sum(-1)[..., None, :]
    return (xx + yy - 2 * x @ y.mT).clamp_min(0)


def bandwidth2(sq: torch.Tensor, h: float) -> torch.Tensor:
    """InfoOT's squared bandwidth h**2 * mean(D**2) / 2 per problem, (..., 1, 1)."""
    return (h * h) * sq.mean(dim=(-2, -1), keepdim=True) / 2


def mi_grad(P: torch.Tensor, Kx: torch.Tensor, Ky: torch.Tensor) -> torch.Tensor:
    r"""Gradient in P of InfoOT's kernel-density mutual information, (..., n, m).

    :math:`I(P) = \sum_{ij} P_{ij} \log \frac{f_{xy}(i,j)}{f_x(i) f_y(j)}` with
    :math:`f_{xy} = K_x P K_y^\top`, :math:`f_x = K_x 1 / n`, :math:`f_y = K_y 1 / m`;
    :math:`\nabla I = \log \frac{f_{xy}}{f_x f_y^\top} + K_x^\top (P / f_{xy}) K_y`.
    """
    tiny = torch.finfo(P.dtype).tiny
    fx = Kx.mean(dim=-1)
    fy = Ky.mean(dim=-1)
    fxy = (Kx @ P @ Ky.mT).clamp_min(tiny)
    return torch.log(fxy / (fx[..., :, None] * fy[..., None, :])) + Kx.mT @ (P / fxy) @ Ky


def plans(
    img: torch.Tensor, txt: torch.Tensor, opts: InfoOTOptions, solve: Sinkhorn
) -> torch.Tensor:
    """Fused InfoOT plans for a batch of problems, (K, B, d) x (K, B, d) -> (K, B, B)."""
    C = normalize_cost(cost_cosine(img, txt))
    Kx = torch.exp(-(sq := sq_dists(img, img)) / (2 * bandwidth2(sq, opts.h)))
    Ky = torch.exp(-(sq := sq_dists(txt, txt)) / (2 * bandwidth2(sq, opts.h)))
    n, m = C.shape[-2], C.shape[-1]
    P = torch.full_like(C, 1.0 / (n * m))
    potentials = None
    for _ in range(opts.outer_iter):
        # Mirror-descent step of InfoOT: Sinkhorn on the linearised objective, warm-started
        # from the previous step's scalings (the linearised cost moves little between steps).
        r = solve(C - opts.lam * mi_grad(P, Kx, Ky), warmstart=potentials)
        P, potentials = r.plan, (r.log_u, r.log_v)
    return P


def infoot_score(
    image: torch.Tensor, text: torch.Tensor, opts: InfoOTOptions | None = None, *, seed: int = 0
) -> torch.Tensor:
    r"""Fused InfoOT (Chuang et al., ICML 2023) on minibatches: own-cell conditional mass, (n,).

    Per random batch of B pairs, with cost :math:`C = (1 - I T^\top)/\max` and Gaussian
    kernels :math:`K_x, K_y` on the in-modal distances (bandwidth ``h`` times
    :math:`\sqrt{\mathrm{mean}(D^2)/2}`, as the reference), it solves
    :math:`\min_P \langle P, C\rangle - \lambda I(P) - \mathrm{reg}\,H(P)` by
    ``outer_iter`` rounds of Sinkhorn on :math:`C - \lambda \nabla I(P)` starting from
    the independent plan (:func:`mi_grad`). Pair i scores :math:`P_{ii} / a_i = B P_{ii}`,
    the conditional mass its image sends to its own caption; averaged over ``passes``.

    image, text : (n, d) L2-normalised embeddings. Returns (n,) in [0, 1] on their device.
    """
    opts = opts or InfoOTOptions()
    check_pairs(image, text)
    solve = Sinkhorn("infoot", opts)

    def own_conditional(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        P = plans(img, txt, opts, solve)
        return P.diagonal(dim1=-2, dim2=-1) * P.shape[-2]

    with torch.no_grad():
        out = over_batches(image, text, opts, seed, own_conditional)
    solve.report()
    return out


@dataclass(frozen=True)
class InfoOTFit:
    """A fused InfoOT plan on reference pairs, for scoring new pairs without re-solving.

    image, text : (m, d) reference embeddings; plan : (m, m), uniform marginals;
    bandwidth2_image, bandwidth2_text : the squared kernel bandwidths used in the fit.
    """

    image: torch.Tensor
    text: torch.Tensor
    plan: torch.Tensor
    bandwidth2_image: float
    bandwidth2_text: float
    rows: torch.Tensor | None = None  # which of the fitted pairs are the references


def infoot_fit(
    image: torch.Tensor,
    text: torch.Tensor,
    opts: InfoOTOptions | None = None,
    *,
    size: int | None = 256,
    seed: int = 0,
) -> InfoOTFit:
    """Solve fused InfoOT once on (a random ``size``-subset of) the pairs; see `infoot_score`.

    image, text : (n, d) L2-normalised embeddings; ``size`` None uses all n (one m x m plan).
    """
    opts = opts or InfoOTOptions()
    check_pairs(image, text)
    n = image.shape[0]
    m = n if size is None else min(int(size), n)
    if m < 2:
        raise ValueError(f"need at least 2 reference pairs; got {m}.")
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:m]
    rows = rows.sort().values.to(image.device)
    img, txt = image[rows], text[rows]
    solve = Sinkhorn("infoot_fit", opts)
    with torch.no_grad():
        P = plans(img[None], txt[None], opts, solve)
    solve.report()
    return InfoOTFit(
        image=img,
        text=txt,
        plan=P[0],
        bandwidth2_image=float(bandwidth2(sq_dists(img, img), opts.h)),
        bandwidth2_text=float(bandwidth2(sq_dists(txt, txt), opts.h)),
        rows=rows.cpu(),
    )


@torch.no_grad()
def infoot_project(
    fit: InfoOTFit,
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    h_scale: float = 1.0,
    chunk: int = 8192,
) -> torch.Tensor:
    r"""Score new pairs with a fitted InfoOT plan, without re-solving (InfoOT's conditional projection).

    With normalised kernel weights :math:`w_k(x) \propto K(x, x_k)` over the reference
    images and :math:`v_l(t) \propto K(t, t_l)` over the reference texts,

    .. math:: \mathrm{score}(x, t) = \sum_{kl} w_k(x)\, \frac{P_{kl}}{a_k}\, v_l(t)
        = \frac{1}{m}\,\frac{\hat f_{xy}(x, t)}{\hat f_x(x)\, \hat f_y(t)},

    the kernel-smoothed conditional mass of t's neighbourhood given x's neighbourhood
    (InfoOT's density ratio over m). For a reference pair and a vanishing bandwidth it is
    the own-cell conditional mass :math:`m P_{kk}` that `infoot_score` uses.

    image, text : (n, d); ``h_scale`` multiplies the fit's bandwidths. Returns (n,).
    """
    check_pairs(image, text)
    if image.shape[1] != fit.image.shape[1]:
        raise ValueError(
            f"embedding width {image.shape[1]} does not match the fit's {fit.image.shape[1]}."
        )
    Q = fit.plan * fit.plan.shape[0]  # P_kl / a_k with uniform a
    bx = 2 * fit.bandwidth2_image * h_scale**2
    by = 2 * fit.bandwidth2_text * h_scale**2
    out = []
    for x, t in zip(image.split(chunk), text.split(chunk), strict=True):
        w = torch.softmax(-sq_dists(x, fit.image) / bx, dim=-1)
        v = torch.softmax(-sq_dists(t, fit.text) / by, dim=-1)
        out.append(((w @ Q) * v).sum(dim=-1))
    return torch.cat(out)
