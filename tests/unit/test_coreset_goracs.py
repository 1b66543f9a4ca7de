"""GORACS pieces against brute force / POT, and the method end to end on planted structure."""

import itertools

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from otcurate import coreset as cs


def unit(x):
    return F.normalize(torch.as_tensor(x, dtype=torch.float64), dim=1)


def test_grad_norms_match_autograd_per_sample():
    g = torch.Generator().manual_seed(0)
    img, txt = unit(torch.randn(12, 6, generator=g)), unit(torch.randn(12, 6, generator=g))
    scale = 7.0
    got = cs.contrastive_grad_norms(img, txt, scale, batch_size=12)
    want = []
    for i in range(12):
        a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        logits = scale * a @ b.T
        li = 0.5 * (
            F.cross_entropy(logits[i : i + 1], torch.tensor([i]))
            + F.cross_entropy(logits[:, i : i + 1].T, torch.tensor([i]))
        )
        ga, gb = torch.autograd.grad(li, (a, b))
        # the adapter's per-sample gradient is ∂ℓ_i/∂e_i ⊗ e_i, ‖e_i‖ = 1
        want.append(torch.sqrt(ga[i].square().sum() + gb[i].square().sum()))
    torch.testing.assert_close(got, torch.stack(want))


def test_grad_norms_are_larger_for_mismatched_pairs():
    g = torch.Generator().manual_seed(1)
    img = unit(torch.randn(64, 16, generator=g))
    txt = img.clone()
    txt[:8] = txt[torch.arange(8).roll(1)]  # 8 swapped captions
    norms = cs.contrastive_grad_norms(img, unit(txt), 20.0, batch_size=32, seed=0)
    assert norms[:8].min() > norms[8:].max()


def plain_greedy(cost, k):
    """Every gain recomputed every step; the first (lowest-index) best on ties."""
    best = np.ones(cost.shape[1])
    out = []
    for _ in range(k):
        gains = np.maximum(best - cost, 0.0).sum(1)
        gains[out] = -np.inf
        i = int(np.argmax(gains))
        out.append(i)
        best = np.minimum(best, cost[i])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_lazy_greedy_equals_plain_greedy(seed):
    rng = np.random.default_rng(seed)
    cost = rng.random((40, 15))
    if seed % 2:
        cost = np.round(cost, 1)  # many ties
    k = 10
    np.testing.assert_array_equal(cs.greedy_kmedian(cost, k), plain_greedy(cost, k))


def test_greedy_kmedian_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        cs.greedy_kmedian(np.zeros((3, 2)), 4)


def test_ot_objective_matches_pot_and_duals_are_feasible():
    rng = np.random.default_rng(0)
    c = rng.random((7, 11))
    obj, u, v = cs.ot_objective(c)
    assert obj == pytest.approx(ot.emd2(np.full(7, 1 / 7), np.full(11, 1 / 11), c), abs=1e-12)
    assert np.all(u[:, None] + v[None, :] <= c + 1e-9)
    assert u.mean() + v.mean() == pytest.approx(obj, abs=1e-9)  # strong duality


def objective(cost, rows):
    return cs.ot_objective(cost[np.asarray(rows)])[0]


@pytest.mark.parametrize("seed", range(3))
def test_swap_refinement_improves_to_a_local_optimum(seed):
    rng = np.random.default_rng(seed)
    cost = rng.random((25, 12))
    first = cs.greedy_kmedian(cost, 5)
    chosen, obj, swaps, evals = cs.swap_refine(cost, first, max_iters=100, cut_num=25)
    assert obj <= objective(cost, first) + 1e-12
    assert obj == pytest.approx(objective(cost, chosen), abs=1e-12)
    assert len(set(chosen.tolist())) == 5 and evals >= swaps
    # with nothing pruned, no single swap improves the result any more
    outside = sorted(set(range(25)) - set(chosen.tolist()))
    for pos, new in itertools.product(range(5), outside):
        trial = chosen.copy()
        trial[pos] = new
        assert objective(cost, trial) >= obj - 1e-12


def test_swap_refinement_respects_max_iters():
    rng = np.random.default_rng(3)
    cost = rng.random((30, 10))
    first = np.arange(6)  # a poor start, so there are swaps to make
    _, _, swaps, _ = cs.swap_refine(cost, first, max_iters=2, cut_num=30)
    assert swaps == 2


def test_swap_refinement_bounds_single_tries_and_reports_every_round():
    rng = np.random.default_rng(4)
    cost = rng.random((40, 12))
    first = cs.greedy_kmedian(cost, 6)
    full = cs.swap_refine(cost, first, max_iters=100, cut_num=40)
    rounds = []
    chosen, obj, swaps, evals = cs.swap_refine(
        cost, first, max_iters=100, cut_num=40, tries=3,
        on_round=lambda *r: rounds.append((r[0], r[1], r[2], r[3].copy())),
    )  # fmt: skip
    # each round: at most log2(cut_num) batch solves, then at most 3 single pairs
    assert rounds and evals <= len(rounds) * (int(np.log2(40)) + 3)
    assert evals < full[3]  # the last round alone tries every pruned pair without the bound
    assert [r[0] for r in rounds] == sorted(r[0] for r in rounds) and rounds[-1][0] == swaps
    assert [r[2] for r in rounds] == sorted((r[2] for r in rounds), reverse=True)
    assert rounds[-1][1] == evals and rounds[-1][2] == obj
    np.testing.assert_array_equal(rounds[-1][3], chosen)
    assert obj <= objective(cost, first) + 1e-12
    with pytest.raises(ValueError, match="tries"):
        cs.swap_refine(cost, first, max_iters=1, cut_num=5, tries=0)


