"""Property tests of the OT layer (geomloss / ott style): marginals, symmetry, cost shifts,
known permutations, agreement with POT (exact and entropic), masks, zero weights, batches."""

import math
import warnings

import numpy as np
import ot as pot
import pytest
import torch

from otcurate.ot import (
    ConvergenceWarning,
    OTResult,
    cost_cosine,
    emd,
    normalize_cost,
    sinkhorn_log,
)

F = torch.nn.functional


pytestmark = pytest.mark.usefixtures("one_thread")


def problem(n=17, m=29, *, seed=0, dtype=torch.float64, zeros_a=(), zeros_b=()):
    """Random marginals (optionally with zero entries) and a normalised cosine cost."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(m, 8, generator=g, dtype=torch.float64), dim=1)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    a[list(zeros_a)] = 0.0
    b[list(zeros_b)] = 0.0
    M = normalize_cost(cost_cosine(x, y))
    return (a / a.sum()).to(dtype), (b / b.sum()).to(dtype), M.to(dtype)


def check_marginals(P, a, b, atol):
    torch.testing.assert_close(P.sum(-1), a, atol=atol, rtol=0)
    torch.testing.assert_close(P.sum(-2), b, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "n, m, dtype, reg, atol",
    [
        (17, 29, torch.float64, 0.05, 1e-9),
        (29, 17, torch.float64, 0.02, 1e-9),
        (17, 29, torch.float32, 0.05, 1e-6),
        (1, 7, torch.float64, 0.05, 1e-12),  # a single source: the plan is b itself
    ],
)
def test_plan_marginals_equal_a_and_b(n, m, dtype, reg, atol):
    a, b, M = problem(n, m, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    r = sinkhorn_log(a, b, M, reg, max_iter=5000, tol=tol)
    assert isinstance(r, OTResult) and r.plan.shape == (n, m) and r.plan.dtype == dtype
    check_marginals(r.plan, a, b, atol)
    assert (r.plan >= 0).all()
    assert float(r.err) < tol * 2
    torch.testing.assert_close(r.cost, (r.plan * M).sum())


def test_swapping_source_and_target_transposes_the_plan():
    a, b, M = problem()
    fwd = sinkhorn_log(a, b, M, 0.03, max_iter=5000, tol=1e-12)
    bwd = sinkhorn_log(b, a, M.T, 0.03, max_iter=5000, tol=1e-12)
    torch.testing.assert_close(bwd.plan.T, fwd.plan, atol=1e-10, rtol=0)
    torch.testing.assert_close(bwd.cost, fwd.cost, atol=1e-10, rtol=0)


@pytest.mark.parametrize("shift", [0.5, -3.0, 10.0])
def test_constant_added_to_the_cost_shifts_the_cost_and_keeps_the_plan(shift):
    a, b, M = problem()
    r = sinkhorn_log(a, b, M, 0.02, max_iter=5000, tol=1e-12)
    s = sinkhorn_log(a, b, M + shift, 0.02, max_iter=5000, tol=1e-12)
    torch.testing.assert_close(s.plan, r.plan, atol=1e-10, rtol=0)
    torch.testing.assert_close(s.cost, r.cost + shift, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cost_built_around_a_permutation_returns_it(dtype):
    n = 23
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(n, generator=g)
    M = 0.3 + 0.7 * torch.rand(n, n, generator=g, dtype=torch.float64)
    M[torch.arange(n), perm] = 0.0  # the permutation is the only zero-cost matching
    r = sinkhorn_log(None, None, M.to(dtype), 0.01, max_iter=1000, tol=1e-6)
    torch.testing.assert_close(r.plan.argmax(1), perm)
    torch.testing.assert_close(r.plan * n, torch.eye(n, dtype=dtype)[perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(emd(None, None, M).plan * n, torch.eye(n, dtype=M.dtype)[perm])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_reg_approaches_the_exact_plan_and_stays_finite(dtype):
    # reg = 1e-3 on a cost in [0, 1]: exp(-M / reg) underflows outside the log domain.
    a, b, M = problem(12, 15, seed=1, dtype=dtype)
    exact = emd(a.double(), b.double(), M.double())
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    r = sinkhorn_log(a, b, M, 1e-3, max_iter=20000, tol=tol)
    assert torch.isfinite(r.plan).all() and torch.isfinite(r.cost)
    # Entropic bias: 0 <= <P_reg, M> - OT <= reg * (H(a) + H(b)) <= reg * log(n m).
    gap = float(r.cost) - float(exact.cost)
    assert -1e-5 <= gap <= 1e-3 * np.log(12 * 15)
    torch.testing.assert_close(r.plan.double(), exact.plan, atol=5e-3, rtol=0)


def test_masked_cells_carry_no_mass_and_marginals_hold():
    n = 17
    g = torch.Generator().manual_seed(4)
    a, b, M = problem(n, n, seed=4)
    mask = torch.rand(n, n, generator=g) < 0.4
    keep = torch.randperm(n, generator=g)
    mask[torch.arange(n), keep] = False  # a permutation stays allowed, so it is feasible
    r = sinkhorn_log(None, None, M, 0.05, mask=mask, max_iter=5000, tol=1e-10)
    assert float(r.plan[mask].max()) < 1e-300  # exp(-1e6) underflows to exactly 0
    check_marginals(
        r.plan, torch.full((n,), 1 / n, dtype=M.dtype), torch.full((n,), 1 / n, dtype=M.dtype), 1e-9
    )


def test_ncu_shaped_mask_routes_noisy_rows_to_the_extra_column():
    # NCU phase B: B x (B+1), the extra column forbidden for clean rows, noisy rows may not
    # keep their own caption; marginals 1/B and 1/(B+1).
    B, noisy = 9, torch.tensor([2, 5])
    _, _, M = problem(B, B + 1, seed=5)
    mask = torch.zeros(B, B + 1, dtype=torch.bool)
    mask[:, B] = True
    mask[noisy, B] = False
    mask[noisy, noisy] = True
    a = torch.full((B,), 1 / B, dtype=M.dtype)
    b = torch.full((B + 1,), 1 / (B + 1), dtype=M.dtype)
    r = sinkhorn_log(a, b, M, 0.03, mask=mask, max_iter=5000, tol=1e-10)
    assert float(r.plan[mask].max()) < 1e-300
    check_marginals(r.plan, a, b, 1e-9)
    torch.testing.assert_close(r.plan[noisy, B].sum(), b[B], atol=1e-9, rtol=0)


def test_zero_weights_get_no_mass_and_match_the_reduced_problem():
    za, zb = (0, 8, 16), (3, 4, 28)
    a, b, M = problem(17, 29, zeros_a=za, zeros_b=zb)
    r = sinkhorn_log(a, b, M, 0.05, max_iter=5000, tol=1e-11)
    assert float(r.plan[list(za)].abs().max()) == 0.0
    assert float(r.plan[:, list(zb)].abs().max()) == 0.0
    rows = [i for i in range(17) if i not in za]
    cols = [j for j in range(29) if j not in zb]
    reduced = sinkhorn_log(a[rows], b[cols], M[rows][:, cols], 0.05, max_iter=5000, tol=1e-11)
    torch.testing.assert_close(r.plan[rows][:, cols], reduced.plan, atol=1e-11, rtol=0)
    check_marginals(r.plan, a, b, 1e-10)


def test_zero_weights_keep_gradients_finite():
    a, b, M = problem(7, 9, zeros_a=(2,), zeros_b=(0,))
    a.requires_grad_(True)
    M.requires_grad_(True)
    sinkhorn_log(a, b, M, 0.05, max_iter=300, tol=1e-10).cost.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(M.grad).all()


@pytest.mark.parametrize("reg", [0.1, 0.02])
def test_agrees_with_pot_sinkhorn_log_in_numpy_and_torch(reg):
    a, b, M = problem(17, 29, seed=6)
    ref = pot.sinkhorn(
        a.numpy(), b.numpy(), M.numpy(), reg, method="sinkhorn_log", numItermax=10000, stopThr=1e-13
    )
    ours_t = sinkhorn_log(a, b, M, reg, max_iter=10000, tol=1e-11)
    ours_np = sinkhorn_log(a.numpy(), b.numpy(), M.numpy(), reg, max_iter=10000, tol=1e-11)
    assert isinstance(ours_np.plan, np.ndarray) and isinstance(ours_t.plan, torch.Tensor)
    np.testing.assert_allclose(ours_t.plan.numpy(), ref, atol=1e-10, rtol=0)
    np.testing.assert_allclose(ours_np.plan, ref, atol=1e-10, rtol=0)
    assert ours_np.n_iter == ours_t.n_iter


@pytest.mark.parametrize(
    "dtype, reg, tol, atol",
    [
        (torch.float64, 0.1, 1e-11, 1e-12),
        (torch.float64, 0.02, 1e-11, 1e-12),
        (torch.float64, 3e-3, 1e-9, 1e-10),  # scalings far beyond e^ABSORB: absorbed
        (torch.float32, 0.02, 1e-5, 2e-6),
    ],
)
def test_scaling_iterations_agree_with_the_log_domain(dtype, reg, tol, atol):
    items = [problem(17, 29, seed=s) for s in range(3)]
    a, b, M = (torch.stack(x).to(dtype) for x in zip(*items, strict=True))
    auto = sinkhorn_log(a, b, M, reg, max_iter=20000, tol=tol)
    log = sinkhorn_log(a, b, M, reg, max_iter=20000, tol=tol, domain="log")
    torch.testing.assert_close(auto.plan, log.plan, atol=atol, rtol=0)
    assert float(auto.err.max()) < tol and float(log.err.max()) < tol
    # The potentials are the solution's, so they warm-start the log domain at its fixed point.
    warm = sinkhorn_log(a, b, M, reg, max_iter=20000, tol=tol, domain="log",
                        warmstart=(auto.log_u, auto.log_v))  # fmt: skip
    assert warm.n_iter <= 1


def test_scaling_iterations_agree_with_pot_stabilized_sinkhorn():
    a, b, M = problem(17, 29, seed=6)
    ref = pot.sinkhorn(a, b, M, 0.02, method="sinkhorn_stabilized", numItermax=10000, stopThr=1e-13)
    ours = sinkhorn_log(a, b, M, 0.02, max_iter=10000, tol=1e-11)
    torch.testing.assert_close(ours.plan, ref, atol=1e-10, rtol=0)


def test_scaling_overflow_falls_back_to_the_log_domain(monkeypatch):
    """Never absorbing, float32 scalings overflow on a hard problem; the solve carries on in
    the log domain from the last finite potentials and reaches the log domain's plan."""
    import otcurate.ot as otl

    a, b, M = problem(17, 29, seed=0, dtype=torch.float32)
    M = M * 30.0  # cost up to 30 at reg 0.05: the log-kernel spans 600, float32's exp 88
    ref = sinkhorn_log(a, b, M, 0.05, max_iter=5000, tol=2e-5, domain="log")
    starts = []
    log_iterations = otl._log_iterations

    def spy(nx, log_k, log_a, log_b, b, f, g, start, *rest):
        starts.append(start)
        return log_iterations(nx, log_k, log_a, log_b, b, f, g, start, *rest)

    monkeypatch.setattr(otl, "ABSORB", float("inf"))
    monkeypatch.setattr(otl, "_log_iterations", spy)
    r = sinkhorn_log(a, b, M, 0.05, max_iter=5000, tol=2e-5)
    assert any(s > 1 for s in starts), starts  # the log domain took over mid-solve
    assert torch.isfinite(r.plan).all() and float(r.err) < 4e-5
    torch.testing.assert_close(r.plan, ref.plan, atol=1e-5, rtol=0)


