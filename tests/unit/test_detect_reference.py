"""Scores against a clean reference set (otcurate.detect.reference), tested by their
properties: recovery of planted noise, the kNN score against brute force, the OT score's
plan against POT's own problem, and clear errors."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from otcurate.detect import reference as ref


def concepts(n: int, d: int, *, noise_rate: float, seed: int, k: int = 12):
    """Pairs of k concepts: image and caption near their concept's two anchors; a noisy pair
    takes the caption of another concept (a near-miss, not a random permutation)."""
    g = torch.Generator().manual_seed(seed)
    anchors_i = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    anchors_t = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    c = torch.randint(0, k, (n,), generator=g)
    img = torch.nn.functional.normalize(anchors_i[c] + 0.2 * torch.randn(n, d, generator=g), dim=1)
    cap = c.clone()
    noisy = torch.rand(n, generator=g) < noise_rate
    cap[noisy] = (c[noisy] + 1 + torch.randint(0, k - 1, (int(noisy.sum()),), generator=g)) % k
    txt = torch.nn.functional.normalize(
        anchors_t[cap] + 0.2 * torch.randn(n, d, generator=g), dim=1
    )
    return img, txt, noisy.numpy()


def test_joint_embedding_is_unit_norm_and_checks_shapes():
    img, txt, _ = concepts(17, 8, noise_rate=0.0, seed=0)
    torch.testing.assert_close(ref.joint(img, txt).norm(dim=1), torch.ones(17))
    with pytest.raises(ValueError, match="same shape"):
        ref.joint(img, txt[:, :4])


def test_knn_score_is_the_mean_of_the_k_largest_joint_cosines():
    img, txt, _ = concepts(29, 8, noise_rate=0.3, seed=1)
    rimg, rtxt, _ = concepts(17, 8, noise_rate=0.0, seed=2)
    sims = (ref.joint(img, txt) @ ref.joint(rimg, rtxt).T).numpy()
    want = np.sort(sims, axis=1)[:, -3:].mean(axis=1)
    got = ref.reference_knn_score(img, txt, rimg, rtxt, k=3, chunk=7).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # k beyond the reference is clipped to its size
    np.testing.assert_allclose(
        ref.reference_knn_score(img, txt, rimg, rtxt, k=100).numpy(), sims.mean(axis=1), rtol=1e-5
    )


@pytest.mark.parametrize("scorer", ["knn", "ot"])
def test_reference_scores_recover_planted_near_miss_noise(scorer):
    img, txt, noisy = concepts(600, 16, noise_rate=0.4, seed=3)
    rimg, rtxt, _ = concepts(200, 16, noise_rate=0.0, seed=3)  # same concepts, clean
    fn = ref.reference_knn_score if scorer == "knn" else ref.reference_ot_score
    s = fn(img, txt, rimg, rtxt).numpy()
    assert roc_auc_score(noisy, -s) > 0.95


def test_ot_score_is_the_row_mass_of_pots_semi_relaxed_plan():
    import ot

    img, txt, _ = concepts(23, 8, noise_rate=0.3, seed=4)
    rimg, rtxt, _ = concepts(11, 8, noise_rate=0.0, seed=5)
    got = ref.reference_ot_score(img.double(), txt.double(), rimg.double(), rtxt.double(),
                                 reg=0.05, reg_m=0.1)  # fmt: skip
    z, r = ref.joint(img, txt).double().numpy(), ref.joint(rimg, rtxt).double().numpy()
    M = 1 - z @ r.T
    M /= M.max()
    plan = ot.unbalanced.sinkhorn_unbalanced(
        np.full(23, 1 / 23), np.full(11, 1 / 11), M, 0.05, (0.1, float("inf")),
        method="sinkhorn_stabilized", numItermax=1000, stopThr=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(got.numpy(), plan.sum(axis=1) * 23, rtol=1e-6)
    # the reference's marginal is kept, so all the mass moves: the scores average 1
    np.testing.assert_allclose(float(got.mean()), 1.0, rtol=1e-4)


def test_bad_reference_inputs_are_clear_errors():
    img, txt, _ = concepts(10, 8, noise_rate=0.0, seed=6)
    empty = torch.zeros(0, 8)
    with pytest.raises(ValueError, match="empty"):
        ref.reference_knn_score(img, txt, empty, empty)
    with pytest.raises(ValueError, match="empty"):
        ref.reference_ot_score(img, txt, empty, empty)
    with pytest.raises(ValueError, match="reg"):
        ref.reference_ot_score(img, txt, img, txt, reg=0.0)
