"""Coreset selection: choose k training pairs to fine-tune on.

Every method takes the candidate pool (indices into the train split) and a
budget `k` and returns a `Selection` of sorted, unique indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # (k,) sorted unique indices into the train split
    weights: np.ndarray  # (k,) sample weights (1.0 unless a method says otherwise)
    scores: np.ndarray  # (k,) the score the method ranked by (NaN when it has none)


@dataclass(frozen=True)
class Pool:
    """What methods may use: candidate indices and per-pair data for the whole train split."""

    candidates: np.ndarray  # (m,) indices of eligible pairs
    image: torch.Tensor  # (n, d) image embeddings
    text: torch.Tensor  # (n, d) text embeddings
    scores: np.ndarray  # (n,) detection cleanliness scores


def budget(n_train: int, n_candidates: int, *, fraction: float | None, size: int | None) -> int:
    """The number of pairs to select; a budget larger than the candidate pool is an error."""
    k = int(round(fraction * n_train)) if fraction is not None else int(size)
    if k < 1:
        raise ValueError(
            f"the coreset budget rounds to {k} pairs; raise coreset.fraction or coreset.size."
        )
    if k > n_candidates:
        raise ValueError(
            f"the coreset budget is {k} pairs but only {n_candidates} candidates remain "
            f"(of {n_train} train pairs, after excluding flagged ones); lower coreset.fraction/size "
            "or set coreset.exclude_flagged: false."
        )
    return k


def _finish(indices: np.ndarray, scores: np.ndarray) -> Selection:
    order = np.argsort(indices)
    return Selection(
        indices[order].astype(np.int64), np.ones(len(indices)), scores[order].astype(np.float64)
    )


def random(pool: Pool, k: int, *, seed: int) -> Selection:
    """k candidates uniformly at random."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(pool.candidates, size=k, replace=False)
    return _finish(chosen, pool.scores[chosen])


def clip_score(pool: Pool, k: int, *, seed: int) -> Selection:
    """The k candidates with the highest detection score (DataComp-style top-k)."""
    cand = pool.candidates
    order = np.argsort(-pool.scores[cand], kind="stable")[:k]
    chosen = cand[order]
    return _finish(chosen, pool.scores[chosen])


METHODS: dict[str, Callable[..., Selection]] = {"random": random, "clip_score": clip_score}


def select(method: str, pool: Pool, k: int, *, seed: int) -> Selection:
    if method not in METHODS:
        raise ValueError(f"unknown coreset method {method!r}; known: {', '.join(sorted(METHODS))}.")
    return METHODS[method](pool, k, seed=seed)
