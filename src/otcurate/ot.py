"""Optimal transport layer: log-domain Sinkhorn with masks and batches, costs, exact OT.

POT's vocabulary throughout: marginals ``a`` (n,) and ``b`` (m,), cost ``M`` (n, m),
entropic strength ``reg``, ``max_iter``, ``tol``. Every function takes numpy arrays or
torch tensors (one code path through POT's backend, ``nx = get_backend(...)``), stays
on the caller's device and keeps autograd: wrap a call in ``torch.no_grad()`` when the
plan is only a target.

POT's ``ot.sinkhorn(..., method="sinkhorn_log")`` has neither masks (forbidden cells)
nor a batch dimension, and its batched solvers (``ot.batch``, 0.9.6) have no masks and
stop on another criterion; NCU's unlearning step needs masks and the minibatch detectors
batches, hence :func:`sinkhorn_log`. It agrees with POT's ``sinkhorn_log`` and
``sinkhorn_stabilized`` on unmasked, unbatched problems (tests/unit/test_ot.py).

POT is imported on first use, not with this module: ``import ot`` takes about 2.4 s here
(it loads scikit-learn), which a stage that imports the library but runs no OT (finetune's
``clip`` and ``filter``) should not pay.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

# Added to the log-kernel of a forbidden cell: exp(-1e6) is exactly 0 in float32 and
# float64, and -1e6 stays finite, so a forbidden row or column never yields -inf - -inf.
MASK_LOGIT = -1e6
CHECK_EVERY = 10  # sinkhorn_log tests convergence every 10th iteration after the first 10
# sinkhorn_log's scaling iterations absorb a scaling into the log-potentials once its log
# exceeds this: e^20 ~ 5e8 leaves float32 ample room for the sums over a row or column.
ABSORB = 20.0
# The log domain's log-sum-exps (see `_lse`): in torch outside autograd, from this many
# cells up (2 MB in float64, B = 512), in place in one buffer kept for the solve; below it,
# the eight in-place calls' Python overhead cost more than they saved (B = 256: 1.25x POT).
INPLACE_CELLS = 1 << 18
# Otherwise, on the CPU, over slices of a batch of about this many cells (1 MB in float64).
LSE_CELLS = 1 << 17

Array = Any  # numpy.ndarray or torch.Tensor; POT's backend dispatches on the type


def get_backend(*args: Array):
    """POT's backend for ``args`` (``ot.backend.get_backend``), importing POT on first use."""
    from ot.backend import get_backend as pot_backend

    return pot_backend(*args)


class ConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` with the marginal error still above ``tol``."""


@dataclass(frozen=True)
class OTResult:
    """An OT solution; the leading ``...`` are the batch dimensions of the problem.

    plan : (..., n, m) transport plan P
    cost : (...,) transport cost <P, M> = sum_ij P_ij M_ij (without the entropy term)
    n_iter : Sinkhorn iterations run (one iteration = one column and one row update);
        None for an exact solver
    err : (...,) L1 marginal error |P 1 - a|_1 + |P^T 1 - b|_1
    log_u, log_v : (..., n), (..., m) Sinkhorn log-scalings, P = exp(log_u_i - M_ij/reg + log_v_j)
        (POT's names; the dual potentials are reg * log_u, reg * log_v); pass them back as
        ``warmstart`` to re-solve a nearby problem. None for an exact solver.
    """

    plan: Array
    cost: Array
    n_iter: int | None
    err: Array
    log_u: Array | None = None
    log_v: Array | None = None


def _log_weights(nx, w):
    """log(w) with log(0) = -inf and no NaN gradient at the zeros."""
    positive = w > 0
    return nx.where(positive, nx.log(nx.where(positive, w, 1.0)), -math.inf)


def _all_positive(nx, w) -> bool:
    return float(nx.min(nx.detach(w))) > 0


def _amax2(nx, M):
    """Max over the last two axes, kept as (..., 1, 1)."""
    return nx.max(nx.max(M, axis=-1, keepdims=True), axis=-2, keepdims=True)


def _marginal_error(nx, P, a, b):
    return nx.sum(nx.abs(nx.sum(P, axis=-1) - a), axis=-1) + nx.sum(
        nx.abs(nx.sum(P, axis=-2) - b), axis=-1
    )


def _uniform(nx, w, shape, like):
    return nx.full(shape, 1.0 / shape[-1], type_as=like) if w is None else w


def _converged(nx, col_sum, b, tol) -> bool:
    """Whether every problem's L1 column-marginal error is below ``tol`` (a host sync)."""
    return float(nx.max(nx.detach(nx.sum(nx.abs(col_sum - b), axis=-1)))) < tol


def _checks(it: int) -> bool:
    return 0 < it and (it < CHECK_EVERY or it % CHECK_EVERY == 0)


def _on_cpu(x) -> bool:
    device = getattr(x, "device", "cpu")  # numpy arrays: "cpu" (numpy >= 2) or none
    return str(getattr(device, "type", device)) == "cpu"


def _workspace(log_k, *vectors) -> dict | None:
    """Buffers for `_lse` to reuse (a dict), when ``log_k`` and the (..., n) or (..., m)
    ``vectors`` are torch tensors outside autograd (in-place updates would break a backward
    pass) and the solve spans at least ``INPLACE_CELLS`` cells (its batch, broadcast over
    all of them, times n x m); else None."""
    torch = sys.modules.get("torch")
    if torch is None or not all(isinstance(x, torch.Tensor) for x in (log_k, *vectors)):
        return None
    batch = torch.broadcast_shapes(log_k.shape[:-2], *(x.shape[:-1] for x in vectors))
    if math.prod(batch) * log_k.shape[-2] * log_k.shape[-1] < INPLACE_CELLS:
        return None
    if torch.is_grad_enabled() and any(x.requires_grad for x in (log_k, *vectors)):
        return None
    return {}


def _lse(nx, log_k, h, axis: int, work: dict | None = None):
    """``LSE`` over ``axis`` of ``log_k + h``, with ``h`` spread along that axis: ``axis=-2``
    takes ``h`` (..., n) and gives (..., m); ``axis=-1`` takes ``h`` (..., m) and gives (..., n).

    Why not ``nx.logsumexp(log_k + h)`` each iteration: its (..., n, m) temporaries are
    freed and taken again, and from about a megabyte up glibc hands the freed pages back to
    the OS, by its allocator's history, so that each new temporary faults them in afresh
    (16 problems of 256 x 256 in float64: 0.8M page faults a solve and 4x the time of a
    process whose allocator had settled; one 1024 x 1024 problem read 0.62 to 1.94 s).
    So, with a ``work`` dict (`_workspace`: torch, no autograd, ``INPLACE_CELLS`` or more),
    the sum is taken in place in one buffer kept for the whole solve, the same operations as
    ``torch.logsumexp`` (the same bits). Otherwise, on the CPU a batch larger than
    ``LSE_CELLS`` cells is taken in slices of whole problems, which stay on the heap and in
    the cache (the same bits too: each problem's sums are its own).
    """
    spread = (lambda x: x[..., :, None]) if axis == -2 else (lambda x: x[..., None, :])
    if work is not None:
        import torch

        x = spread(h)
        key = (torch.broadcast_shapes(log_k.shape, x.shape), torch.result_type(log_k, x))
        buf = work.get(key)
        if buf is None:  # the sum's own dtype and strides (a transposed cost keeps its own)
            buf = work[key] = log_k + x
        else:
            torch.add(log_k, x, out=buf)
        top = buf.amax(dim=axis, keepdim=True)
        top.masked_fill_(top.abs() == math.inf, 0)  # as torch.logsumexp: no inf - inf
        return buf.sub_(top).exp_().sum(dim=axis).log_().add_(top.squeeze(axis))
    batch = tuple(log_k.shape[:-2])
    count, cells = math.prod(batch), log_k.shape[-2] * log_k.shape[-1]
    if count < 2 or count * cells <= LSE_CELLS or tuple(h.shape[:-1]) != batch or not _on_cpu(h):
        return nx.logsumexp(log_k + spread(h), axis=axis)
    step = max(1, LSE_CELLS // cells)
    k, hh = log_k.reshape(count, *log_k.shape[-2:]), h.reshape(count, h.shape[-1])
    parts = [
        nx.logsumexp(k[i : i + step] + spread(hh[i : i + step]), axis=axis)
        for i in range(0, count, step)
    ]
    return nx.concatenate(parts, axis=0).reshape(*batch, -1)


def _log_iterations(nx, log_k, log_a, log_b, b, f, g, start, max_iter, tol):
    """Log-domain Sinkhorn iterations ``start..max_iter``: (f, g, n_iter, converged)."""
    n_iter = start
    work = _workspace(log_k, log_a, log_b, f, g)
    for it in range(start, max_iter):
        lse_col = _lse(nx, log_k, f, -2, work)  # (..., m)
        # Rows are exact after the row update, so only the columns can be off.
        if _checks(it) and _converged(nx, nx.exp(lse_col + g), b, tol):
            return f, g, n_iter, True
        g = log_b - lse_col
        f = log_a - _lse(nx, log_k, g, -1, work)
        n_iter = it + 1
    return f, g, n_iter, False


def _magnitude(nx, log_u, log_v) -> float:
    """The largest |log scaling|; inf when a scaling overflowed, vanished or is NaN (a sync)."""
    values = [float(nx.max(nx.abs(nx.detach(x)))) for x in (log_u, log_v)]
    return max(values) if all(math.isfinite(x) for x in values) else math.inf


def _scaling_iterations(nx, log_k, a, b, log_a, log_b, f, g, max_iter, tol):
    """Sinkhorn on the kernel with absorption, the same iterations as `_log_iterations`.

    The log-scalings are split as ``f + log u`` and ``g + log v``, with the stabilised kernel
    ``K = exp(log_k + f_i + g_j)`` (Schmitzer 2019; POT's ``sinkhorn_stabilized``): each
    update is then a vector-matrix product instead of a log-sum-exp, 3-10x faster on the
    CPU (``bench/speed.py``). At each convergence test, scalings beyond ``ABSORB`` (in log)
    are absorbed into ``f, g`` and ``K`` recomputed, so nothing overflows. The first
    iteration runs in the log domain, so that every row and column of ``K`` carries mass.
    Should a scaling still come out non-finite or zero, it returns the last tested ``f, g``
    unconverged and `sinkhorn_log` goes on in the log domain from there.

    Returns (f, g, n_iter, converged).
    """
    if max_iter < 1:
        return f, g, 0, False
    f, g, n_iter, _ = _log_iterations(nx, log_k, log_a, log_b, b, f, g, 0, 1, tol)
    good = (f, g, n_iter)
    K = nx.exp(log_k + f[..., :, None] + g[..., None, :])
    Kt = K.swapaxes(-1, -2)  # a view: a batch's products are row vector @ matrix (BLAS's fast case)
    u, v = nx.ones(f.shape, type_as=f), nx.ones(g.shape, type_as=g)
    # one problem with unbatched marginals: matrix-vector products, 3-10% faster than the
    # row-vector form at B = 256-1024 on this CPU (the plans agreed bit for bit)
    single = K.ndim == 2 and u.ndim == 1 and v.ndim == 1
    for it in range(1, max_iter):
        col = u @ K if single else (u[..., None, :] @ K)[..., 0, :]  # (..., m): K^T u
        if _checks(it):
            log_u, log_v = nx.log(u), nx.log(v)
            worst = _magnitude(nx, log_u, log_v)
            if not math.isfinite(worst):  # a scaling overflowed or vanished
                return (*good, False)
            if _converged(nx, v * col, b, tol):
                return f + log_u, g + log_v, n_iter, True
            good = (f + log_u, g + log_v, n_iter)
            if worst > ABSORB:
                f, g = good[0], good[1]
                K = nx.exp(log_k + f[..., :, None] + g[..., None, :])
                Kt = K.swapaxes(-1, -2)
                u, v = nx.ones(f.shape, type_as=f), nx.ones(g.shape, type_as=g)
                col = nx.sum(K, axis=-2)
        v = b / col
        u = a / (K @ v if single else (v[..., None, :] @ Kt)[..., 0, :])
        n_iter = it + 1
    log_u, log_v = nx.log(u), nx.log(v)
    if not math.isfinite(_magnitude(nx, log_u, log_v)):
        return (*good, False)
    return f + log_u, g + log_v, n_iter, False


def sinkhorn_log(
    a: Array | None,
    b: Array | None,
    M: Array,
    reg: float,
    *,
    mask: Array | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
    warmstart: tuple[Array, Array] | None = None,
    domain: str = "auto",
) -> OTResult:
    r"""Entropic OT in the log domain, batched and with forbidden cells.

    Solves, for each problem in the batch,

    .. math::
        P^\star = \arg\min_{P \ge 0,\ P 1 = a,\ P^\top 1 = b}
            \langle P, M \rangle - \mathrm{reg}\, H(P),\qquad H(P) = -\sum_{ij} P_{ij}(\log P_{ij} - 1)

    by alternating updates of the log-potentials ``f, g`` (Cuturi 2013, in log form):

    .. math::
        \log K = -M/\mathrm{reg} + \mathrm{MASK\_LOGIT}\cdot\mathrm{mask},\quad
        g = \log b - \mathrm{LSE}_i(\log K_{ij} + f_i),\quad
        f = \log a - \mathrm{LSE}_j(\log K_{ij} + g_j),\quad
        P = \exp(f_i + \log K_{ij} + g_j).

    After each row update the row marginals are exact, so the stopping test is the L1
    error of the column marginals (taken, at no extra cost, from the next column
    update); it stops when the largest error over the batch is below ``tol``. As in POT's
    ``sinkhorn_log``, the test runs every ``CHECK_EVERY`` (10) iterations, but at each of
    the first ten, so that a problem that converges in a few iterations stops there: each
    test reads the error on the host (a device sync on CUDA), and testing every iteration
    made a B = 256 solve about 8% slower on CPU (``bench/speed.py``).
    A :class:`ConvergenceWarning` is raised when ``max_iter`` is reached first.

    With ``domain="auto"`` and positive marginals, the same iterations run on
    the stabilised kernel (a forbidden cell's entry is 0 where the mask leaves the
    marginals feasible) (products and sums instead of log-sum-exps; see
    `_scaling_iterations`), several times faster on the CPU, and fall back to the log
    domain should a scaling ever overflow; the result agrees with the log domain to
    rounding. ``domain="log"`` always iterates in the log domain, as POT's ``sinkhorn_log``.

    Parameters
    ----------
    a : (..., n) or None
        Source marginal (non-negative, summing to the same total as ``b``); zeros are
        allowed and get no mass. None means uniform ``1/n``. Broadcasts against ``M``.
    b : (..., m) or None
        Target marginal, as ``a``.
    M : (..., n, m)
        Cost matrix, finite (forbid cells with ``mask``, not with ``inf``).
    reg : float
        Entropic strength (> 0), in the units of ``M``; with ``M`` scaled to [0, 1]
        (:func:`normalize_cost`), 1e-3 still runs without overflow.
    mask : (..., n, m) bool, optional
        True where transport is forbidden: ``MASK_LOGIT`` (-1e6) is added to the cell's
        log-kernel, so it carries no mass whenever the marginals are feasible without it.
    max_iter : int
        Most iterations; each is one column and one row update.
    tol : float
        Stopping threshold on the L1 marginal error.
    warmstart : ((..., n), (..., m)), optional
        Initial log-scalings ``(log_u, log_v)``, e.g. those of a previous
        :class:`OTResult` on a nearby cost (as POT's ``warmstart``); zeros by default.
    domain : {"auto", "log"}
        ``auto``: scaling iterations where they apply (above), else log; ``log``: always log.

    Returns
    -------
    OTResult
        ``plan`` (..., n, m), ``cost`` (...,) = <P, M>, ``n_iter``, ``err`` (...,).

    Examples
    --------
    >>> import torch
    >>> M = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    >>> r = sinkhorn_log(None, None, M, reg=0.01)
    >>> r.plan.diagonal().tolist()
    [0.5, 0.5]
    """
    if not reg > 0:
        raise ValueError(f"reg must be > 0; got {reg}.")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0; got {max_iter}.")
    args = [x for x in (a, b, M) if x is not None]
    nx = get_backend(*args)
    n, m = M.shape[-2], M.shape[-1]
    a = _uniform(nx, a, (n,), M)
    b = _uniform(nx, b, (m,), M)
    if a.shape[-1] != n or b.shape[-1] != m:
        raise ValueError(
            f"marginals must match the cost: a (..., {n}) and b (..., {m}) for M {tuple(M.shape)}; "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}."
        )

    log_k = -M / reg
    if mask is not None:
        log_k = nx.where(mask, log_k + MASK_LOGIT, log_k)
    log_a, log_b = _log_weights(nx, a), _log_weights(nx, b)
    batch = tuple(log_k.shape[:-2])
    if warmstart is None:
        f = nx.zeros(batch + (n,), type_as=M)
        g = nx.zeros(batch + (m,), type_as=M)
    else:
        f, g = warmstart

    if domain not in ("auto", "log"):
        raise ValueError(f"domain must be 'auto' or 'log'; got {domain!r}.")
    n_iter, converged, plan = 0, False, None
    if domain == "auto" and _all_positive(nx, a) and _all_positive(nx, b):
        f, g, n_iter, converged = _scaling_iterations(
            nx, log_k, a, b, log_a, log_b, f, g, max_iter, tol
        )
        # Its test ran in the stabilised frame; repeat it on the plan that is returned, which
        # float32 rounds where the potentials are large (an infeasible mask drives them to
        # ~1e6). Failing it, the log domain carries on from here.
        plan = nx.exp(f[..., :, None] + log_k + g[..., None, :])
        converged = converged and _converged(nx, nx.sum(plan, axis=-2), b, tol)
    if not converged and n_iter < max_iter:
        f, g, n_iter, converged = _log_iterations(
            nx, log_k, log_a, log_b, b, f, g, n_iter, max_iter, tol
        )
        plan = None
    if plan is None:
        plan = nx.exp(f[..., :, None] + log_k + g[..., None, :])
    err = _marginal_error(nx, plan, a, b)
    worst = float(nx.max(nx.detach(err)))
    if not converged and worst >= tol:
        # No error value in the text: a constant message lets the default warning filter
        # show it once per call site instead of once per training step; see OTResult.err.
        warnings.warn(
            f"sinkhorn_log did not converge in {max_iter} iterations: marginal error >= tol "
            f"{tol:g} (OTResult.err has it). Raise max_iter or reg, or check that the mask "
            "leaves the marginals feasible.",
            ConvergenceWarning,
            stacklevel=2,
        )
    cost = nx.sum(nx.sum(plan * M, axis=-1), axis=-1)
    return OTResult(plan=plan, cost=cost, n_iter=n_iter, err=err, log_u=f, log_v=g)


def cost_cosine(x: Array, y: Array) -> Array:
    r"""Cosine cost :math:`M_{ij} = 1 - \langle x_i, y_j \rangle` for L2-normalised rows.

    x : (..., n, d), y : (..., m, d) -> M : (..., n, m), values in [0, 2].
    Rows are not renormalised here; normalise the embeddings first.
    """
    return 1.0 - x @ y.swapaxes(-1, -2)


def normalize_cost(M: Array) -> Array:
    """``M / max(M)`` per problem: (..., n, m) -> (..., n, m) with maximum 1.

    A problem whose cost is all zero (or negative) is returned unchanged rather than
    divided by zero.
    """
    nx = get_backend(M)
    top = _amax2(nx, M)
    return M / nx.where(top > 0, top, 1.0)


def emd(a: Array | None, b: Array | None, M: Array, *, max_iter: int = 100000) -> OTResult:
    """Exact OT by the network simplex, a thin wrapper over ``ot.emd``.

    a : (n,) or None (uniform), b : (m,) or None (uniform), M : (n, m); no batching.
    Returns an :class:`OTResult` with ``n_iter=None``. Torch inputs come back as torch
    tensors on the same device (POT solves on the CPU).
    """
    nx = get_backend(*(x for x in (a, b, M) if x is not None))
    n, m = M.shape
    a = _uniform(nx, a, (n,), M)
    b = _uniform(nx, b, (m,), M)
    import ot as pot

    plan = pot.emd(a, b, M, numItermax=max_iter)
    return OTResult(
        plan=plan,
        cost=nx.sum(plan * M),
        n_iter=None,
        err=_marginal_error(nx, plan, a, b),
    )