# cells a slice: 3 problems (the last slice 2), 1 problem, 1 problem
@pytest.mark.parametrize("cells", [3 * 17 * 29, 17 * 29, 1])
def test_the_log_domain_in_slices_of_the_batch_gives_the_same_bits(monkeypatch, cells):
    """A batch's log-sum-exps taken in slices of whole problems (see `_lse`) give the plan,
    potentials, iterations and gradient of the batch taken whole, bit for bit; in torch with a
    2-d batch, masks and marginals of their own, and in numpy."""
    import otcurate.ot as otl

    probs = [problem(17, 29, seed=s) for s in range(8)]
    a = torch.stack([p[0] for p in probs]).reshape(2, 4, 17)
    b = torch.stack([p[1] for p in probs]).reshape(2, 4, 29)
    M = torch.stack([p[2] for p in probs]).reshape(2, 4, 17, 29)
    mask = torch.zeros(2, 4, 17, 29, dtype=torch.bool)
    mask[0, 1, 3, :5] = True

    def solve(cells):
        monkeypatch.setattr(otl, "LSE_CELLS", cells)
        Mg = M.clone().requires_grad_(True)
        r = sinkhorn_log(a, b, Mg, 0.05, mask=mask, max_iter=40, tol=0.0, domain="log")
        r.cost.sum().backward()
        return r, Mg.grad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole, grad_whole = solve(10**9)
        sliced, grad_sliced = solve(cells)
        npw = sinkhorn_log(
            a.numpy(), b.numpy(), M.numpy(), 0.05, max_iter=40, tol=0.0, domain="log"
        )
        monkeypatch.setattr(otl, "LSE_CELLS", 10**9)
        npw_whole = sinkhorn_log(
            a.numpy(), b.numpy(), M.numpy(), 0.05, max_iter=40, tol=0.0, domain="log"
        )
    assert whole.n_iter == sliced.n_iter == 40
    for x, y in [(whole.plan, sliced.plan), (whole.log_u, sliced.log_u), (grad_whole, grad_sliced)]:
        assert torch.equal(x, y)
    assert np.array_equal(npw.plan, npw_whole.plan) and npw.plan.shape == (2, 4, 17, 29)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_log_domain_in_place_gives_the_bits_of_torch_logsumexp(monkeypatch, dtype):
    """Outside autograd the log domain sums in place in one buffer (see `_lse`): the same
    plan and potentials, bit for bit, as torch.logsumexp each iteration; with zero weights
    (-inf potentials), a mask, a batch, one cost shared by a batch of marginals, a
    transposed cost, and float64 marginals on a cost of the parametrised dtype."""
    import otcurate.ot as otl

    a, b, M = problem(17, 29, seed=1, dtype=dtype, zeros_a=(2, 5), zeros_b=(0,))
    mask = torch.zeros(17, 29, dtype=torch.bool)
    mask[3, :4] = True
    probs = [problem(17, 29, seed=s, dtype=dtype) for s in range(3)]
    A, B, Ms = (torch.stack(x) for x in zip(*probs, strict=True))
    at, bt, Mt = problem(29, 17, seed=2, dtype=dtype)
    cases = [
        (a, b, M, mask),
        (A, B, Ms, None),
        (torch.stack([a, a.flip(0)]), b, M, None),  # f and g outgrow log_k's batch
        (bt, at, Mt.T, None),  # strided: the buffer keeps the sum's own strides
        (a.double(), b.double(), M, None),  # the potentials become float64 after one update
    ]
    real_workspace = otl._workspace
    monkeypatch.setattr(otl, "INPLACE_CELLS", 1)  # these problems are small
    used = []

    def spy(*x):
        used.append(real_workspace(*x))
        return used[-1]

    for a_, b_, M_, mask_ in cases:
        kw = dict(mask=mask_, max_iter=60, tol=0.0, domain="log")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            monkeypatch.setattr(otl, "_workspace", spy)
            inplace = sinkhorn_log(a_, b_, M_, 0.05, **kw)
            monkeypatch.setattr(otl, "_workspace", lambda *x: None)
            plain = sinkhorn_log(a_, b_, M_, 0.05, **kw)
        assert inplace.plan.dtype == plain.plan.dtype
        assert torch.equal(inplace.plan, plain.plan) and torch.equal(inplace.log_u, plain.log_u)
        assert torch.isfinite(inplace.plan).all()
    assert len(used) == len(cases) and all(isinstance(w, dict) and len(w) >= 1 for w in used)
    assert real_workspace(M.requires_grad_(True)) is None  # autograd keeps the plain path
    assert real_workspace(M.detach().numpy()) is None
    monkeypatch.setattr(otl, "INPLACE_CELLS", 17 * 29 + 1)
    assert real_workspace(M.detach()) is None  # too small to gain
    assert isinstance(real_workspace(M.detach(), torch.zeros(2, 17)), dict)  # 2 x 17 x 29 cells


