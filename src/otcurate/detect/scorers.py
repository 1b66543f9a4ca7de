"""Cleanliness scorers: L2-normalised (n, d) image and text embeddings in, (n,) scores out
(higher = more likely a true match). Each batch scorer takes its options record."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from otcurate.detect.minibatch import Sinkhorn, check_pairs, logits, over_batches
from otcurate.methods import NoOptions
from otcurate.options import OTOptions, SoftmaxOptions
from otcurate.ot import cost_cosine, normalize_cost

# NCR / DivideMix fit the loss mixture with a deliberately short EM (10 steps, tol 1e-2)
# and this covariance floor; kept so the posteriors match the reference.
_GMM = {"n_components": 2, "max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}


def clip_score(
    image: torch.Tensor, text: torch.Tensor, opts: NoOptions | None = None, *, seed: int = 0
) -> torch.Tensor:
    """DataComp's CLIP score: the cosine similarity of each pair, (n,)."""
    if image.shape != text.shape:
        raise ValueError(
            f"image and text embeddings must have the same shape; got {tuple(image.shape)} and {tuple(text.shape)}."
        )
    return (image * text).sum(dim=1)


def ot_score(
    image: torch.Tensor, text: torch.Tensor, opts: OTOptions | None = None, *, seed: int = 0
) -> torch.Tensor:
    r"""Minibatch OT plan score: a pair's own-cell plan mass relative to its row's best, (n,).

    Each pass cuts the n pairs into random batches of B = ``batch_size``; per batch it
    solves entropic OT with uniform marginals between the images and the texts on
    :math:`M = (1 - I T^\top) / \max(1 - I T^\top)` (``reg``, log-domain Sinkhorn,
    all batches of a chunk at once), and scores pair i by :math:`P_{ii} / \max_j P_{ij}`
    in (0, 1] (``relative_to='both'``: the geometric mean with :math:`P_{ii} / \max_j P_{ji}`).
    Scores are averaged over ``passes`` random partitions, so the cost is
    O(passes * n * B * iterations): linear in n.

    ``trim='mixture'``: when the cosines are bimodal (`bimodality`), the pairs that a
    two-component mixture on them calls noisy with a posterior above ``trim_posterior``
    (`mixture_flags`, seeded with ``seed``) are set aside first and score ``cosine - 2``,
    below every kept pair and in the cosine's order; the kept pairs are scored by OT among
    themselves. Without a noisy mode the scores are plain OT's. Uninformative captions,
    which the cosine finds almost perfectly, then no longer take a share of the plan's
    mass in the batches of the pairs left to separate.

    image, text : (n, d) L2-normalised embeddings. Returns (n,) on their device.
    """
    opts = opts or OTOptions()
    check_pairs(image, text)
    if opts.trim == "mixture":
        return _trimmed(image, text, opts, seed)
    solve = Sinkhorn("ot", opts)

    def own_mass(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        P = solve(normalize_cost(cost_cosine(img, txt))).plan
        own = P.diagonal(dim1=-2, dim2=-1)
        row = own / P.amax(dim=-1)
        if opts.relative_to == "row":
            return row
        return (row * (own / P.amax(dim=-2))).sqrt()

    with torch.no_grad():  # a block, not a decorator, so the warning points at the caller
        out = over_batches(image, text, opts, seed, own_mass)
    solve.report()
    return out


def _trimmed(image: torch.Tensor, text: torch.Tensor, opts: OTOptions, seed: int) -> torch.Tensor:
    from otcurate.detect.flags import bimodality, mixture_flags

    plain = dataclasses.replace(opts, trim="none")
    cos = clip_score(image, text)
    x = cos.double().cpu().numpy()
    keep = None
    if bimodality(x, seed=seed)[1]:  # only then is there a noisy mode to set aside
        keep = ~mixture_flags(x, seed=seed, posterior=opts.trim_posterior)
    if keep is None or keep.sum() < 2:
        return ot_score(image, text, plain, seed=seed)
    out = cos - 2.0  # in [-3, -1]: below every kept pair's OT score in (0, 1]
    rows = torch.as_tensor(keep).nonzero().squeeze(1).to(image.device)
    out[rows] = ot_score(image[rows], text[rows], plain, seed=seed).to(out.dtype)
    return out


@torch.no_grad()
def ncu_batch_score(
    image: torch.Tensor, text: torch.Tensor, opts: SoftmaxOptions | None = None, *, seed: int = 0
) -> torch.Tensor:
    r"""NCU's in-batch rule: the image-to-text InfoNCE probability of the own caption, (n,).

    Per random batch of B = ``batch_size`` pairs, :math:`p_i = \mathrm{softmax}_j(s\, I_i \cdot T_j)_{i}`
    with ``logit_scale`` s; averaged over ``passes`` random partitions. NCU flags the
    round(nc_ratio * B) lowest p_i of each batch; a global `flag` on these scores is the
    pipeline's variant.

    image, text : (n, d) L2-normalised embeddings. Returns (n,) in [0, 1] on their device.
    """
    opts = opts or SoftmaxOptions()
    check_pairs(image, text)

    def own_prob(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return logits(img, txt, opts.scale).log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1).exp()

    return over_batches(image, text, opts, seed, own_prob)


def small_loss_posterior(loss: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """NCR / DivideMix clean probability from per-pair losses, (n,) -> (n,).

    Losses are min-max normalised to [0, 1], a 2-component Gaussian mixture is fitted
    (sklearn, ``random_state=seed``, the reference's 10 EM steps, tol 1e-2, reg_covar
    5e-4), and the score is the posterior of the component with the lower mean.
    Constant losses give all ones (nothing to separate).
    """
    from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
    from sklearn.mixture import GaussianMixture

    x = loss.detach().double().cpu().numpy()
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if x.size < 2 or not hi > lo:
        return torch.ones_like(loss)
    x = ((x - lo) / (hi - lo)).reshape(-1, 1)
    with warnings.catch_warnings():
        # 10 EM steps is the reference's early stop, not a failure.
        warnings.simplefilter("ignore", SkConvergenceWarning)
        gmm = GaussianMixture(**_GMM, random_state=int(seed)).fit(x)
    clean = gmm.predict_proba(x)[:, int(np.argmin(gmm.means_.ravel()))]
    return torch.as_tensor(clean, dtype=loss.dtype, device=loss.device)


@torch.no_grad()
def gmm_loss_score(
    image: torch.Tensor, text: torch.Tensor, opts: SoftmaxOptions | None = None, *, seed: int = 0
) -> torch.Tensor:
    r"""NCR's small-loss rule: clean posterior of a 2-component GMM on per-pair loss, (n,).

    The loss of pair i in a random batch is the symmetric InfoNCE over the batch
    negatives, :math:`\tfrac12[-\log \mathrm{softmax}_j(s S)_{ii} - \log \mathrm{softmax}_j(s S^\top)_{ii}]`,
    ``logit_scale`` s, averaged over ``passes`` random partitions; then
    :func:`small_loss_posterior` (seeded with ``seed``). Clean if > 0.5.

    image, text : (n, d) L2-normalised embeddings. Returns (n,) in [0, 1] on their device.
    """
    opts = opts or SoftmaxOptions()
    check_pairs(image, text)

    def infonce(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        z = logits(img, txt, opts.scale)
        i2t = z.log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1)
        t2i = z.log_softmax(dim=-2).diagonal(dim1=-2, dim2=-1)
        return -0.5 * (i2t + t2i)

    return small_loss_posterior(over_batches(image, text, opts, seed, infonce), seed=seed)