def test_split_budget_is_proportional_and_capped():
    np.testing.assert_array_equal(
        cs.split_budget(10, np.array([1, 1, 2]), np.array([9, 9, 9])), [3, 2, 5]
    )
    out = cs.split_budget(10, np.array([1, 1, 8]), np.array([9, 9, 3]))
    assert out.sum() == 10 and out[2] == 3 and np.all(out <= [9, 9, 3])
    np.testing.assert_array_equal(cs.split_budget(4, np.array([0, 1]), np.array([5, 1])), [3, 1])
    with pytest.raises(ValueError, match="exceeds"):
        cs.split_budget(10, np.array([1, 1]), np.array([3, 3]))


def clustered_pool(n_per=40, centres=4, d=8, target_from=(0, 1), target_n=30, labels=True):
    """Train pairs in `centres` tight clusters; the target draws only from `target_from`."""
    g = torch.Generator().manual_seed(0)
    basis = unit(torch.randn(centres, d, generator=g))
    lab = np.repeat(np.arange(centres), n_per)
    img = unit(basis[lab] + 0.05 * torch.randn(len(lab), d, generator=g, dtype=torch.float64))
    txt = unit(basis[lab] + 0.05 * torch.randn(len(lab), d, generator=g, dtype=torch.float64))
    t_lab = np.resize(np.asarray(target_from), target_n)
    t_img = unit(basis[t_lab] + 0.05 * torch.randn(target_n, d, generator=g, dtype=torch.float64))
    t_txt = unit(basis[t_lab] + 0.05 * torch.randn(target_n, d, generator=g, dtype=torch.float64))
    return cs.Pool(
        np.arange(len(lab)),
        img,
        txt,
        np.linspace(1, 0, len(lab)),
        labels=lab if labels else None,
        target_image=t_img,
        target_text=t_txt,
        target_labels=t_lab if labels else None,
        logit_scale=10.0,
    )


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("labels", [True, False])
def test_goracs_selects_what_the_target_looks_like(grouped, labels):
    p = clustered_pool(labels=labels)
    sel = cs.select("goracs", p, 20, cs.GoracsOptions(grouped=grouped, groups=4), seed=0)
    lab = np.repeat(np.arange(4), 40)
    assert set(lab[sel.indices]) <= {0, 1}  # nothing from the clusters the target lacks
    assert abs(int((lab[sel.indices] == 0).sum()) - 10) <= (0 if grouped else 4)
    info = sel.info
    assert info["objective_refined"] <= info["objective_greedy"] + 1e-12
    assert sum(info["size_per_group"].values()) == 20
    again = cs.select("goracs", p, 20, cs.GoracsOptions(grouped=grouped, groups=4), seed=0)
    np.testing.assert_array_equal(sel.indices, again.indices)


def test_goracs_lambda_prefers_high_gradient_pairs():
    p = clustered_pool(target_from=(0, 1, 2, 3))
    grad = cs.contrastive_grad_norms(p.image, p.text, p.logit_scale, seed=0).numpy()
    lo = cs.select("goracs", p, 16, cs.GoracsOptions(lam=0.0), seed=0)
    hi = cs.select("goracs", p, 16, cs.GoracsOptions(lam=5.0), seed=0)
    assert grad[hi.indices].mean() > grad[lo.indices].mean()


def test_goracs_preclusters_large_pools_and_needs_a_target():
    p = clustered_pool()
    sel = cs.select("goracs", p, 10, cs.GoracsOptions(candidate_max=40), seed=0)
    assert abs(sel.info["candidates_after_preclustering"] - 40) <= 7 and len(sel.indices) == 10
    big = cs.select(
        "goracs", p, 10, cs.GoracsOptions(candidate_max=8), seed=0
    )  # budget above candidate_max
    assert abs(big.info["candidates_after_preclustering"] - 20) <= 4 and len(big.indices) == 10
    assert len(np.unique(big.indices)) == 10
    with pytest.raises(ValueError, match="needs a non-empty target"):
        cs.select("goracs", cs.Pool(p.candidates, p.image, p.text, p.scores), 10, seed=0)


def test_kcenter_covers_every_cluster():
    p = clustered_pool(centres=5)
    sel = cs.select("kcenter", p, 5, seed=0)
    lab = np.repeat(np.arange(5), 40)
    assert sorted(lab[sel.indices]) == [0, 1, 2, 3, 4]
    assert sel.info["radius"] < 0.5


def test_precluster_keeps_about_n_out_representatives_of_every_cluster():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 5)) * 10
    sizes = [400, 300, 100, 100, 60, 40]
    x = np.concatenate([c + rng.normal(size=(s, 5)) for c, s in zip(centres, sizes, strict=True)])
    keep = cs.precluster(x.astype(np.float32), 50, seed=0)
    assert np.all(np.diff(keep) > 0) and abs(len(keep) - 50) <= 8
    which = np.repeat(np.arange(6), sizes)[keep]
    assert set(which) == set(range(6))  # even the 40-point cluster is represented
    assert np.bincount(which)[0] > np.bincount(which)[5]  # roughly in proportion
    np.testing.assert_array_equal(keep, cs.precluster(x.astype(np.float32), 50, seed=0))
    np.testing.assert_array_equal(cs.precluster(x[:30], 50, seed=0), np.arange(30))
