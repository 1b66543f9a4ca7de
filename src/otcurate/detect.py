"""Noisy-pair detection from precomputed embeddings (cleanlab-style: outputs in, flags out).

Every scorer maps L2-normalised image and text embeddings, (n, d) each, to a
cleanliness score per pair (higher = more likely a true match). `flag` turns
scores into noisy flags by a fraction or a threshold.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from otcurate.ot import ConvergenceWarning, OTResult, cost_cosine, normalize_cost, sinkhorn_log


@dataclass(frozen=True)
class Detection:
    scores: np.ndarray  # (n,) float, higher = cleaner
    noisy: np.ndarray  # (n,) bool flags


def clip_score(image: torch.Tensor, text: torch.Tensor, **_: object) -> torch.Tensor:
    """DataComp's CLIP score: the cosine similarity of each pair, (n,)."""
    if image.shape != text.shape:
        raise ValueError(
            f"image and text embeddings must have the same shape; got {tuple(image.shape)} and {tuple(text.shape)}."
        )
    return (image * text).sum(dim=1)


def _check_pairs(image: torch.Tensor, text: torch.Tensor) -> None:
    if image.shape != text.shape:
        raise ValueError(
            f"image and text embeddings must have the same shape; got {tuple(image.shape)} and {tuple(text.shape)}."
        )
    if image.ndim != 2:
        raise ValueError(f"embeddings must be (n, d); got shape {tuple(image.shape)}.")


