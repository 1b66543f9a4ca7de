"""Coreset selection: choose k training pairs to fine-tune on.

Every method takes the candidate pool (indices into the train split) and a
budget `k` and returns a `Selection` of sorted, unique indices.

`goracs` is GORACS (OT-guided coreset selection, reference code Mithas-114/GORACS):
the k pairs whose uniform measure is closest, in exact OT on an embedding-distance
minus gradient-norm cost, to the uniform measure on a clean target set; greedy
k-median first, then swaps pruned by the OT dual potentials.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from otcurate import methods as registry
from otcurate.clusters import clusters
from otcurate.methods import NoOptions
from otcurate.options import CORESET_METHODS as METHODS
from otcurate.options import GoracsOptions
from otcurate.progress import track


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # (k,) sorted unique indices into the train split
    weights: np.ndarray  # (k,) sample weights (1.0 unless a method says otherwise)
    scores: np.ndarray  # (k,) the chosen pairs' detection scores
    info: dict[str, Any] = field(default_factory=dict)  # method-specific metrics


@dataclass(frozen=True)
class Pool:
    """What methods may use: candidate indices and per-pair data for the whole train split.

    The target (a clean set the selection should resemble, e.g. the val split) and the
    labels are optional; methods that need them say so.
    """

    candidates: np.ndarray  # (m,) indices of eligible pairs
    image: torch.Tensor  # (n, d) image embeddings
    text: torch.Tensor  # (n, d) text embeddings
    scores: np.ndarray  # (n,) detection cleanliness scores
    labels: np.ndarray | None = None  # (n,) class ids, -1 = unknown
    target_image: torch.Tensor | None = None  # (t, d)
    target_text: torch.Tensor | None = None  # (t, d)
    target_labels: np.ndarray | None = None  # (t,)
    logit_scale: float = 100.0  # the model's CLIP temperature (for gradient norms)


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


def _finish(indices: np.ndarray, scores: np.ndarray, info: dict | None = None) -> Selection:
    order = np.argsort(indices)
    return Selection(
        indices[order].astype(np.int64),
        np.ones(len(indices)),
        scores[order].astype(np.float64),
        info or {},
    )


def random(pool: Pool, k: int, opts: NoOptions | None = None, *, seed: int) -> Selection:
    """k candidates uniformly at random."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(pool.candidates, size=k, replace=False)
    return _finish(chosen, pool.scores[chosen])


def clip_score(pool: Pool, k: int, opts: NoOptions | None = None, *, seed: int) -> Selection:
    """The k candidates with the highest detection score (DataComp-style top-k)."""
    cand = pool.candidates
    order = np.argsort(-pool.scores[cand], kind="stable")[:k]
    chosen = cand[order]
    return _finish(chosen, pool.scores[chosen])


