"""L2RM-style rematching: the partial plan against POT's exact partial OT and the
reference's dummy-row construction, the soft-target loss, and the fine-tuning method."""

import math

import numpy as np
import ot
import pytest
import torch

from otcurate import finetuning, models
from otcurate.rematch import RematchOptions, rematch_loss, rematch_plan, soft_target_loss


def _sim(n=6, m=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, 8, generator=g, dtype=torch.float64), dim=1)
    return x @ y.T


def test_plan_moves_the_mass_asked_and_respects_the_mask():
    sim = _sim()
    forbidden = torch.zeros(6, 7, dtype=torch.bool)
    forbidden[torch.arange(6), torch.arange(6)] = True
    plan = rematch_plan(sim, forbidden, mass=0.3, reg=0.01, tol=1e-9)
    assert float(plan.sum()) == pytest.approx(0.3, abs=1e-4)
    assert float(plan[forbidden].abs().max()) == 0.0
    assert (plan.sum(1) <= 1 / 6 + 1e-6).all() and (plan.sum(0) <= 1 / 7 + 1e-6).all()


def test_plan_approaches_pots_exact_partial_ot_and_the_reference_construction():
    """At small reg the entropic plan's cost nears the exact partial OT cost (POT's
    `partial_wasserstein`); the reference's dummy-row Sinkhorn solves the same problem."""
    sim = _sim(5, 5, seed=3)
    none = torch.zeros(5, 5, dtype=torch.bool)
    cost = (1 - sim).clamp_min(0)
    a = np.full(5, 0.2)
    exact = ot.partial.partial_wasserstein(a, a, cost.numpy(), m=0.4)
    ours = rematch_plan(sim, none, mass=0.4, reg=0.002, max_iter=5000, tol=1e-9).numpy()
    assert (ours * cost.numpy()).sum() == pytest.approx((exact * cost.numpy()).sum(), abs=5e-3)
    # L2RM models.py partial_ot: a dummy row and column of cost xi absorb 1 - s of the mass
    xi, big_a = 100 * float(cost.max()), float(cost.max())
    c_ = np.full((6, 6), xi)
    c_[:5, :5] = cost.numpy()
    c_[5, 5] = 2 * xi + big_a
    p_ = np.append(a, 1 - 0.4)
    ref = ot.sinkhorn(p_, p_, c_, 0.002, method="sinkhorn_log", numItermax=5000)[:5, :5]
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_soft_target_loss_is_the_references_symmetric_kl():
    sim = _sim(4, 4, seed=1)
    plan = rematch_plan(sim, torch.zeros(4, 4, dtype=torch.bool), mass=0.5, reg=0.05)
    got = soft_target_loss(sim, plan, 0.05)
    eps = 1e-10
    total = 0.0
    for s, lab in ((sim, plan), (sim.T, plan.T)):
        q = torch.softmax(s / 0.05, dim=1)
        p = lab.clamp_min(eps) / lab.clamp_min(eps).sum(1, keepdim=True)
        kl = lambda u, v: float((u * (u.log() - v.log())).sum() / len(u))  # noqa: E731
        total += 0.5 * (kl(p, q) + kl(q, p))
    assert float(got) == pytest.approx(total, rel=1e-6)
    assert float(soft_target_loss(torch.log(plan.clamp_min(1e-10)) * 0.05, plan, 0.05)) < float(got)


def test_rematch_loss_needs_two_flagged_rows_and_never_takes_the_own_caption():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    flagged = torch.zeros(8, dtype=torch.bool)
    flagged[3] = True
    assert rematch_loss(img, img, flagged, RematchOptions()) is None
    flagged[[1, 5]] = True
    # captions identical to the images: each flagged image's own caption is its best match,
    # but forbidden, so the loss cannot be near zero
    loss = rematch_loss(img, img.clone(), flagged, RematchOptions(pool="batch"))
    assert loss is not None and math.isfinite(float(loss)) and float(loss) > 0.1
    with pytest.raises(ValueError, match="mass must be in"):
        RematchOptions(mass=0.0)


def test_finetune_rematch_trains_and_uses_the_flags():
    from otcurate.data import builtin

    torch.manual_seed(0)
    clip = models.create("otcurate-tiny")
    recs = [builtin.shapes_record(2, i) for i in range(32)]
    x, tok = models.pairs_to_tensors([r.image for r in recs], [r.caption for r in recs], clip)
    noisy = np.zeros(32, dtype=bool)
    noisy[::4] = True
    kw = dict(steps=6, batch_size=16, lr=1e-3, warmup=0, weight_decay=0.0, seed=0)
    r = finetuning.finetune("rematch", clip.model, x, tok, None, noisy=noisy, **kw)
    assert len(r.losses) == 6 and all(math.isfinite(v) for v in r.losses)
    with pytest.raises(ValueError, match="needs the detect flags"):
        finetuning.finetune("rematch", clip.model, x, tok, None, noisy=None, **kw)
