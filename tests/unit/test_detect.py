import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from otcurate import detect as det


def planted(n=300, d=32, rate=0.2, seed=0):
    """Synthetic embeddings: clean pairs share a direction; noisy pairs get another pair's text."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    img = torch.nn.functional.normalize(base + 0.15 * torch.randn(n, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(base + 0.15 * torch.randn(n, d, generator=g), dim=1)
    noisy = np.zeros(n, dtype=bool)
    idx = np.random.default_rng(seed).choice(n, int(rate * n), replace=False)
    noisy[idx] = True
    txt[idx] = txt[np.roll(idx, 1)]
    return img, txt, noisy


def test_clip_score_is_the_pair_cosine():
    img, txt, _ = planted(20)
    np.testing.assert_allclose(
        det.score("clip_score", img, txt), (img * txt).sum(1).numpy(), rtol=1e-6
    )


def test_clip_score_recovers_planted_noise():
    img, txt, noisy = planted()
    r = det.detect("clip_score", img, txt, fraction=0.2)
    q = det.quality(r.scores, r.noisy, noisy)
    assert q["auroc"] > 0.95 and q["f1"] > 0.8
    assert q["auroc"] == pytest.approx(roc_auc_score(noisy, -r.scores))
    assert q["est_noise_rate"] == pytest.approx(0.2)


def test_clean_data_flags_nothing_by_threshold():
    img, txt, _ = planted(rate=0.0)
    r = det.detect("clip_score", img, txt, threshold=0.0)
    assert r.noisy.sum() == 0


def test_flag_fraction_and_threshold():
    s = np.array([0.5, 0.1, 0.9, 0.1, 0.3])
    np.testing.assert_array_equal(det.flag(s, fraction=0.4), [False, True, False, True, False])
    np.testing.assert_array_equal(det.flag(s, threshold=0.35), [False, True, False, True, True])
    with pytest.raises(ValueError, match="exactly one"):
        det.flag(s, fraction=0.2, threshold=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        det.flag(s)


def test_unknown_method_lists_known():
    img, txt, _ = planted(10)
    with pytest.raises(ValueError, match="known: clip_score"):
        det.score("nope", img, txt)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        det.clip_score(torch.zeros(3, 4), torch.zeros(3, 5))


def test_quality_without_both_classes_has_no_auroc():
    q = det.quality(np.array([0.1, 0.2]), np.array([False, True]), np.array([False, False]))
    assert "auroc" not in q and q["precision"] == 0.0


def test_auto_flags_estimate_the_noise_rate():
    img, txt, noisy = planted(n=600, rate=0.3)
    r = det.detect("clip_score", img, txt, auto=True, seed=0)
    q = det.quality(r.scores, r.noisy, noisy)
    assert abs(q["est_noise_rate"] - 0.3) < 0.05 and q["f1"] > 0.9
    with pytest.raises(ValueError, match="exactly one"):
        det.flag(r.scores, fraction=0.2, auto=True)
    assert not det.flag(np.ones(10), auto=True).any()  # nothing to separate


def test_ties_at_the_cut_are_decided_at_random_not_by_row_order():
    """Constant scores must not flag the first k rows (the digits failure: uid order)."""
    flags = [det.flag(np.zeros(1000), fraction=0.2, seed=s) for s in (0, 1)]
    for f in flags:
        assert f.sum() == 200
        assert f[:200].mean() < 0.35  # row order would flag all of the first 200
    assert (flags[0] != flags[1]).any()  # the seed decides
    s = np.array([0.1, 0.5, 0.5, 0.5, 0.9])  # strict order still wins over the tie-break
    assert det.flag(s, fraction=0.2, seed=3).tolist() == [True, False, False, False, False]


def test_separation_says_when_scores_tie_or_fail_against_truth():
    tied = det.separation(np.zeros(100), det.flag(np.zeros(100), fraction=0.2), None)
    assert tied.distinct == 0.01 and tied.tied_flags == 1.0
    assert not any("ties most" in w for w in tied.warnings)  # only flag-deciding ties warn
    assert any("decided between equal scores" in w for w in tied.warnings)
    assert tied.metrics()["separates"] == 0.0

    img, txt, noisy = planted(n=600, rate=0.3)
    r = det.detect("clip_score", img, txt, fraction=0.3)
    good = det.separation(r.scores, r.noisy, noisy)
    assert good.warnings == () and good.auroc > 0.95 and good.metrics()["separates"] == 1.0
    assert good.bimodal and good.ashman_d > 2  # a clean/noisy split shows without truth too
    assert det.separation(r.scores, r.noisy, None).warnings == ()

    rng = np.random.default_rng(0)
    blind = det.separation(rng.normal(size=600), r.noisy, noisy)  # scores that know nothing
    assert any("below 0.6" in w for w in blind.warnings)
    unimodal = det.separation(rng.normal(size=600), r.noisy, None)
    assert not unimodal.bimodal and any("not bimodal" in w for w in unimodal.warnings)


def test_estimate_rate_reads_the_noise_share_off_the_scores_with_its_spread():
    from otcurate.detect import estimate_rate

    rng = np.random.default_rng(0)
    for rate in (0.2, 0.4):
        n = 4000
        k = int(rate * n)
        scores = np.concatenate([rng.normal(0.1, 0.05, k), rng.normal(0.6, 0.08, n - k)])
        est = estimate_rate(scores, seed=0)
        assert abs(est.rate - rate) < 0.02
        assert 0 < est.std < 0.02 and est.low <= est.rate <= est.high
    flat = estimate_rate(np.full(50, 0.3))
    assert flat.rate == 0.0 and flat.std == 0.0


def test_raised_fraction_follows_a_bimodal_estimate_only_upwards():
    est = det.RateEstimate(rate=0.4, std=0.01, low=0.38, high=0.42)
    assert det.raised_fraction(0.2, est, bimodal=True) == 0.4
    assert det.raised_fraction(0.2, est, bimodal=False) == 0.2  # a mixture splits anything
    assert det.raised_fraction(0.5, est, bimodal=True) == 0.5  # a floor: never fewer flags