def test_the_in_place_log_sum_exp_of_an_all_minus_inf_column_is_minus_inf():
    """As torch.logsumexp: a column with no finite entry gives -inf, not NaN (inf - inf)."""
    import otcurate.ot as otl

    log_k = torch.randn(5, 7, dtype=torch.float64)
    log_k[:, 3] = -math.inf
    h = torch.randn(5, dtype=torch.float64)
    nx = otl.get_backend(log_k)
    got = otl._lse(nx, log_k, h, -2, {})
    torch.testing.assert_close(got, torch.logsumexp(log_k + h[:, None], dim=-2), rtol=0, atol=0)
    assert got[3] == -math.inf


@pytest.mark.parametrize("tensor", [torch.as_tensor, np.asarray])
def test_one_problem_and_a_batch_of_one_give_the_same_plan(monkeypatch, tensor):
    """The scaling iterations take matrix-vector products for one problem and row-vector
    products for a batch: the two agree, in torch and numpy, through absorptions."""
    import otcurate.ot as otl

    monkeypatch.setattr(otl, "ABSORB", 1.0)  # |log scaling| reaches 16 here: absorbed often
    a, b, M = (tensor(x) for x in problem(40, 60, seed=3))
    one = sinkhorn_log(a, b, M, 0.01, max_iter=2000, tol=1e-10)
    batch = sinkhorn_log(a[None], b[None], M[None], 0.01, max_iter=2000, tol=1e-10)
    assert one.plan.shape == (40, 60) and batch.plan.shape == (1, 40, 60)
    assert one.n_iter == batch.n_iter and float(one.err) < 1e-10
    np.testing.assert_allclose(np.asarray(one.plan), np.asarray(batch.plan[0]), atol=1e-13, rtol=0)


