"""Classes for data without labels: k-means clusters of the text embeddings (used by
coreset's goracs groups and by distill's per-class budgets alike)."""

from __future__ import annotations

import numpy as np


def clusters(text: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """Cluster ids (n,) of text embeddings by k-means, for data without labels."""
    from sklearn.cluster import KMeans

    k = min(k, len(text))
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(
        np.asarray(text, dtype=np.float64)
    )
