"""From scores to flags (a fraction, a threshold, or a mixture on the scores), and the
flags' quality against planted ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detection:
    scores: np.ndarray  # (n,) float, higher = cleaner
    noisy: np.ndarray  # (n,) bool flags


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
