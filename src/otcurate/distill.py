"""Dataset distillation: a few examples per class that stand in for the data.

Methods return `Distilled` index picks (real examples) per class; classes are
the data's labels, or k-means clusters of the text embeddings when it has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Distilled:
    indices: np.ndarray  # (m,) sorted indices of the real pairs chosen
    classes: np.ndarray  # (m,) the class (or cluster) each stands for


def clusters(text: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """Cluster ids (n,) of text embeddings by k-means, for data without labels."""
    from sklearn.cluster import KMeans

    k = min(k, len(text))
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(
        np.asarray(text, dtype=np.float64)
    )


def random_real(classes: np.ndarray, candidates: np.ndarray, ipc: int, *, seed: int) -> Distilled:
    """`ipc` random real pairs per class from `candidates` (fewer if a class has fewer)."""
    rng = np.random.default_rng(seed)
    picks, cls = [], []
    for c in np.unique(classes[candidates]):
        members = candidates[classes[candidates] == c]
        chosen = rng.choice(members, size=min(ipc, len(members)), replace=False)
        picks.append(chosen)
        cls.append(np.full(len(chosen), c))
    if not picks:
        return Distilled(np.empty(0, np.int64), np.empty(0, np.int64))
    idx, c = np.concatenate(picks), np.concatenate(cls)
    order = np.argsort(idx)
    return Distilled(idx[order].astype(np.int64), c[order].astype(np.int64))


METHODS: dict[str, Callable[..., Distilled]] = {"random_real": random_real}


def distill(
    method: str, classes: np.ndarray, candidates: np.ndarray, ipc: int, *, seed: int
) -> Distilled:
    if method not in METHODS:
        raise ValueError(f"unknown distill method {method!r}; known: {', '.join(sorted(METHODS))}.")
    return METHODS[method](classes, candidates, ipc, seed=seed)