# Minibatch OT problems solved in one batched call: bounds each (chunk, B, B)
# temporary at 128 * 256**2 float32 = 32 MiB while keeping the device busy.
_CHUNK = 128
# NCR / DivideMix fit the loss mixture with a deliberately short EM (10 steps, tol 1e-2)
# and this covariance floor; kept so the posteriors match the reference.
_GMM = {"n_components": 2, "max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}


def _partitions(n: int, batch_size: int, passes: int, seed: int) -> torch.Tensor:
    """Row indices of the minibatches, (passes, k, B), B = min(batch_size, n), k = ceil(n / B).

    Each pass is a fresh random permutation (a seeded CPU torch.Generator, never the
    global RNG) cut into k batches. The last batch is topped up with pairs from the
    start of the same permutation, which are never already in it, so every batch is a
    full B-pair context; flattened, a pass's first n entries are the permutation itself.
    """
    if n < 2:
        raise ValueError(f"need at least 2 pairs to form a batch; got {n}.")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2; got {batch_size}.")
    if passes < 1:
        raise ValueError(f"passes must be >= 1; got {passes}.")
    b = min(batch_size, n)
    k = -(-n // b)
    pad = k * b - n
    g = torch.Generator().manual_seed(int(seed))
    rows = []
    for _ in range(passes):
        perm = torch.randperm(n, generator=g)
        rows.append(torch.cat([perm, perm[:pad]]).view(k, b))
    return torch.stack(rows)


def _batch_mean(
    image: torch.Tensor,
    text: torch.Tensor,
    idx: torch.Tensor,
    per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Mean over passes of `per_batch(img, txt) -> (K, B)` values, (n,).

    ``idx`` is `_partitions`' (passes, k, B). A pair's value in a pass is the one from its
    own batch (the top-up copies in the last batch only give that batch its context), so
    the result is a plain scatter, deterministic on every device.
    """
    n = image.shape[0]
    passes, k, b = idx.shape
    idx = idx.to(image.device).reshape(passes * k, b)
    values = torch.cat([per_batch(image[rows], text[rows]) for rows in idx.split(_CHUNK)])
    own = idx.reshape(passes, k * b)[:, :n]
    out = values.new_empty(passes, n).scatter_(1, own, values.reshape(passes, k * b)[:, :n])
    return out.mean(dim=0)


class _Sinkhorn:
    """Uniform-marginal log-domain Sinkhorn over chunks of batches; warns once per scorer call."""

    def __init__(self, method: str, reg: float, max_iter: int, tol: float):
        self.method, self.reg, self.max_iter, self.tol = method, float(reg), int(max_iter), tol
        self.unconverged, self.worst = 0, 0.0

    def __call__(self, M: torch.Tensor, warmstart=None) -> OTResult:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            r = sinkhorn_log(
                None, None, M, self.reg, max_iter=self.max_iter, tol=self.tol, warmstart=warmstart
            )
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                self.unconverged += 1
                self.worst = max(self.worst, float(r.err.detach().max()))
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return r

    def report(self) -> None:
        if self.unconverged:
            warnings.warn(
                f"{self.method}: Sinkhorn reached max_iter={self.max_iter} in {self.unconverged} "
                f"solve(s), marginal error up to {self.worst:.1e} (tol {self.tol:.0e}); the scores "
                "use those plans. Raise max_iter or reg for exact plans.",
                ConvergenceWarning,
                stacklevel=3,  # report <- scorer <- caller
            )


def _logits(img: torch.Tensor, txt: torch.Tensor, logit_scale: float) -> torch.Tensor:
    # The CLIP temperature s is clamped to <= 100 as in open_clip / NCU.
    s = min(float(logit_scale), 100.0)
    if not s > 0:
        raise ValueError(f"logit_scale must be > 0; got {logit_scale}.")
    return s * (img @ txt.mT)


def ot_score(
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    batch_size: int = 256,
    passes: int = 4,
    reg: float = 0.02,
    max_iter: int = 1000,
    tol: float = 1e-4,
    seed: int = 0,
    **_: object,
) -> torch.Tensor:
    r"""Minibatch OT plan score: a pair's own-cell plan mass relative to its row's best, (n,).

    Each pass cuts the n pairs into random batches of B = ``batch_size``; per batch it
    solves entropic OT with uniform marginals between the images and the texts on
    :math:`M = (1 - I T^\top) / \max(1 - I T^\top)` (``reg``, log-domain Sinkhorn,
    all batches of a chunk at once), and scores pair i by :math:`P_{ii} / \max_j P_{ij}`
    in (0, 1]. Scores are averaged over ``passes`` random partitions, so the cost is
    O(passes * n * B * iterations): linear in n.

    image, text : (n, d) L2-normalised embeddings. Returns (n,) on their device.
    """
    _check_pairs(image, text)
    solve = _Sinkhorn("ot", reg, max_iter, tol)

    def own_mass(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        P = solve(normalize_cost(cost_cosine(img, txt))).plan
        return P.diagonal(dim1=-2, dim2=-1) / P.amax(dim=-1)

    with torch.no_grad():  # a block, not a decorator, so the warning points at the caller
        out = _batch_mean(
            image, text, _partitions(image.shape[0], batch_size, passes, seed), own_mass
        )
    solve.report()
    return out


@torch.no_grad()
def ncu_batch_score(
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    batch_size: int = 256,
    passes: int = 4,
    logit_scale: float = 100.0,
    seed: int = 0,
    **_: object,
) -> torch.Tensor:
    r"""NCU's in-batch rule: the image-to-text InfoNCE probability of the own caption, (n,).

    Per random batch of B = ``batch_size`` pairs, :math:`p_i = \mathrm{softmax}_j(s\, I_i \cdot T_j)_{i}`
    with ``logit_scale`` s (the CLIP temperature itself, not its log; clamped to <= 100);
    averaged over ``passes`` random partitions. NCU flags the round(nc_ratio * B) lowest
    p_i of each batch; a global `flag` on these scores is the pipeline's variant.

    image, text : (n, d) L2-normalised embeddings. Returns (n,) in [0, 1] on their device.
    """
    _check_pairs(image, text)

    def own_prob(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return _logits(img, txt, logit_scale).log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1).exp()

    return _batch_mean(image, text, _partitions(image.shape[0], batch_size, passes, seed), own_prob)


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
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    batch_size: int = 256,
    passes: int = 4,
    logit_scale: float = 100.0,
    seed: int = 0,
    **_: object,
) -> torch.Tensor:
    r"""NCR's small-loss rule: clean posterior of a 2-component GMM on per-pair loss, (n,).

    The loss of pair i in a random batch is the symmetric InfoNCE over the batch
    negatives, :math:`\tfrac12[-\log \mathrm{softmax}_j(s S)_{ii} - \log \mathrm{softmax}_j(s S^\top)_{ii}]`,
    ``logit_scale`` s clamped to <= 100, averaged over ``passes`` random partitions;
    then :func:`small_loss_posterior` (seeded with ``seed``). Clean if > 0.5.

    image, text : (n, d) L2-normalised embeddings. Returns (n,) in [0, 1] on their device.
    """
    _check_pairs(image, text)

    def infonce(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        z = _logits(img, txt, logit_scale)
        i2t = z.log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1)
        t2i = z.log_softmax(dim=-2).diagonal(dim1=-2, dim2=-1)
        return -0.5 * (i2t + t2i)

    loss = _batch_mean(image, text, _partitions(image.shape[0], batch_size, passes, seed), infonce)
    return small_loss_posterior(loss, seed=seed)


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances, (..., n, d) x (..., m, d) -> (..., n, m)."""
    xx = (x * x).sum(-1)[..., :, None]
    yy = (y * y).sum(-1)[..., None, :]
    return (xx + yy - 2 * x @ y.mT).clamp_min(0)


def _bandwidth2(sq: torch.Tensor, h: float) -> torch.Tensor:
    """InfoOT's squared bandwidth h**2 * mean(D**2) / 2 per problem, (..., 1, 1)."""
    return (h * h) * sq.mean(dim=(-2, -1), keepdim=True) / 2


def _mi_grad(P: torch.Tensor, Kx: torch.Tensor, Ky: torch.Tensor) -> torch.Tensor:
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


def _infoot_plans(
    img: torch.Tensor,
    txt: torch.Tensor,
    *,
    reg: float,
    lam: float,
    h: float,
    outer_iter: int,
    solve,
) -> torch.Tensor:
    """Fused InfoOT plans for a batch of problems, (K, B, d) x (K, B, d) -> (K, B, B)."""
    C = normalize_cost(cost_cosine(img, txt))
    Kx = torch.exp(-(sq := _sq_dists(img, img)) / (2 * _bandwidth2(sq, h)))
    Ky = torch.exp(-(sq := _sq_dists(txt, txt)) / (2 * _bandwidth2(sq, h)))
    n, m = C.shape[-2], C.shape[-1]
    P = torch.full_like(C, 1.0 / (n * m))
    potentials = None
    for _ in range(outer_iter):
        # Mirror-descent step of InfoOT: Sinkhorn on the linearised objective, warm-started
        # from the previous step's scalings (the linearised cost moves little between steps).
        r = solve(C - lam * _mi_grad(P, Kx, Ky), warmstart=potentials)
        P, potentials = r.plan, (r.log_u, r.log_v)
    return P


def infoot_score(
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    batch_size: int = 256,
    passes: int = 4,
    reg: float = 0.02,
    lam: float = 0.01,
    h: float = 0.5,
    outer_iter: int = 5,
    max_iter: int = 1000,
    tol: float = 1e-4,
    seed: int = 0,
    **_: object,
) -> torch.Tensor:
    r"""Fused InfoOT (Chuang et al., ICML 2023) on minibatches: own-cell conditional mass, (n,).

    Per random batch of B pairs, with cost :math:`C = (1 - I T^\top)/\max` and Gaussian
    kernels :math:`K_x, K_y` on the in-modal distances (bandwidth ``h`` times
    :math:`\sqrt{\mathrm{mean}(D^2)/2}`, as the reference), it solves
    :math:`\min_P \langle P, C\rangle - \lambda I(P) - \mathrm{reg}\,H(P)` by
    ``outer_iter`` rounds of Sinkhorn on :math:`C - \lambda \nabla I(P)` starting from
    the independent plan (:func:`_mi_grad`). Pair i scores :math:`P_{ii} / a_i = B P_{ii}`,
    the conditional mass its image sends to its own caption; averaged over ``passes``.

    image, text : (n, d) L2-normalised embeddings. Returns (n,) in [0, 1] on their device.
    """
    _check_pairs(image, text)
    solve = _Sinkhorn("infoot", reg, max_iter, tol)

    def own_conditional(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        P = _infoot_plans(img, txt, reg=reg, lam=lam, h=h, outer_iter=outer_iter, solve=solve)
        return P.diagonal(dim1=-2, dim2=-1) * P.shape[-2]

    with torch.no_grad():
        idx = _partitions(image.shape[0], batch_size, passes, seed)
        out = _batch_mean(image, text, idx, own_conditional)
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
    *,
    size: int | None = 256,
    reg: float = 0.02,
    lam: float = 0.01,
    h: float = 0.5,
    outer_iter: int = 5,
    max_iter: int = 1000,
    tol: float = 1e-4,
    seed: int = 0,
) -> InfoOTFit:
    """Solve fused InfoOT once on (a random ``size``-subset of) the pairs; see `infoot_score`.

    image, text : (n, d) L2-normalised embeddings; ``size`` None uses all n (one m x m plan).
    """
    _check_pairs(image, text)
    n = image.shape[0]
    m = n if size is None else min(int(size), n)
    if m < 2:
        raise ValueError(f"need at least 2 reference pairs; got {m}.")
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:m]
    rows = rows.sort().values.to(image.device)
    img, txt = image[rows], text[rows]
    solve = _Sinkhorn("infoot_fit", reg, max_iter, tol)
    with torch.no_grad():
        P = _infoot_plans(
            img[None], txt[None], reg=reg, lam=lam, h=h, outer_iter=outer_iter, solve=solve
        )
    solve.report()
    return InfoOTFit(
        image=img,
        text=txt,
        plan=P[0],
        bandwidth2_image=float(_bandwidth2(_sq_dists(img, img), h)),
        bandwidth2_text=float(_bandwidth2(_sq_dists(txt, txt), h)),
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
    _check_pairs(image, text)
    if image.shape[1] != fit.image.shape[1]:
        raise ValueError(
            f"embedding width {image.shape[1]} does not match the fit's {fit.image.shape[1]}."
        )
    Q = fit.plan * fit.plan.shape[0]  # P_kl / a_k with uniform a
    bx = 2 * fit.bandwidth2_image * h_scale**2
    by = 2 * fit.bandwidth2_text * h_scale**2
    out = []
    for x, t in zip(image.split(chunk), text.split(chunk), strict=True):
        w = torch.softmax(-_sq_dists(x, fit.image) / bx, dim=-1)
        v = torch.softmax(-_sq_dists(t, fit.text) / by, dim=-1)
        out.append(((w @ Q) * v).sum(dim=-1))
    return torch.cat(out)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "clip_score": clip_score,
    "ot": ot_score,
    "ncu_batch": ncu_batch_score,
    "gmm_loss": gmm_loss_score,
    "infoot": infoot_score,
}


def score(method: str, image: torch.Tensor, text: torch.Tensor, **kwargs: object) -> np.ndarray:
    """Cleanliness scores (n,) by the named method."""
    if method not in METHODS:
        raise ValueError(f"unknown detect method {method!r}; known: {', '.join(sorted(METHODS))}.")
    return METHODS[method](image, text, **kwargs).detach().cpu().double().numpy()


def mixture_flags(scores: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Noisy flags from a two-component Gaussian mixture on the scores themselves.

    The pair is flagged when the posterior of the lower-mean component exceeds 1/2; the
    flagged share is then an estimate of the noise rate. Constant scores flag nothing.
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    if len(x) < 2 or not float(x.max()) > float(x.min()):
        return np.zeros(len(x), dtype=bool)
    gmm = GaussianMixture(n_components=2, random_state=int(seed), reg_covar=1e-6).fit(x)
    low = int(np.argmin(gmm.means_.ravel()))
    return gmm.predict_proba(x)[:, low] > 0.5


def flag(
    scores: np.ndarray,
    *,
    fraction: float | None = None,
    threshold: float | None = None,
    auto: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Noisy flags by exactly one rule: the lowest round(fraction * n) scores (ties by
    position), scores < threshold, or `auto` (a two-component mixture on the scores)."""
    if sum([fraction is not None, threshold is not None, bool(auto)]) != 1:
        raise ValueError("give exactly one of fraction, threshold and auto.")
    n = len(scores)
    if auto:
        return mixture_flags(scores, seed=seed)
    if threshold is not None:
        return np.asarray(scores) < threshold
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}.")
    k = int(round(fraction * n))
    out = np.zeros(n, dtype=bool)
    out[np.argsort(scores, kind="stable")[:k]] = True
    return out


def detect(
    method: str,
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    fraction: float | None = None,
    threshold: float | None = None,
    auto: bool = False,
    **kwargs: object,
) -> Detection:
    s = score(method, image, text, **kwargs)
    seed = int(kwargs.get("seed", 0))
    return Detection(s, flag(s, fraction=fraction, threshold=threshold, auto=auto, seed=seed))


def quality(scores: np.ndarray, flags: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Detection quality against planted ground truth (noisy = positive class).

    AUROC of -score for noisy; precision/recall/F1 of the flags; estimated vs true noise rate.
    AUROC is NaN-free: it is omitted when the truth has a single class.
    """
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    truth = np.asarray(truth, dtype=bool)
    flags = np.asarray(flags, dtype=bool)
    out = {
        "est_noise_rate": float(flags.mean()) if len(flags) else 0.0,
        "true_noise_rate": float(truth.mean()) if len(truth) else 0.0,
    }
    if truth.any() and not truth.all():
        out["auroc"] = float(roc_auc_score(truth, -np.asarray(scores)))
    p, r, f, _ = precision_recall_fscore_support(truth, flags, average="binary", zero_division=0)
    out.update(precision=float(p), recall=float(r), f1=float(f))
    return out


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve as _roc

    fpr, tpr, _ = _roc(np.asarray(truth, dtype=bool), -np.asarray(scores))
    return fpr, tpr


@dataclass(frozen=True)
class Detector:
    """A fitted detector: scores pairs it has never seen, without refitting.

    method, kwargs : the detect method and its keywords (including the temperature);
    cutoff : new pairs scoring below it are flagged (chosen on the train pairs so that the
    train flags are reproduced: the same fraction, threshold or mixture split);
    fit : InfoOT's plan on reference train pairs (``infoot``: new pairs are scored by its
    conditional projection, `infoot_project`); None for the other methods, which score new
    pairs by their own rule (the cosine, or their minibatch OT/softmax/mixture score over
    the new pairs).
    """

    method: str
    kwargs: dict
    cutoff: float
    fit: InfoOTFit | None = None


def _cutoff(scores: np.ndarray, flags: np.ndarray) -> float:
    """A score cut that flags the same fraction of these scores as `flags` does."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = int(np.asarray(flags, dtype=bool).sum())
    if k == 0:
        return float("-inf")
    if k >= len(s):
        return float("inf")
    return float((s[k - 1] + s[k]) / 2)


def fit_detector(
    method: str,
    image: torch.Tensor,
    text: torch.Tensor,
    result: Detection,
    *,
    threshold: float | None = None,
    **kwargs: object,
) -> Detector:
    """The detector behind `result` (train scores and flags), ready to score new pairs.

    ``infoot`` fits one plan on a ``batch_size`` subset of the train pairs and places the
    cut on the train pairs' projections at the train flag fraction; the other methods keep
    the user's threshold, or cut between the flagged and unflagged train scores.
    """
    if method == "infoot":
        keys = ("reg", "lam", "h", "outer_iter", "max_iter", "tol", "seed")
        fit = infoot_fit(
            image,
            text,
            size=int(kwargs.get("batch_size", 256)),
            **{k: kwargs[k] for k in keys if k in kwargs},
        )
        # The cut is placed on train pairs outside the reference set when there are enough
        # of them: the references' own cells make their projections optimistic.
        held = np.ones(image.shape[0], dtype=bool)
        held[fit.rows.numpy()] = False
        if held.sum() < 50:
            held[:] = True
        sel = torch.as_tensor(held, device=image.device)
        projected = infoot_project(fit, image[sel], text[sel]).double().cpu().numpy()
        return Detector(method, kwargs, _cutoff(projected, result.noisy[held]), fit)
    if method not in METHODS:
        raise ValueError(f"unknown detect method {method!r}; known: {', '.join(sorted(METHODS))}.")
    cut = float(threshold) if threshold is not None else _cutoff(result.scores, result.noisy)
    return Detector(method, kwargs, cut)


def score_new(detector: Detector, image: torch.Tensor, text: torch.Tensor) -> Detection:
    """Scores and flags of new pairs by a fitted detector (no refit)."""
    if detector.fit is not None:
        s = infoot_project(detector.fit, image, text).double().cpu().numpy()
    else:
        s = score(detector.method, image, text, **detector.kwargs)
    return Detection(s, s < detector.cutoff)


def detector_state(detector: Detector) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able description, tensors) of a detector, for saving; see `detector_from_state`."""
    meta = {"method": detector.method, "kwargs": detector.kwargs, "cutoff": detector.cutoff}
    tensors: dict[str, torch.Tensor] = {}
    if detector.fit is not None:
        f = detector.fit
        meta["bandwidth2_image"] = f.bandwidth2_image
        meta["bandwidth2_text"] = f.bandwidth2_text
        tensors = {"image": f.image, "text": f.text, "plan": f.plan}
    return meta, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def detector_from_state(meta: dict, tensors: dict[str, torch.Tensor]) -> Detector:
    fit = None
    if meta["method"] == "infoot":
        fit = InfoOTFit(
            tensors["image"],
            tensors["text"],
            tensors["plan"],
            float(meta["bandwidth2_image"]),
            float(meta["bandwidth2_text"]),
        )
    return Detector(meta["method"], dict(meta["kwargs"]), float(meta["cutoff"]), fit)
