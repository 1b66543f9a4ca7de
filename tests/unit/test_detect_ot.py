"""OT-based and batch-loss detectors: planted-noise recovery, clean data, seeds, and the
exact formulas on single-batch cases. AUROC bounds are the values measured on these
fixtures (noted next to each case) minus a margin."""

import dataclasses
import functools
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from otcurate import detect as det
from otcurate.detect.infoot import mi_grad
from otcurate.detect.minibatch import batch_mean, partitions
from otcurate.ot import ConvergenceWarning, cost_cosine, normalize_cost, sinkhorn_log

F = torch.nn.functional
RANDOM_METHODS = ["ot", "ncu_batch", "gmm_loss", "infoot"]


# Convergence is not what these tests check (test_ot.py does; the exact-formula tests
# give both sides the same max_iter); the warn-once test records warnings itself.
pytestmark = [
    pytest.mark.filterwarnings("ignore::otcurate.ot.ConvergenceWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def planted(n=300, d=32, rate=0.2, noise=0.15, seed=0):
    """As test_detect.planted, with the per-coordinate embedding noise as a knob:
    clean pairs share a direction; noisy pairs get another pair's text."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(n, d, generator=g), dim=1)
    img = F.normalize(base + noise * torch.randn(n, d, generator=g), dim=1)
    txt = F.normalize(base + noise * torch.randn(n, d, generator=g), dim=1)
    noisy = np.zeros(n, dtype=bool)
    idx = np.random.default_rng(seed).choice(n, int(rate * n), replace=False)
    noisy[idx] = True
    txt[idx] = txt[np.roll(idx, 1)]
    return img, txt, noisy


def auroc(scores, noisy):
    return roc_auc_score(noisy, -np.asarray(scores))


# Default kwargs except 2 passes instead of 4, to keep the file fast: with the defaults
# every AUROC below moves by at most 0.003 and every F1 by at most 0.05.
KW = {"passes": 2}


def opts(method, **kw):
    """`method`'s options from those of `kw` it has (clip_score has none)."""
    known = {f.name for f in dataclasses.fields(det.METHODS[method].options)}
    return det.options(method, **{k: v for k, v in kw.items() if k in known})


@functools.cache
def scored(method, rate, noise=0.15, seed=0):
    """Scores on planted(rate, noise, seed) with KW, shared between tests."""
    img, txt, noisy = planted(rate=rate, noise=noise, seed=seed)
    return det.score(method, img, txt, opts(method, **KW)), noisy


# (method, rate, noise): measured (AUROC, F1 at fraction = rate) with KW.
# noise 0.2 is the hard setting, where clip_score measures (0.9715, 0.833) at rate 0.2
# and (0.9779, 0.927) at rate 0.5: on isotropic noise the in-batch context adds little.
MEASURED = {
    ("ot", 0.2, 0.15): (1.0000, 1.000),
    ("ot", 0.2, 0.2): (0.9729, 0.850),
    ("ot", 0.5, 0.2): (0.9806, 0.927),
    ("ncu_batch", 0.2, 0.15): (0.9994, 0.967),
    ("ncu_batch", 0.2, 0.2): (0.9699, 0.817),
    ("ncu_batch", 0.5, 0.2): (0.9751, 0.907),
    ("gmm_loss", 0.2, 0.15): (0.9999, 0.983),
    ("gmm_loss", 0.2, 0.2): (0.9737, 0.833),
    ("gmm_loss", 0.5, 0.2): (0.9803, 0.920),
    ("infoot", 0.2, 0.15): (1.0000, 1.000),
    ("infoot", 0.2, 0.2): (0.9734, 0.850),
    ("infoot", 0.5, 0.2): (0.9801, 0.920),
}
AUROC_MARGIN, F1_MARGIN = 0.02, 0.05


@pytest.mark.parametrize("method, rate, noise", list(MEASURED))
def test_detector_recovers_planted_noise(method, rate, noise):
    scores, noisy = scored(method, rate, noise)
    q = det.quality(scores, det.flag(scores, fraction=rate), noisy)
    measured_auroc, measured_f1 = MEASURED[method, rate, noise]
    assert q["auroc"] > measured_auroc - AUROC_MARGIN
    assert q["f1"] > measured_f1 - F1_MARGIN
    assert scores.shape == (300,) and np.isfinite(scores).all()
    assert (scores >= 0).all() and (scores <= 1 + 1e-6).all()


# Share of pairs scoring below 0.5 on clean data (rate 0, noise 0.15) with KW, measured,
# vs with 20% noise: ot 0.057 vs 0.253; ncu_batch 0.167 vs 0.350; gmm_loss 0.150 vs 0.263
# (a 2-component mixture always splits the data); infoot 0.123 vs 0.323.
# Clean medians: 1.0, 1.0, 0.99, 0.94.
CLEAN_FLAGGED = {"ot": 0.057, "ncu_batch": 0.167, "gmm_loss": 0.150, "infoot": 0.123}


@pytest.mark.parametrize("method", list(CLEAN_FLAGGED))
def test_clean_data_scores_high_and_flags_few(method):
    clean, _ = scored(method, 0.0)
    assert np.median(clean) > 0.9
    assert (clean < 0.5).mean() <= CLEAN_FLAGGED[method] + 0.05
    noisy_scores, _ = scored(method, 0.2)
    assert (noisy_scores < 0.5).mean() >= (clean < 0.5).mean() + 0.05


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_same_seed_same_scores_and_another_seed_differs(method):
    img, txt, _ = planted(n=200, rate=0.2)
    kw = {"batch_size": 64, "passes": 2, "max_iter": 200}
    a = det.score(method, img, txt, opts(method, **kw), seed=3)
    b = det.score(method, img, txt, opts(method, **kw), seed=3)
    c = det.score(method, img, txt, opts(method, **kw), seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("method", ["ot", "ncu_batch", "infoot"])
def test_one_batch_holding_every_pair_does_not_depend_on_the_seed(method):
    img, txt, _ = planted(n=50)
    a = det.score(method, img, txt, opts(method, batch_size=64, passes=1), seed=0)
    b = det.score(method, img, txt, opts(method, batch_size=64, passes=3), seed=9)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scorers_do_not_touch_the_global_rng():
    img, txt, _ = planted(n=64)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for method in RANDOM_METHODS:
        det.score(method, img, txt, opts(method, batch_size=32, passes=1, max_iter=50))
    torch.testing.assert_close(torch.rand(3), expected)


def test_methods_are_registered_and_an_unknown_option_is_an_error():
    assert {"clip_score", "ot", "ncu_batch", "gmm_loss", "infoot"} <= set(det.METHODS)
    img, txt, _ = planted(n=40)
    for method in RANDOM_METHODS:
        s = det.score(method, img, txt, opts(method, batch_size=16, passes=1, max_iter=50))
        assert s.shape == (40,)
        with pytest.raises(ValueError, match=f"{method}' has no option 'unknown'; its options: "):
            det.options(method, unknown=1)
    with pytest.raises(TypeError, match="ot takes OTOptions, got SoftmaxOptions"):
        det.score("ot", img, txt, det.SoftmaxOptions())
    # options records are keyword-only, frozen, and check their own values
    with pytest.raises(TypeError):
        det.OTOptions(256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        det.OTOptions().reg = 1.0
    for bad, match in [({"reg": 0.0}, "reg must be > 0"), ({"batch_size": 1}, "batch_size")]:
        with pytest.raises(ValueError, match=match):
            det.InfoOTOptions(**bad)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_shape_mismatch_is_an_error(method):
    with pytest.raises(ValueError, match="same shape"):
        det.METHODS[method].fn(torch.zeros(3, 4), torch.zeros(3, 5))


def test_partitions_score_every_pair_in_every_pass_with_full_batches():
    n, b, passes = 103, 16, 3
    idx = partitions(n, b, passes, seed=0)
    k = -(-n // b)
    assert idx.shape == (passes, k, b)
    for rows in idx:
        assert sorted(rows.reshape(-1)[:n].tolist()) == list(range(n))  # a permutation first
        for batch in rows:
            assert len(set(batch.tolist())) == b  # the top-up never repeats a pair in its batch
    assert partitions(5, 16, 1, seed=0).shape == (1, 1, 5)  # fewer pairs than a batch
    with pytest.raises(ValueError, match="batch_size"):
        partitions(10, 1, 1, seed=0)


def test_batch_mean_averages_each_pairs_own_batch_over_passes():
    n, passes = 10, 3
    idx = partitions(n, 4, passes, seed=1)  # 3 batches of 4 per pass, 2 of them top-up
    img = torch.arange(n, dtype=torch.float64)[:, None]

    def own_plus_context(i, t):  # depends on the batch a pair is in
        return i[..., 0] + 100 * i[..., 0].mean(dim=-1, keepdim=True)

    expected = torch.zeros(n, dtype=torch.float64)
    for rows in idx:
        seen = set()
        for batch in rows:
            for j in batch.tolist():
                if j not in seen:  # the first (own) batch counts, not the top-up copy
                    seen.add(j)
                    expected[j] += (j + 100 * batch.double().mean()) / passes
    torch.testing.assert_close(batch_mean(img, img, idx, own_plus_context), expected)


def plain_plan(img, txt):
    M = normalize_cost(cost_cosine(img, txt))
    # reg 0.1: converges to 1e-10 in a few hundred iterations (0.02 needs > 20000 here)
    return sinkhorn_log(None, None, M, 0.1, max_iter=5000, tol=1e-10).plan


def test_ot_score_is_own_plan_mass_over_row_max_on_one_batch():
    img, txt, _ = planted(n=40, rate=0.2)
    img, txt = img.double(), txt.double()
    P = plain_plan(img, txt)
    o = det.OTOptions(batch_size=64, passes=1, reg=0.1, max_iter=5000, tol=1e-10)
    got = det.ot_score(img, txt, o)
    torch.testing.assert_close(got, P.diagonal() / P.amax(dim=1), rtol=1e-9, atol=1e-12)


def test_ot_score_relative_to_both_is_the_geometric_mean_of_row_and_column_ratios():
    img, txt, _ = planted(n=40, rate=0.2)
    img, txt = img.double(), txt.double()
    P = plain_plan(img, txt)
    o = det.OTOptions(
        batch_size=64, passes=1, reg=0.1, max_iter=5000, tol=1e-10, relative_to="both"
    )
    got = det.ot_score(img, txt, o)
    d = P.diagonal()
    torch.testing.assert_close(
        got, (d / P.amax(dim=1) * d / P.amax(dim=0)).sqrt(), rtol=1e-9, atol=1e-12
    )
    with pytest.raises(ValueError, match="relative_to must be"):
        det.OTOptions(relative_to="col")


def test_ot_score_trim_mixture_sets_aside_the_cosines_noisy_mode_and_solves_ot_on_the_rest():
    img, txt, noisy = planted(n=200, rate=0.3)
    generic = F.normalize(torch.ones(1, img.shape[1]), dim=1)
    txt[:20] = generic  # one uninformative caption on 20 pairs: the cosine's easy noise
    from otcurate.detect.flags import bimodality, mixture_flags

    cos = det.clip_score(img, txt)
    assert bimodality(cos.double().numpy(), seed=3)[1]
    trimmed = mixture_flags(cos.double().numpy(), seed=3)
    assert 20 <= trimmed.sum() < 150  # the generic captions and the worst of the rest
    o = det.OTOptions(batch_size=64, passes=2, reg=0.1, max_iter=200)
    got = det.ot_score(img, txt, dataclasses.replace(o, trim="mixture"), seed=3)
    # set-aside pairs: the cosine shifted below every kept pair, so its order among them
    torch.testing.assert_close(got[trimmed], cos[trimmed] - 2.0)
    assert float(got[trimmed].max()) < -0.9 < 0 < float(got[~trimmed].min())
    # kept pairs: plain OT among themselves (their own batches, the same seed)
    keep = torch.as_tensor(np.flatnonzero(~trimmed))
    torch.testing.assert_close(got[keep], det.ot_score(img[keep], txt[keep], o, seed=3))
    with pytest.raises(ValueError, match="trim must be"):
        det.OTOptions(trim="cosine")
    # a higher posterior sets aside only the pairs the mixture is surer of
    sure = mixture_flags(cos.double().numpy(), seed=3, posterior=0.99)
    assert sure.sum() < trimmed.sum() and not (sure & ~trimmed).any()
    got = det.ot_score(
        img, txt, dataclasses.replace(o, trim="mixture", trim_posterior=0.99), seed=3
    )
    assert float(got[sure].max()) < -0.9 < 0 < float(got[~sure].min())
    with pytest.raises(ValueError, match="trim_posterior must be"):
        det.OTOptions(trim_posterior=1.0)


def test_ot_score_trim_mixture_without_a_noisy_mode_is_plain_ot():
    img, txt, _ = planted(n=80, rate=0.0)
    txt = img.clone()  # every cosine is 1 (up to rounding): no noisy mode to set aside
    o = det.OTOptions(batch_size=32, passes=1, reg=0.1, max_iter=200)
    torch.testing.assert_close(
        det.ot_score(img, txt, dataclasses.replace(o, trim="mixture")), det.ot_score(img, txt, o)
    )


def test_ncu_batch_is_the_own_caption_softmax_with_clamped_scale():
    img, txt, _ = planted(n=40, rate=0.2)
    expected = torch.softmax(100.0 * img @ txt.T, dim=1).diagonal()
    o = det.SoftmaxOptions(batch_size=64)  # logit_scale None: CLIP's clamp, 100
    torch.testing.assert_close(det.ncu_batch_score(img, txt, o), expected)
    # the scale is clamped to 100, as CLIP's logit_scale
    o = det.SoftmaxOptions(batch_size=64, logit_scale=1e4)
    torch.testing.assert_close(det.ncu_batch_score(img, txt, o), expected)
    low = det.ncu_batch_score(img, txt, det.SoftmaxOptions(batch_size=64, logit_scale=10.0))
    torch.testing.assert_close(low, torch.softmax(10.0 * img @ txt.T, dim=1).diagonal())
    with pytest.raises(ValueError, match="logit_scale"):
        det.ncu_batch_score(img, txt, det.SoftmaxOptions(logit_scale=0.0))


def test_small_loss_posterior_picks_the_low_loss_component():
    g = torch.Generator().manual_seed(0)
    loss = torch.cat(
        [0.1 + 0.05 * torch.randn(80, generator=g), 2.0 + 0.3 * torch.randn(20, generator=g)]
    )
    p = det.small_loss_posterior(loss, seed=0)
    assert (p[:80] > 0.5).all() and (p[80:] < 0.5).all()
    torch.testing.assert_close(det.small_loss_posterior(torch.full((5,), 0.3)), torch.ones(5))


def test_mi_gradient_matches_autograd():
    g = torch.Generator().manual_seed(1)
    n, m = 6, 7
    Kx = torch.exp(
        -(torch.cdist(*(2 * [torch.randn(n, 3, generator=g, dtype=torch.float64)])) ** 2)
    )
    Ky = torch.exp(
        -(torch.cdist(*(2 * [torch.randn(m, 3, generator=g, dtype=torch.float64)])) ** 2)
    )
    P = torch.rand(n, m, generator=g, dtype=torch.float64)
    P = (P / P.sum()).requires_grad_(True)

    def mutual_information(P):
        fxy = Kx @ P @ Ky.T
        return (P * torch.log(fxy / (Kx.mean(1)[:, None] * Ky.mean(1)[None, :]))).sum()

    (auto,) = torch.autograd.grad(mutual_information(P), P)
    torch.testing.assert_close(mi_grad(P.detach(), Kx, Ky), auto, rtol=1e-10, atol=1e-12)


def test_infoot_without_the_mi_term_is_plain_entropic_ot():
    img, txt, _ = planted(n=40, rate=0.2)
    img, txt = img.double(), txt.double()
    P = plain_plan(img, txt)
    o = det.InfoOTOptions(batch_size=64, passes=1, lam=0.0, reg=0.1, max_iter=5000, tol=1e-10)
    got = det.infoot_score(img, txt, o)
    torch.testing.assert_close(got, P.diagonal() * 40, rtol=1e-8, atol=1e-12)


def test_infoot_projection_reproduces_the_fit_and_scores_new_pairs():
    img, txt, noisy = planted(n=600, rate=0.2, noise=0.2, seed=3)
    fit = det.infoot_fit(img[:300], txt[:300], size=256, seed=0)
    assert fit.plan.shape == (256, 256)
    # A vanishing bandwidth turns the kernel weights into the pair itself: m * P_kk.
    own = det.infoot_project(fit, fit.image, fit.text, h_scale=1e-3)
    torch.testing.assert_close(own, fit.plan.diagonal() * 256, rtol=1e-5, atol=1e-7)
    held_out = det.infoot_project(fit, img[300:], txt[300:], chunk=64)
    assert held_out.shape == (300,)
    assert auroc(held_out.numpy(), noisy[300:]) > 0.93  # measured 0.957 (clip_score 0.982)


def test_unconverged_sinkhorn_warns_once_per_call():
    img, txt, _ = planted(n=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.ot_score(img, txt, det.OTOptions(batch_size=32, passes=3, max_iter=2))
    ours = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(ours) == 1 and "ot: Sinkhorn reached max_iter=2" in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the caller, not at library internals


@pytest.mark.parametrize("method", ["clip_score", "infoot"])
def test_fitted_detector_scores_new_pairs_without_refit(method):
    """Fit on 600 train pairs; 600 held-out pairs are scored by the saved detector (after a
    state round trip) and the cut flags about the train fraction (0.2) of them."""
    img, txt, noisy = planted(n=1200, rate=0.2, noise=0.2, seed=3)
    tr, new_rows = slice(0, 600), slice(600, None)
    o = opts(method, **KW)
    train = det.detect(method, img[tr], txt[tr], o, fraction=0.2, seed=0)
    fitted = det.fit_detector(method, img[tr], txt[tr], train, o, seed=0)
    assert (fitted.fit is not None) == (method == "infoot")
    meta, tensors = det.detector_state(fitted)
    again = det.detector_from_state(json.loads(json.dumps(meta)), tensors)
    if method == "clip_score":  # the same scorer: the train flags come back exactly
        assert np.array_equal(det.score_new(again, img[tr], txt[tr]).noisy, train.noisy)
    new = det.score_new(again, img[new_rows], txt[new_rows])
    # measured: clip_score AUROC 0.978, F1 0.887, 18.2% flagged; infoot 0.934, 0.775, 16.8%
    assert auroc(new.scores, noisy[new_rows]) > 0.9
    assert f1_score(noisy[new_rows], new.noisy) > 0.7
    assert 0.12 < new.noisy.mean() < 0.3


def test_threshold_rule_keeps_the_users_threshold():
    img, txt, _ = planted(n=100)
    res = det.detect("clip_score", img, txt, threshold=0.5)
    assert det.fit_detector("clip_score", img, txt, res, threshold=0.5).cutoff == 0.5
