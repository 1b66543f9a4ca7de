"""How far GORACS's refinement can go on the reference problem (#15).

ALGORITHMS.md's reference problem (`bench.curation.synthetic`: 15k candidates x 5k target,
512-d, lambda 0.5, k = 1000, one group), greedy k-median first (`coreset.greedy_kmedian`),
then two ways to lower the exact OT objective further:

- `swap`: the pipeline's swap search (`coreset.swap_refine`: ``--cut-num`` members and
  outsiders pruned by the dual estimate; their disjoint pairs swapped together, the batch
  halved until the objective drops, else up to ``--tries`` single pairs), with a larger
  batch than the pipeline's so that more swaps fit in the time; the objective and the
  seconds after every round, until a round finds nothing (or ``--max-iters`` swaps).
- `medoid`: alternating exchange (capacitated k-medoids): keep the current OT plan, give
  each member's targets the candidate that serves them cheapest (one assignment problem,
  members x candidates, ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` over
  each member's ``--medoid-top`` cheapest candidates and itself), solve OT again; stop when
  the objective does not drop.

Then a lower bound on the best objective any k rows reach (`lower_bound`, a Lagrangian
dual), so that the table says how much of the possible cut the refinement found.

Rows {bench, case, seed, method, round, metric, value} go to bench/results/goracs_refine.json,
a table to .md:

    .venv/bin/python -m bench.goracs_refine --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def medoid_rounds(cost, chosen, *, top: int, rounds: int = 50):
    """Yield (seconds, members changed, objective) after each alternating exchange."""
    import ot
    import scipy.sparse as sp
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    t0 = time.perf_counter()
    k, t = len(chosen), cost.shape[1]

    def solve(rows):
        plan, log = ot.emd(
            np.full(k, 1 / k), np.full(t, 1 / t), np.ascontiguousarray(rows), log=True,
            numItermax=10_000_000,
        )  # fmt: skip
        return float(log["cost"]), plan

    chosen = np.array(chosen)
    obj, plan = solve(cost[chosen])
    for _ in range(rounds):
        slot = np.asarray(sp.csr_matrix(plan * k) @ cost.T)  # (k, m): member's targets' cost
        near = np.argpartition(slot, top, axis=1)[:, :top]
        cols = np.concatenate([near, chosen[:, None]], axis=1)
        rows = np.repeat(np.arange(k), cols.shape[1])
        graph = sp.coo_matrix((np.ones(rows.size), (rows, cols.ravel())), shape=slot.shape)
        graph.sum_duplicates()
        graph.data = slot[graph.row, graph.col] + 1e-12  # explicit zeros would vanish
        r, c = min_weight_full_bipartite_matching(graph.tocsr())
        new = c[np.argsort(r)]
        changed = int((new != chosen).sum())
        t_obj, t_plan = solve(cost[new]) if changed else (obj, plan)
        yield time.perf_counter() - t0, changed, t_obj
        if t_obj >= obj - 1e-12:
            return
        chosen, obj, plan = new, t_obj, t_plan


def lower_bound(cost, v0, k: int, upper: float, *, iters: int):
    """A lower bound on the objective any k rows can reach: the Lagrangian dual of the
    problem with its target marginals relaxed (multipliers v, one per target). For a given
    v, a chosen row serves its r = t/k targets of lowest C - v, at most 1/t each, and the k
    rows with the lowest such cost are chosen; L(v) = Σv/t + that cost ≤ the optimum for
    every v. v starts at ``v0`` (the refined solution's OT dual, shifted by the best
    constant) and takes ``iters`` subgradient steps, Polyak's step towards ``upper`` (the
    best objective found). Yields (seconds, bound) whenever the bound improves."""
    t0 = time.perf_counter()
    m, t = cost.shape
    r = max(1, round(t / k))
    rows = np.arange(m)[:, None]

    def dual(v):
        red = cost - v[None, :]
        near = np.argpartition(red, r - 1, axis=1)[:, :r]
        gain = np.minimum(red[rows, near], 0.0)
        rho = gain.sum(axis=1)
        opened = np.argpartition(rho, k - 1)[:k]
        return (v.sum() + rho[opened].sum()) / t, near[opened][gain[opened] < 0]

    v0 = np.asarray(v0, dtype=np.float64)
    shifts = np.linspace(-0.5, 0.5, 41) * (cost.max() - cost.min())
    v = v0 + max(shifts, key=lambda c: dual(v0 + c)[0])
    best = -np.inf
    for _ in range(iters):
        bound, served = dual(v)
        if bound > best:
            best = bound
            yield time.perf_counter() - t0, best
        grad = np.ones(t)
        np.subtract.at(grad, served, 1.0)  # Σv/t's 1/t less what the chosen rows serve (×t)
        norm = float(grad @ grad)
        if norm == 0:
            return  # v is optimal for the relaxation
        v = v + (upper - bound) * t / norm * grad


def run(seed: int, args) -> list[dict]:
    from bench.curation import reference_cost, synthetic
    from otcurate import coreset as cs

    cost = reference_cost(*synthetic(15_000, 5_000, seed))
    first = cs.greedy_kmedian(cost, 1000)
    greedy = cs.ot_objective(cost[first])[0]
    rows = []

    def row(method, rnd, metric, value):
        rows.append(
            {"bench": "goracs_refine", "case": "reference", "seed": seed, "method": method,
             "round": rnd, "metric": metric, "value": float(value)}
        )  # fmt: skip

    row("greedy", 0, "objective", greedy)
    for i, (sec, changed, obj) in enumerate(medoid_rounds(cost, first, top=args.medoid_top)):
        print(f"[goracs_refine] seed {seed} medoid {i}: {changed} changed, cut "
              f"{100 * (greedy - obj) / greedy:.2f}% at {sec:.1f} s", flush=True)  # fmt: skip
        for metric, v in (("seconds", sec), ("changed", changed), ("objective", obj)):
            row("medoid", i, metric, v)
    t0, done = time.perf_counter(), []

    def on_round(swaps, solves, obj, _chosen):
        sec, i = time.perf_counter() - t0, len(done)
        done.append(i)
        print(f"[goracs_refine] seed {seed} swap round {i}: {swaps} swaps, {solves} solves, cut "
              f"{100 * (greedy - obj) / greedy:.2f}% at {sec:.1f} s", flush=True)  # fmt: skip
        for metric, v in (
            ("seconds", sec),
            ("swaps", swaps),
            ("solves", solves),
            ("objective", obj),
        ):
            row("swap", i, metric, v)

    chosen, best, _, _ = cs.swap_refine(
        cost, first, max_iters=args.max_iters, cut_num=args.cut_num, tries=args.tries,
        on_round=on_round,
    )  # fmt: skip
    _, _, dual_v = cs.ot_objective(cost[chosen])
    sec, bound = list(lower_bound(cost, dual_v, 1000, best, iters=args.bound_iters))[-1]
    print(f"[goracs_refine] seed {seed} lower bound {bound:.5f}: at most "
          f"{100 * (greedy - bound) / greedy:.2f}% below greedy ({sec:.1f} s)", flush=True)  # fmt: skip
    row("lower_bound", 0, "objective", bound)
    row("lower_bound", 0, "seconds", sec)
    return rows


def table(rows: list[dict], args_line: str) -> str:
    seeds = sorted({r["seed"] for r in rows})
    get = {(r["seed"], r["method"], r["round"], r["metric"]): r["value"] for r in rows}

    def last(seed, method):
        rnd = max(r["round"] for r in rows if r["seed"] == seed and r["method"] == method)
        return {
            m: get.get((seed, method, rnd, m))
            for m in ("seconds", "objective", "swaps", "changed", "solves")
        }

    out = [
        "# GORACS refinement on the reference problem",
        "",
        f"`{args_line}`. 15k candidates x 5k target (synthetic 512-d, `bench.curation.synthetic`),",
        "lambda 0.5, k = 1000, one group. Cut = (greedy - refined) / greedy. The lower bound",
        "(Lagrangian dual, target marginals relaxed, `lower_bound`) is below every k-subset's",
        "objective, so no refinement can cut more than the largest possible cut.",
        "",
        "| seed | greedy | medoid: objective | cut | members changed (first round) | seconds | swap: objective | cut | swaps | exact solves | seconds | lower bound | largest possible cut |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in seeds:
        g = get[(s, "greedy", 0, "objective")]
        md, sw = last(s, "medoid"), last(s, "swap")
        lb = get[(s, "lower_bound", 0, "objective")]
        out.append(
            f"| {s} | {g:.4f} | {md['objective']:.4f} | {100 * (g - md['objective']) / g:.2f}% "
            f"| {int(get[(s, 'medoid', 0, 'changed')])} | {md['seconds']:.1f} "
            f"| {sw['objective']:.4f} | {100 * (g - sw['objective']) / g:.2f}% | {int(sw['swaps'])} "
            f"| {int(sw['solves'])} | {sw['seconds']:.1f} | {lb:.4f} | {100 * (g - lb) / g:.2f}% |"
        )
    out += [
        "",
        "Swap search, cut after each round:",
        "",
        "| seed | round | seconds | swaps | cut |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in seeds:
        g = get[(s, "greedy", 0, "objective")]
        for rnd in sorted({r["round"] for r in rows if r["seed"] == s and r["method"] == "swap"}):
            o = get[(s, "swap", rnd, "objective")]
            out.append(
                f"| {s} | {rnd} | {get[(s, 'swap', rnd, 'seconds')]:.1f} "
                f"| {int(get[(s, 'swap', rnd, 'swaps')])} | {100 * (g - o) / g:.2f}% |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--cut-num", type=int, default=30)
    ap.add_argument("--tries", type=int, default=10)
    ap.add_argument("--max-iters", type=int, default=2000, help="accepted swaps at most")
    ap.add_argument("--medoid-top", type=int, default=30)
    ap.add_argument("--bound-iters", type=int, default=100, help="subgradient steps")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    from otcurate.runtime import make_reproducible

    make_reproducible(0, 2)
    rows = [r for s in args.seeds for r in run(s, args)]
    line = ".venv/bin/python -m bench.goracs_refine " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", f"--cut-num {args.cut_num}",
         f"--tries {args.tries}", f"--max-iters {args.max_iters}", f"--medoid-top {args.medoid_top}",
         f"--bound-iters {args.bound_iters}"]
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "goracs_refine.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "goracs_refine.md").write_text(table(rows, line))
    print(table(rows, line))


if __name__ == "__main__":
    main()