def test_the_log_domain_spreads_a_shared_cost_over_batched_marginals():
    """One cost, a batch of marginals: the potentials take the marginals' batch (no slices)."""
    a, b, M = problem(17, 29, seed=0)
    a2 = torch.stack([a, a.flip(0)])
    r = sinkhorn_log(a2, b, M, 0.05, max_iter=500, tol=1e-9, domain="log")
    assert r.plan.shape == (2, 17, 29)
    ref = sinkhorn_log(a.flip(0), b, M, 0.05, max_iter=500, tol=1e-9, domain="log")
    torch.testing.assert_close(r.plan[1], ref.plan, atol=1e-9, rtol=0)


def test_zero_weights_and_domain_log_take_the_log_domain(monkeypatch):
    import otcurate.ot as otl

    called = []
    monkeypatch.setattr(otl, "_scaling_iterations", lambda *x: called.append(1) or 1 / 0)
    a, b, M = problem(7, 9, zeros_a=(2,))
    sinkhorn_log(a, b, M, 0.05, max_iter=300, tol=1e-9)
    a, b, M = problem(7, 9)
    sinkhorn_log(a, b, M, 0.05, max_iter=300, tol=1e-9, domain="log")
    assert not called
    with pytest.raises(ValueError, match="domain must be"):
        sinkhorn_log(a, b, M, 0.05, domain="kernel")


