import numpy as np
import pytest
import torch

from otcurate import coreset as cs
from otcurate import distill as dist
from otcurate.clusters import clusters


def pool(n=50, flagged=()):
    g = torch.Generator().manual_seed(0)
    e = torch.randn(n, 8, generator=g)
    scores = np.linspace(0, 1, n)[::-1].copy()
    cand = np.array([i for i in range(n) if i not in set(flagged)])
    target = torch.randn(10, 8, generator=g)
    return cs.Pool(cand, e, e, scores, target_image=target, target_text=target)


@pytest.mark.parametrize("method", sorted(cs.METHODS))
def test_selection_is_sorted_unique_sized_and_from_candidates(method):
    p = pool(flagged=(0, 1, 2, 10))
    sel = cs.select(method, p, 20, seed=3)
    assert len(sel.indices) == 20 == len(np.unique(sel.indices))
    assert np.all(np.diff(sel.indices) > 0)
    assert set(sel.indices) <= set(p.candidates)
    np.testing.assert_array_equal(sel.scores, p.scores[sel.indices])


def test_clip_score_takes_the_top_k():
    p = pool(flagged=(0,))
    sel = cs.select("clip_score", p, 5, seed=0)
    np.testing.assert_array_equal(sel.indices, [1, 2, 3, 4, 5])  # scores decrease with the index


def test_random_is_seeded():
    p = pool()
    a, b = cs.select("random", p, 10, seed=1), cs.select("random", p, 10, seed=1)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, cs.select("random", p, 10, seed=2).indices)


def test_budget():
    assert cs.budget(100, 80, fraction=0.5, size=None) == 50
    assert cs.budget(100, 80, fraction=None, size=7) == 7
    with pytest.raises(ValueError, match="budget is 90 pairs but only 80 candidates"):
        cs.budget(100, 80, fraction=0.9, size=None)
    with pytest.raises(ValueError, match="rounds to 0"):
        cs.budget(10, 10, fraction=0.01, size=None)


def test_random_real_picks_ipc_per_class():
    classes = np.array([0] * 10 + [1] * 3 + [2] * 7)
    cand = np.arange(20)
    d = dist.distill("random_real", classes, cand, 4, seed=0)
    assert np.all(np.diff(d.indices) > 0)
    np.testing.assert_array_equal(np.bincount(d.classes), [4, 3, 4])
    np.testing.assert_array_equal(classes[d.indices], d.classes)


def test_clusters_stand_in_for_labels():
    rng = np.random.default_rng(0)
    text = np.concatenate([rng.normal(0, 0.05, (20, 4)) + 3 * np.eye(4)[i] for i in range(3)])
    ids = clusters(text, 3, seed=0)
    assert len(np.unique(ids)) == 3
    for i in range(3):
        assert len(np.unique(ids[20 * i : 20 * (i + 1)])) == 1
