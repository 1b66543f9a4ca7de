"""From scores to flags (a fraction, a threshold, or a mixture on the scores), and the
flags' quality against planted ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detection:
    scores: np.ndarray  # (n,) float, higher = cleaner
    noisy: np.ndarray  # (n,) bool flags


def mixture_flags(scores: np.ndarray, *, seed: int = 0, posterior: float = 0.5) -> np.ndarray:
    """Noisy flags from a two-component Gaussian mixture on the scores themselves.

    The pair is flagged when the posterior of the lower-mean component exceeds
    ``posterior`` (1/2: the flagged share is then an estimate of the noise rate; higher:
    only the pairs the mixture is that sure of). Constant scores flag nothing.
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    if len(x) < 2 or not float(x.max()) > float(x.min()):
        return np.zeros(len(x), dtype=bool)
    gmm = GaussianMixture(n_components=2, random_state=int(seed), reg_covar=1e-6).fit(x)
    low = int(np.argmin(gmm.means_.ravel()))
    return gmm.predict_proba(x)[:, low] > posterior


@dataclass(frozen=True)
class RateEstimate:
    """The noise rate a two-component mixture on the scores gives (the low component's
    weight), with its spread over bootstrap resamples of the scores."""

    rate: float
    std: float
    low: float  # 2.5% bootstrap quantile
    high: float  # 97.5%

    def metrics(self, prefix: str = "est_noise_rate") -> dict[str, float]:
        return {
            prefix: self.rate,
            f"{prefix}_std": self.std,
            f"{prefix}_low": self.low,
            f"{prefix}_high": self.high,
        }


def _low_weight(x: np.ndarray, seed: int) -> float:
    from sklearn.mixture import GaussianMixture

    if len(x) < 2 or not float(x.max()) > float(x.min()):
        return 0.0
    gmm = GaussianMixture(n_components=2, random_state=int(seed), reg_covar=1e-6).fit(x)
    return float(gmm.weights_[int(np.argmin(gmm.means_.ravel()))])


def estimate_rate(scores: np.ndarray, *, seed: int = 0, bootstrap: int = 20) -> RateEstimate:
    """The noise rate read off the scores (no ground truth), with its bootstrap spread."""
    x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    rate = _low_weight(x, seed)
    rng = np.random.default_rng(seed)
    draws = np.array(
        [_low_weight(x[rng.integers(0, len(x), len(x))], seed) for _ in range(bootstrap)]
    )
    if not len(draws):
        return RateEstimate(rate, 0.0, rate, rate)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return RateEstimate(rate, float(draws.std()), float(lo), float(hi))


def raised_fraction(fraction: float, estimate: RateEstimate, bimodal: bool) -> float:
    """The share to flag when ``fraction`` is a floor (`detect.raise_fraction`): the
    mixture's noise-rate estimate when it is higher and the scores are bimodal (only then
    does the estimate mean something: a mixture splits any scores in two), else ``fraction``."""
    return max(float(fraction), estimate.rate) if bimodal else float(fraction)


def flag(
    scores: np.ndarray,
    *,
    fraction: float | None = None,
    threshold: float | None = None,
    auto: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Noisy flags by exactly one rule: the lowest round(fraction * n) scores, scores <
    threshold, or `auto` (a two-component mixture on the scores).

    Equal scores at the fraction's cut are decided at random (seeded), never by row order:
    the order of rows carries no information about noise. `separation` says how many
    flags such ties decided."""
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
    tiebreak = np.random.default_rng(seed).random(n)
    out[np.lexsort((tiebreak, np.asarray(scores)))[:k]] = True
    return out


@dataclass(frozen=True)
class Separation:
    """Whether scores can tell noisy pairs from clean ones, with the reasons when not."""

    distinct: float  # distinct score values / pairs
    tied_flags: float  # share of the flags whose score equals an unflagged pair's
    ashman_d: float  # separation of a two-component mixture's means (> 2: clean split)
    bimodal: bool  # the mixture beats one Gaussian (BIC) and ashman_d > 2
    auroc: float | None  # against planted truth, when there is any
    warnings: tuple[str, ...]

    def metrics(self) -> dict[str, float]:
        return {
            "distinct_scores": self.distinct,
            "tied_flags": self.tied_flags,
            "ashman_d": self.ashman_d,
            "bimodal": float(self.bimodal),
            "separates": float(not self.warnings),
        }


def bimodality(scores: np.ndarray, *, seed: int = 0) -> tuple[float, bool]:
    """Ashman's D of a two-component mixture on the standardised scores, and whether they
    are bimodal: the mixture beats one Gaussian (BIC by more than 10) and D > 2. Fewer
    than 10 scores, or constant ones, are not bimodal (D 0)."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(scores, dtype=np.float64)
    if len(x) < 10 or not x.std() > 0:
        return 0.0, False
    z = ((x - x.mean()) / x.std()).reshape(-1, 1)
    g1 = GaussianMixture(1, random_state=seed).fit(z)
    g2 = GaussianMixture(2, random_state=seed, reg_covar=1e-6).fit(z)
    mu, var = g2.means_.ravel(), g2.covariances_.ravel()
    d = float(np.sqrt(2) * abs(mu[0] - mu[1]) / np.sqrt(var.sum()))
    return d, bool(g2.bic(z) < g1.bic(z) - 10 and d > 2)


def separation(
    scores: np.ndarray,
    flags: np.ndarray,
    truth: np.ndarray | None = None,
    *,
    min_auroc: float = 0.6,
    seed: int = 0,
) -> Separation:
    """Checks that a detector's scores separate anything: ties that decide flags, an AUROC
    below ``min_auroc`` against planted truth, or, without truth, no bimodality."""

    x = np.asarray(scores, dtype=np.float64)
    flags = np.asarray(flags, dtype=bool)
    n = len(x)
    warnings: list[str] = []
    distinct = len(np.unique(x)) / n if n else 0.0
    tied = 0.0
    if flags.any() and (~flags).any():
        tied = float(np.isin(x[flags], x[~flags]).mean())
    # Saturating scores (ot: 1.0 wherever the own cell is its row's best) tie many clean
    # pairs harmlessly; only ties that decide flags are a failure.
    if tied > 0.01:
        warnings.append(f"{tied:.1%} of the flags were decided between equal scores (at random)")
    d, bimodal = bimodality(x, seed=seed)
    auroc = None
    truth = None if truth is None else np.asarray(truth, dtype=bool)
    if truth is not None and truth.any() and not truth.all():
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(truth, -x))
        if auroc < min_auroc:
            warnings.append(f"AUROC {auroc:.3f} against the planted noise is below {min_auroc}")
    elif not bimodal:
        warnings.append(
            f"the scores are not bimodal (Ashman's D {d:.2f}; a clean/noisy split gives > 2): "
            "little noise, or noise this detector cannot see"
        )
    return Separation(distinct, tied, d, bimodal, auroc, tuple(warnings))


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