@pytest.mark.parametrize(
    "dtype, tol, atol", [(torch.float64, 1e-11, 1e-12), (torch.float32, 1e-5, 2e-6)]
)
def test_masked_scaling_iterations_agree_with_the_log_domain(dtype, tol, atol):
    """NCU's shape: an extra column only the flagged rows may reach, their own cell forbidden."""
    a, b, M = problem(12, 13, seed=4, dtype=dtype)
    mask = torch.zeros(12, 13, dtype=torch.bool)
    mask[:, -1] = True
    for i in (1, 5, 8):
        mask[i, i], mask[i, -1] = True, False
    auto = sinkhorn_log(a, b, M, 0.03, mask=mask, max_iter=5000, tol=tol)
    log = sinkhorn_log(a, b, M, 0.03, mask=mask, max_iter=5000, tol=tol, domain="log")
    torch.testing.assert_close(auto.plan, log.plan, atol=atol, rtol=0)
    assert float(auto.plan[mask].abs().max()) == 0.0


def test_an_infeasible_float32_mask_warns_in_both_domains():
    """A fully forbidden column drives the potentials to ~1e6, where float32 rounds the plan
    rebuilt from them: the scaling iterations' own test passes, the returned plan's fails, so
    the solve goes on in the log domain and warns as the log domain does."""
    a, b, M = problem(6, 7, dtype=torch.float32)
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[:, 3] = True
    for domain in ("auto", "log"):
        with pytest.warns(ConvergenceWarning, match="did not converge"):
            r = sinkhorn_log(a, b, M, 0.05, mask=mask, max_iter=300, tol=1e-5, domain=domain)
        assert r.n_iter == 300 and float(r.err) > 1e-5


