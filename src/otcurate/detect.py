"""Noisy-pair detection from precomputed embeddings (cleanlab-style: outputs in, flags out).

Every scorer maps L2-normalised image and text embeddings, (n, d) each, to a
cleanliness score per pair (higher = more likely a true match). `flag` turns
scores into noisy flags by a fraction or a threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Detection:
    scores: np.ndarray  # (n,) float, higher = cleaner
    noisy: np.ndarray  # (n,) bool flags


def clip_score(image: torch.Tensor, text: torch.Tensor, **_: object) -> torch.Tensor:
    """DataComp's CLIP score: the cosine similarity of each pair, (n,)."""
    if image.shape != text.shape:
        raise ValueError(f"image and text embeddings must have the same shape; got {tuple(image.shape)} and {tuple(text.shape)}.")
    return (image * text).sum(dim=1)


METHODS: dict[str, Callable[..., torch.Tensor]] = {"clip_score": clip_score}


def score(method: str, image: torch.Tensor, text: torch.Tensor, **kwargs: object) -> np.ndarray:
    """Cleanliness scores (n,) by the named method."""
    if method not in METHODS:
        raise ValueError(f"unknown detect method {method!r}; known: {', '.join(sorted(METHODS))}.")
    return METHODS[method](image, text, **kwargs).detach().cpu().double().numpy()


def flag(scores: np.ndarray, *, fraction: float | None = None, threshold: float | None = None) -> np.ndarray:
    """Noisy flags: the lowest round(fraction * n) scores (ties by position), or scores < threshold."""
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction and threshold.")
    n = len(scores)
    if threshold is not None:
        return np.asarray(scores) < threshold
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}.")
    k = int(round(fraction * n))
    out = np.zeros(n, dtype=bool)
    out[np.argsort(scores, kind="stable")[:k]] = True
    return out


def detect(method: str, image: torch.Tensor, text: torch.Tensor, *, fraction: float | None = None,
           threshold: float | None = None, **kwargs: object) -> Detection:
    s = score(method, image, text, **kwargs)
    return Detection(s, flag(s, fraction=fraction, threshold=threshold))


def quality(scores: np.ndarray, flags: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Detection quality against planted ground truth (noisy = positive class).

    AUROC of -score for noisy; precision/recall/F1 of the flags; estimated vs true noise rate.
    AUROC is NaN-free: it is omitted when the truth has a single class.
    """
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    truth = np.asarray(truth, dtype=bool)
    flags = np.asarray(flags, dtype=bool)
    out = {"est_noise_rate": float(flags.mean()) if len(flags) else 0.0,
           "true_noise_rate": float(truth.mean()) if len(truth) else 0.0}
    if truth.any() and not truth.all():
        out["auroc"] = float(roc_auc_score(truth, -np.asarray(scores)))
    p, r, f, _ = precision_recall_fscore_support(truth, flags, average="binary", zero_division=0)
    out.update(precision=float(p), recall=float(r), f1=float(f))
    return out


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve as _roc

    fpr, tpr, _ = _roc(np.asarray(truth, dtype=bool), -np.asarray(scores))
    return fpr, tpr