def pair_features(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One vector per pair: [image, text] / sqrt(2) (unit norm when both are)."""
    return torch.cat([image, text], dim=1) / np.sqrt(2.0)


def kcenter(pool: Pool, k: int, opts: NoOptions | None = None, *, seed: int) -> Selection:
    """k-center greedy (farthest-first traversal) on the pairs' [image, text] embeddings,
    from a seeded random first centre; ``info['radius']`` is the final covering radius."""
    cand = pool.candidates
    x = pair_features(pool.image[cand], pool.text[cand]).double()
    first = int(np.random.default_rng(seed).integers(len(cand)))
    chosen = [first]
    dist = torch.cdist(x, x[first : first + 1]).squeeze(1)
    for _ in range(k - 1):
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.cdist(x, x[nxt : nxt + 1]).squeeze(1))
    idx = cand[np.asarray(chosen)]
    return _finish(idx, pool.scores[idx], {"radius": float(dist.max())})


# ---------------------------------------------------------------------------- GORACS


def contrastive_grad_norms(
    image: torch.Tensor, text: torch.Tensor, scale: float, *, batch_size: int = 256, seed: int = 0
) -> torch.Tensor:
    """(n,) per-pair gradient norm of the CLIP loss, on a small parameter block.

    The block is a d×d linear adapter on top of each tower, at the identity (the last-layer
    gradient of coreset methods such as CRAIG): for pair i in a random batch,
    ℓ_i = ½[CE(row i) + CE(column i)] of ``scale·I Tᵀ``, and the adapter's per-sample
    gradient is ∂ℓ_i/∂e ⊗ e with ‖e‖ = 1, so its norm is ‖∂ℓ_i/∂I_i‖ ⊕ ‖∂ℓ_i/∂T_i‖. Closed
    form, batched: no per-sample loop and no model forward (it works from stored embeddings).
    """
    n = len(image)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    out = torch.empty(n, dtype=image.dtype, device=image.device)
    for idx in torch.tensor_split(perm, max(1, -(-n // batch_size))):
        idx = idx.to(image.device)
        i, t = image[idx], text[idx]
        logits = scale * i @ t.T
        p = logits.softmax(dim=1)  # image -> texts, rows
        q = logits.softmax(dim=0)  # text -> images, columns
        g_img = 0.5 * scale * ((p @ t - t) + (q.diagonal() - 1)[:, None] * t)
        g_txt = 0.5 * scale * ((q.T @ i - i) + (p.diagonal() - 1)[:, None] * i)
        out[idx] = (g_img.square().sum(1) + g_txt.square().sum(1)).sqrt()
    return out


def goracs_cost(
    cand_feat: torch.Tensor, target_feat: torch.Tensor, grad: torch.Tensor, lam: float
) -> torch.Tensor:
    """C = D/max D − λ·g/max g, rescaled to [0, 1] (m, t): D the Euclidean distance between
    candidate and target features, g the candidates' gradient norms."""
    eps = torch.finfo(cand_feat.dtype).tiny
    d = torch.cdist(cand_feat, target_feat)
    c = d / d.max().clamp_min(eps) - lam * (grad / grad.max().clamp_min(eps))[:, None]
    return (c - c.min()) / (c.max() - c.min()).clamp_min(eps)


def greedy_kmedian(cost: np.ndarray, k: int) -> np.ndarray:
    """GORACS stage 1: k rows of ``cost`` (m, t) in [0, 1], each the one that most lowers
    Σ_j min(C_ej, m_j) (m_j the current best cost of target j, 1 at the start).

    Lazy greedy: the reduction Σ_j max(0, m_j − C_ej) only shrinks as rows are added
    (submodular), so a stale upper bound that still tops the heap after recomputation is the
    true argmax; the result equals plain greedy (ties to the lower row index).
    """
    m, _ = cost.shape
    if not 0 < k <= m:
        raise ValueError(f"greedy_kmedian: k must be in [1, {m}]; got {k}.")
    best = np.ones(cost.shape[1], dtype=cost.dtype)
    gains = (1.0 - cost).sum(axis=1)
    heap = [(-g, i) for i, g in enumerate(gains.tolist())]
    heapq.heapify(heap)
    chosen: list[int] = []
    while len(chosen) < k:
        _, i = heapq.heappop(heap)
        g = float(np.maximum(best - cost[i], 0.0).sum())
        if not heap or (-g, i) <= heap[0]:
            chosen.append(i)
            best = np.minimum(best, cost[i])
        else:
            heapq.heappush(heap, (-g, i))
    return np.asarray(chosen, dtype=np.int64)


def ot_objective(cost_rows: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Exact OT between the uniform measures on the rows and on the columns of
    ``cost_rows`` (k, t): (cost, dual u (k,), dual v (t,)), POT's network simplex."""
    import ot

    k, t = cost_rows.shape
    a = np.full(k, 1.0 / k)
    b = np.full(t, 1.0 / t)
    c = np.ascontiguousarray(cost_rows, dtype=np.float64)
    _, log = ot.emd(a, b, c, numItermax=10_000_000, log=True)
    return float(log["cost"]), np.asarray(log["u"]), np.asarray(log["v"])


def _exchange_scores(cost: np.ndarray, chosen: np.ndarray, u: np.ndarray, out: np.ndarray):
    """GORACS's marginal-importance estimates (its Theorem 4.3, from the semi-dual of OT):
    F(i) = max_y [y/k + mean_j min(C_ij − y − f_ij, 0)], with f_ij = min_{l∈S∖{i}} (C_lj − u_l)
    the best reduced cost column j keeps without row i. A low F marks an outsider worth adding;
    a high F a member worth least. Returns (F of the members, F of the outsiders ``out``)."""
    k, t = len(chosen), cost.shape[1]
    r = max(1, int(np.ceil(t / k)))  # columns one member serves; y is the r-th smallest gap
    red = cost[chosen] - u[:, None]
    two = np.argpartition(red, 1, axis=0)[:2] if k > 1 else np.zeros((2, t), np.int64)
    cols = np.arange(t)
    first, second = red[two[0], cols], red[two[1], cols] if k > 1 else np.full(t, np.inf)

    def score(rows: np.ndarray, f: np.ndarray) -> np.ndarray:
        d = rows - f
        y = np.partition(d, r - 1, axis=1)[:, r - 1]
        return y / k + np.minimum(d - y[:, None], 0.0).mean(axis=1)

    f_members = np.broadcast_to(first, red.shape).copy()
    f_members[two[0], cols] = second
    f_members[~np.isfinite(f_members)] = first.max() + 1.0  # a lone member: nothing else serves
    inner = score(cost[chosen], f_members)
    outer = (
        np.concatenate(
            [score(cost[part], first) for part in np.array_split(out, max(1, len(out) // 2048))]
        )
        if len(out)
        else np.empty(0)
    )
    return inner, outer


def swap_refine(
    cost: np.ndarray,
    chosen: np.ndarray,
    *,
    max_iters: int,
    cut_num: int,
    tries: int | None = None,
    on_round: Callable[[int, int, float, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, float, int, int]:
    """GORACS stage 2: swap members for outsiders while the exact OT objective drops.

    Each round prunes to the ``cut_num`` members with the highest and outsiders with the
    lowest marginal-importance estimate (`_exchange_scores`, from the current duals) and
    orders their pairs by estimated gain. Then, each move checked by an exact solve:
    1. the best disjoint pairs (up to ``cut_num``) swapped together, halving the batch until
       the objective drops; 2. else the pairs one at a time, first improvement (the
    reference's own step; the first ``tries`` pairs only when given, instead of all
    ``cut_num``² of them). Stops after ``max_iters`` accepted swaps or when no tried pair
    improves. ``on_round(swaps, evaluated, objective, chosen)`` runs after every round.
    Returns (chosen, objective, swaps accepted, exact objectives evaluated).
    """
    if tries is not None and tries < 1:
        raise ValueError(f"swap_refine: tries must be >= 1 or None; got {tries}.")
    chosen = np.array(chosen, dtype=np.int64)
    obj, u, _ = ot_objective(cost[chosen])
    inside = np.zeros(len(cost), dtype=bool)
    inside[chosen] = True
    swaps = evals = 0

    def attempt(moves: list[tuple[int, int]]) -> bool:
        nonlocal chosen, obj, u, evals, swaps
        trial = chosen.copy()
        for pos, new in moves:
            trial[pos] = new
        t_obj, t_u, _ = ot_objective(cost[trial])
        evals += 1
        if t_obj >= obj - 1e-12:
            return False
        for pos, new in moves:
            inside[chosen[pos]] = False
            inside[new] = True
        chosen, obj, u = trial, t_obj, t_u
        swaps += len(moves)
        return True

    while swaps < max_iters and not inside.all():
        outsiders = np.flatnonzero(~inside)
        inner, outer = _exchange_scores(cost, chosen, u, outsiders)
        members = np.argsort(-inner, kind="stable")[:cut_num]  # positions in `chosen`
        top = np.argsort(outer, kind="stable")[:cut_num]
        pairs = sorted(
            ((outer[o] - inner[s], int(s), int(outsiders[o])) for s in members for o in top),
            key=lambda x: (x[0], x[1], x[2]),
        )
        batch, seen_s, seen_o = [], set(), set()
        for _, s, o in pairs:
            if s not in seen_s and o not in seen_o:
                seen_s.add(s), seen_o.add(o), batch.append((s, o))
        size = min(len(batch), max_iters - swaps)
        improved = False
        while size > 1 and not improved:
            improved = attempt(batch[:size])
            size //= 2
        for _, s, o in [] if improved else pairs[:tries]:
            if attempt([(s, o)]):
                improved = True
                break
        if on_round is not None:
            on_round(swaps, evals, obj, chosen)
        if not improved:
            break
    return chosen, obj, swaps, evals


def split_budget(k: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """k split over groups in proportion to ``weights`` (largest remainder), never above a
    group's ``capacity``; what a full group cannot take goes to the others by weight."""
    weights = np.asarray(weights, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.int64)
    if k > capacity.sum():
        raise ValueError(f"budget {k} exceeds the {capacity.sum()} candidates in all groups.")
    out = np.zeros(len(weights), dtype=np.int64)
    left = k
    while left > 0:
        room = out < capacity
        w = np.where(room, weights, 0.0)
        if w.sum() <= 0:
            w = room.astype(np.float64)
        share = left * w / w.sum()
        add = np.minimum(np.floor(share).astype(np.int64), capacity - out)
        rest = left - add.sum()
        if rest > 0:
            order = np.argsort(-(share - np.floor(share)) - 2 * (w > 0), kind="stable")
            for g in order:
                if rest == 0:
                    break
                if out[g] + add[g] < capacity[g]:
                    add[g] += 1
                    rest -= 1
        out += add
        left = k - out.sum()
    return out


def goracs(pool: Pool, k: int, opts: GoracsOptions | None = None, *, seed: int) -> Selection:
    """GORACS: stage-1 greedy and stage-2 swap refinement on the OT cost to the target,
    per group (labels, or k-means clusters of the text embeddings) with the budget split by
    the target's group proportions. ``target_max`` subsamples the target and
    ``candidate_max`` pre-clusters a larger candidate pool (one representative per k-means
    cluster, the member nearest its centre) into max(candidate_max, 2k) representatives, so
    the cost matrix stays ≤ max(candidate_max, 2k) × target_max and a budget beyond
    candidate_max still leaves GORACS a choice.
    """
    o = opts or GoracsOptions()
    if pool.target_image is None or pool.target_text is None or len(pool.target_image) == 0:
        raise ValueError("goracs needs a non-empty target set (the clean val split).")
    rng = np.random.default_rng(seed)
    cand = pool.candidates
    grad_all = contrastive_grad_norms(
        pool.image, pool.text, pool.logit_scale, batch_size=o.grad_batch_size, seed=seed
    )
    feat = pair_features(pool.image[cand], pool.text[cand])  # float until pre-clustering is done
    grad = grad_all[cand]
    tgt = np.arange(len(pool.target_image))
    if len(tgt) > o.target_max:
        tgt = np.sort(rng.choice(tgt, size=o.target_max, replace=False))
    tfeat = pair_features(pool.target_image[tgt], pool.target_text[tgt]).double()

    pool_max = max(o.candidate_max, 2 * k)  # a large budget keeps two candidates per slot
    if len(cand) > pool_max:
        keep = precluster(feat.float().numpy(), pool_max, seed=seed)
        if len(keep) < k:  # rounding and shared nearest members can leave a few short
            rest = np.setdiff1d(np.arange(len(cand)), keep)
            keep = np.sort(np.concatenate([keep, rng.choice(rest, k - len(keep), replace=False)]))
        cand, feat, grad = cand[keep], feat[keep], grad[keep]
    feat, grad = feat.double(), grad.double()

    cand_g, tgt_g = _groups(pool, cand, tgt, grouped=o.grouped, groups=o.groups, seed=seed)
    ids = np.unique(np.concatenate([cand_g, tgt_g]))
    weights = np.array([(tgt_g == g).sum() for g in ids], dtype=np.float64)
    capacity = np.array([(cand_g == g).sum() for g in ids])
    per_group = split_budget(k, weights, capacity)

    chosen_all, obj_greedy, obj_refined, sizes = [], 0.0, 0.0, {}
    swaps = evals = 0
    groups_done = track(
        zip(ids, per_group, strict=True), total=len(ids), description="goracs (per group)"
    )
    for g, kg in groups_done:
        if kg == 0:
            continue
        rows = np.flatnonzero(cand_g == g)
        cols = np.flatnonzero(tgt_g == g)
        if len(cols) == 0:  # a group the target lacks: only reachable when others are full
            cols = np.arange(len(tgt))
        cost = goracs_cost(feat[rows], tfeat[cols], grad[rows], o.lam).numpy()
        first = greedy_kmedian(cost, int(kg))
        o_g, _, _ = ot_objective(cost[first])
        picked, o_r, s_g, e_g = swap_refine(cost, first, max_iters=o.max_iters, cut_num=o.cut_num)
        share = kg / k
        obj_greedy += share * o_g
        obj_refined += share * o_r
        swaps += s_g
        evals += e_g
        sizes[str(int(g))] = int(kg)
        chosen_all.append(rows[picked])
    pos = np.concatenate(chosen_all)
    idx = cand[pos]
    info = {
        "objective_greedy": obj_greedy,
        "objective_refined": obj_refined,
        "swaps": swaps,
        "objectives_evaluated": evals,
        "groups": len(sizes),
        "size_per_group": sizes,
        "target_pairs": int(len(tgt)),
        "candidates_after_preclustering": int(len(cand)),
    }
    return _finish(idx, pool.scores[idx], info)


PRECLUSTER_DIM = 64


def precluster(x: np.ndarray, n_out: int, *, seed: int) -> np.ndarray:
    """About ``n_out`` representative rows of ``x`` (sorted indices): two-level k-means,
    ⌈√n_out⌉ coarse clusters (mini-batch), then each split in proportion to its size; the
    member nearest each sub-centre represents it. Cost O(n·√n_out·d) per pass instead of
    O(n·n_out·d) for one flat k-means. Rows wider than ``PRECLUSTER_DIM`` are clustered on
    their leading principal components (randomised PCA fitted on a sample), which only
    decides who represents whom."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import pairwise_distances_argmin

    n = len(x)
    if n <= n_out:
        return np.arange(n)
    if x.shape[1] > PRECLUSTER_DIM:
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=min(n, 20_000), replace=False))]
        pca = PCA(PRECLUSTER_DIM, svd_solver="randomized", random_state=seed).fit(sample)
        x = np.concatenate([pca.transform(part) for part in np.array_split(x, -(-n // 65536))])
        x = x.astype(np.float32)
    coarse = int(np.ceil(np.sqrt(n_out)))
    top = MiniBatchKMeans(n_clusters=coarse, random_state=seed, n_init=1, batch_size=4096)
    assign = top.fit_predict(x)
    reps: list[np.ndarray] = []
    for c in range(coarse):
        members = np.flatnonzero(assign == c)
        q = min(len(members), max(1, int(round(n_out * len(members) / n))))
        if q == len(members):
            reps.append(members)
            continue
        sub = KMeans(n_clusters=q, n_init=1, max_iter=20, random_state=seed).fit(x[members])
        reps.append(members[np.unique(pairwise_distances_argmin(sub.cluster_centers_, x[members]))])
    return np.sort(np.concatenate(reps))


def _groups(
    pool: Pool, cand: np.ndarray, tgt: np.ndarray, *, grouped: bool, groups: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Group ids of the candidates and the target rows: the labels when both sides have them
    all, else k-means clusters of the text embeddings (fitted on both); one group if not
    ``grouped``."""
    if not grouped:
        return np.zeros(len(cand), np.int64), np.zeros(len(tgt), np.int64)
    if pool.labels is not None and pool.target_labels is not None:
        lc, lt = np.asarray(pool.labels)[cand], np.asarray(pool.target_labels)[tgt]
        if (lc >= 0).all() and (lt >= 0).all():
            return lc.astype(np.int64), lt.astype(np.int64)
    both = torch.cat([pool.text[cand], pool.target_text[tgt]]).numpy()
    ids = clusters(both, groups, seed=seed)
    return ids[: len(cand)].astype(np.int64), ids[len(cand) :].astype(np.int64)


def options(method: str, **values: Any) -> Any:
    """The options record of `method` with `values` set; an unknown key is an error."""
    return registry.options("coreset", METHODS, method, **values)


def select(method: str, pool: Pool, k: int, opts: Any = None, *, seed: int) -> Selection:
    """Run ``method`` with its options record (None: its defaults; only goracs has any)."""
    opts = registry.checked("coreset", METHODS, method, opts)
    return METHODS[method].fn(pool, k, opts, seed=seed)