def test_batched_result_equals_per_item_results():
    items = [problem(17, 29, seed=s) for s in range(3)]
    a, b, M = (torch.stack(x) for x in zip(*items, strict=True))
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(3, 17, 29, generator=g) < 0.2
    batched = sinkhorn_log(a, b, M, 0.03, mask=mask, max_iter=5000, tol=1e-10)
    assert batched.plan.shape == (3, 17, 29) and batched.cost.shape == (3,)
    assert batched.err.shape == (3,)
    for k in range(3):
        one = sinkhorn_log(a[k], b[k], M[k], 0.03, mask=mask[k], max_iter=5000, tol=1e-10)
        torch.testing.assert_close(batched.plan[k], one.plan, atol=1e-10, rtol=0)
        torch.testing.assert_close(batched.cost[k], one.cost, atol=1e-10, rtol=0)


def test_shared_marginals_broadcast_over_the_batch():
    a, b, _ = problem(17, 29)
    M = torch.stack([problem(17, 29, seed=s)[2] for s in range(4)]).reshape(2, 2, 17, 29)
    r = sinkhorn_log(a, b, M, 0.05, max_iter=5000, tol=1e-10)
    assert r.plan.shape == (2, 2, 17, 29) and r.cost.shape == (2, 2)
    check_marginals(r.plan, a.expand(2, 2, 17), b.expand(2, 2, 29), 1e-9)
    uniform = sinkhorn_log(None, None, M, 0.05, max_iter=5000, tol=1e-10)
    check_marginals(
        uniform.plan,
        torch.full((2, 2, 17), 1 / 17, dtype=M.dtype),
        torch.full((2, 2, 29), 1 / 29, dtype=M.dtype),
        1e-9,
    )


def test_float32_agrees_with_float64():
    a, b, M = problem(17, 29, seed=8)
    r64 = sinkhorn_log(a, b, M, 0.02, max_iter=5000, tol=1e-9)
    r32 = sinkhorn_log(a.float(), b.float(), M.float(), 0.02, max_iter=5000, tol=1e-5)
    torch.testing.assert_close(r32.plan.double(), r64.plan, atol=2e-5, rtol=0)
    torch.testing.assert_close(r32.cost.double(), r64.cost, atol=1e-5, rtol=0)


def test_warns_when_it_does_not_converge_and_not_when_it_does():
    a, b, M = problem()
    with pytest.warns(ConvergenceWarning, match="did not converge in 3 iterations"):
        r = sinkhorn_log(a, b, M, 0.005, max_iter=3, tol=1e-9)
    assert r.n_iter == 3 and float(r.err) > 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = sinkhorn_log(a, b, M, 0.1, max_iter=1000, tol=1e-9)
    assert 0 < ok.n_iter < 1000 and float(ok.err) < 1e-9


def test_gradient_of_the_unrolled_solver_is_exact():
    a, b, M = problem(3, 4, seed=9)
    M.requires_grad_(True)

    def cost(M):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # tol 0: fixed iteration count
            return sinkhorn_log(a, b, M, 0.1, max_iter=50, tol=0.0).cost

    assert torch.autograd.gradcheck(cost, (M,))


def test_invalid_arguments_are_errors():
    a, b, M = problem(5, 6)
    with pytest.raises(ValueError, match="reg must be > 0"):
        sinkhorn_log(a, b, M, 0.0)
    with pytest.raises(ValueError, match="marginals must match"):
        sinkhorn_log(b, a, M, 0.1)


def test_cost_cosine_and_normalize_cost_are_batched():
    g = torch.Generator().manual_seed(10)
    x = F.normalize(torch.randn(2, 5, 4, generator=g), dim=-1)
    y = F.normalize(torch.randn(2, 7, 4, generator=g), dim=-1)
    M = cost_cosine(x, y)
    assert M.shape == (2, 5, 7)
    torch.testing.assert_close(M[1], 1 - x[1] @ y[1].T)
    torch.testing.assert_close(
        cost_cosine(x[0], x[0]).diagonal(), torch.zeros(5), atol=1e-6, rtol=0
    )
    N = normalize_cost(M)
    torch.testing.assert_close(N.amax(dim=(-2, -1)), torch.ones(2))
    torch.testing.assert_close(N * M.amax(dim=(-2, -1), keepdim=True), M)
    zero = torch.zeros(3, 3)
    torch.testing.assert_close(normalize_cost(zero), zero)
    np.testing.assert_allclose(normalize_cost(M.numpy()), N.numpy(), rtol=1e-6)


def test_emd_wraps_pot_for_numpy_and_torch():
    a, b, M = problem(17, 29, zeros_a=(1,), zeros_b=(2,))
    r = emd(a, b, M)
    ref = pot.emd(a.numpy(), b.numpy(), M.numpy())
    np.testing.assert_allclose(r.plan.numpy(), ref, atol=1e-12)
    assert r.n_iter is None and float(r.err) < 1e-12
    torch.testing.assert_close(
        r.cost, torch.as_tensor(pot.emd2(a.numpy(), b.numpy(), M.numpy()), dtype=M.dtype)
    )
    rn = emd(a.numpy(), b.numpy(), M.numpy())
    np.testing.assert_allclose(rn.plan, ref, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stays_on_the_callers_device():
    a, b, M = (t.cuda() for t in problem(17, 29))
    r = sinkhorn_log(a, b, M, 0.05, mask=M > 0.9, max_iter=2000, tol=1e-9)
    assert r.plan.device == M.device and r.cost.device == M.device
    cpu = sinkhorn_log(a.cpu(), b.cpu(), M.cpu(), 0.05, mask=M.cpu() > 0.9, max_iter=2000, tol=1e-9)
    torch.testing.assert_close(r.plan.cpu(), cpu.plan, atol=1e-10, rtol=0)
