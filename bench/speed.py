"""Speed benchmark: the OT layer vs POT, detection throughput and its scaling, NCU vs CLIP
steps, and the AdamW update every training loop makes (torch's loop vs its fused kernel).

    .venv/bin/python -m bench.speed                    # everything (the 1M point takes a while on 2 CPU cores)
    .venv/bin/python -m bench.speed --sizes 10000 100000

Writes bench/results/speed.json (flat rows {"bench": "speed", "case", "n", "metric", "value"})
and speed.md. Each time is the wall-clock median of `--repeats` runs (default 5), with its
spread in `<metric>_min` / `<metric>_max` rows; ratios are of medians. Ours and POT are timed
in turn after a warm-up call each; a call under 0.2 s is timed in blocks of calls (each sample
the block's mean). Run it alone.

The detection exponent here and `bench/data.py`'s measure the same thing in two setups:
here `det.score("ot")` with one pass on 512-d pairs, the median of `--repeats` timings in a
process that has already run OT; there the default options (4 passes) on 64-d planted pairs
with a fifth of the captions shuffled, one timing per size after a small warm-up call. Both
are linear in n; a fit on three sizes moves with whatever fixed cost the smallest size
carries (data.py's first call, before its warm-up, included POT's import and fitted 0.44).
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.results_io import save
from otcurate import detect as det
from otcurate import ot as otl

ROOT = Path(__file__).resolve().parents[1]


REPEATS = 5  # main() sets it from --repeats
MIN_SAMPLE = 0.2  # seconds: timed_pair times shorter calls in blocks


def timed(fn, repeats: int | None = None) -> tuple[list[float], object]:
    """(the wall-clock seconds of each of `repeats` calls, the last call's result)."""
    out, times = None, []
    for _ in range(repeats or REPEATS):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def timed_pair(fa, fb) -> tuple[list[float], object, list[float], object]:
    """Two rivals timed in turn (a, b, a, b, ...) after one warm-up call each, so that the
    allocator's first-touch cost and the machine's drift fall on both alike.

    A call shorter than ``MIN_SAMPLE`` seconds is timed as a block of calls (the same count
    for both rivals, set from the slower warm-up) and each sample is the block's mean: one
    20 ms call per sample let the scheduler's jitter decide a ratio (B = 512 read 0.89,
    1.16 and 1.20 in three runs of the same code)."""
    t0 = time.perf_counter()
    fa()
    t1 = time.perf_counter()
    fb()
    slower = max(t1 - t0, time.perf_counter() - t1)
    k = max(1, math.ceil(MIN_SAMPLE / max(slower, 1e-9)))
    ta, tb, oa, ob = [], [], None, None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(k):
            oa = fa()
        ta.append((time.perf_counter() - t0) / k)
        t0 = time.perf_counter()
        for _ in range(k):
            ob = fb()
        tb.append((time.perf_counter() - t0) / k)
    return ta, oa, tb, ob


def page_faults(fn) -> int:
    """Minor page faults of one call to ``fn`` (memory the process had to take from the OS)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def spread(case: str, n: int, metric: str, times: list[float]) -> list[dict]:
    """The median row of a timing and its min / max rows."""
    return [
        {"case": case, "n": n, "metric": metric, "value": statistics.median(times)},
        {"case": case, "n": n, "metric": f"{metric}_min", "value": min(times)},
        {"case": case, "n": n, "metric": f"{metric}_max", "value": max(times)},
    ]


def marginal_error(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    return float((P.sum(-1) - a).abs().sum() + (P.sum(-2) - b).abs().sum())


def _versus(case: str, n: int, ours, pot, a, rows: list) -> None:
    """Time `ours` and `pot` in turn; rows: their spreads, the ratio, both marginal errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts_ours, r, ts_pot, P = timed_pair(ours, pot)
    t_ours, t_pot = statistics.median(ts_ours), statistics.median(ts_pot)
    e_ours, e_pot = marginal_error(r.plan, a, a), marginal_error(P, a, a)
    rows += [
        *spread(case, n, "seconds_ours", ts_ours),
        *spread(case, n, "seconds_pot", ts_pot),
        {"case": case, "n": n, "metric": "ratio_vs_pot", "value": t_ours / t_pot},
        {"case": case, "n": n, "metric": "marginal_error_ours", "value": e_ours},
        {"case": case, "n": n, "metric": "marginal_error_pot", "value": e_pot},
    ]
    print(
        f"{case}: ours {t_ours:.3f}s (err {e_ours:.1e}) vs POT {t_pot:.3f}s (err {e_pot:.1e})",
        flush=True,
    )


def ot_vs_pot(sizes, batch: int, reg: float, iters: int, rows: list) -> None:
    """Per size B, `sinkhorn_log` against POT at the same iterations (tol 0), three ways:
    the log domain against POT's ``sinkhorn_log`` (``sinkhorn_log B=``), and our default
    (scaling iterations with absorption) against POT's ``sinkhorn_stabilized`` (the same
    algorithm) and against its plain ``sinkhorn`` (kernel scaling, no absorption)."""
    import ot

    g = torch.Generator().manual_seed(0)
    for B in sizes:
        x = torch.nn.functional.normalize(
            torch.randn(B, 64, generator=g, dtype=torch.float64), dim=1
        )
        y = torch.nn.functional.normalize(
            x + 0.5 * torch.randn(B, 64, generator=g, dtype=torch.float64), dim=1
        )
        M = otl.normalize_cost(otl.cost_cosine(x, y))
        a = torch.full((B,), 1.0 / B, dtype=torch.float64)

        def ours(domain, a=a, M=M):
            return lambda: otl.sinkhorn_log(a, a, M, reg, max_iter=iters, tol=0.0, domain=domain)

        def pot(method, a=a, M=M):
            return lambda: ot.sinkhorn(a, a, M, reg, method=method, numItermax=iters, stopThr=0.0)

        _versus(f"sinkhorn_log B={B}", B, ours("log"), pot("sinkhorn_log"), a, rows)
        _versus(
            f"sinkhorn auto vs stabilized B={B}",
            B,
            ours("auto"),
            pot("sinkhorn_stabilized"),
            a,
            rows,
        )
        _versus(f"sinkhorn auto vs sinkhorn B={B}", B, ours("auto"), pot("sinkhorn"), a, rows)
    # batched: `batch` problems of size 256 at once vs POT solving them one by one
    B = 256
    xs = torch.nn.functional.normalize(
        torch.randn(batch, B, 64, generator=g, dtype=torch.float64), dim=-1
    )
    ys = torch.nn.functional.normalize(
        xs + 0.5 * torch.randn(batch, B, 64, generator=g, dtype=torch.float64), dim=-1
    )
    Ms = otl.normalize_cost(otl.cost_cosine(xs, ys))
    a = torch.full((B,), 1.0 / B, dtype=torch.float64)
    for domain, method in (("log", "sinkhorn_log"), ("auto", "sinkhorn_stabilized")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")

            def ours(d=domain):
                return otl.sinkhorn_log(a, a, Ms, reg, max_iter=iters, tol=0.0, domain=d)

            def pot(m=method):
                return [
                    ot.sinkhorn(a, a, Ms[i], reg, method=m, numItermax=iters, stopThr=0.0)
                    for i in range(batch)
                ]

            ts_ours, _, ts_pot, _ = timed_pair(ours, pot)
            faults = [page_faults(fn) for fn in (ours, pot)]
        t_ours, t_pot = statistics.median(ts_ours), statistics.median(ts_pot)
        case = f"{'sinkhorn_log' if domain == 'log' else 'sinkhorn auto vs stabilized'} batched {batch}x{B}"
        rows += [
            *spread(case, batch * B, "seconds_ours", ts_ours),
            *spread(case, batch * B, "seconds_pot", ts_pot),
            {"case": case, "n": batch * B, "metric": "ratio_vs_pot", "value": t_ours / t_pot},
            {"case": case, "n": batch * B, "metric": "page_faults_ours", "value": faults[0]},
            {"case": case, "n": batch * B, "metric": "page_faults_pot", "value": faults[1]},
        ]
        print(f"{case}: ours {t_ours:.3f}s vs POT loop {t_pot:.3f}s", flush=True)


def detection_throughput(sizes, method: str, passes: int, rows: list) -> None:
    g = torch.Generator().manual_seed(0)
    pts = []
    for n in sizes:
        base = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=1)
        img = torch.nn.functional.normalize(base + 0.3 * torch.randn(n, 512, generator=g), dim=1)
        txt = torch.nn.functional.normalize(base + 0.3 * torch.randn(n, 512, generator=g), dim=1)
        del base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opts = det.options(method, passes=passes)
            ts, _ = timed(lambda img=img, txt=txt, o=opts: det.score(method, img, txt, o, seed=0))
        t = statistics.median(ts)
        rows += [
            *spread(f"detect {method} passes={passes}", n, "seconds", ts),
            {
                "case": f"detect {method} passes={passes}",
                "n": n,
                "metric": "pairs_per_s",
                "value": n / t,
            },
        ]
        pts.append((n, t))
        print(f"detect {method} n={n}: {t:.1f}s, {n / t:.0f} pairs/s", flush=True)
        del img, txt
    if len(pts) >= 2:
        slope = float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])
        rows.append(
            {
                "case": f"detect {method} passes={passes}",
                "n": 0,
                "metric": "scaling_exponent",
                "value": slope,
            }
        )
        print(f"scaling exponent (seconds ~ n^k): k = {slope:.3f}", flush=True)
        for (n0, t0), (n1, t1) in zip(pts[:-1], pts[1:], strict=True):  # where the curve bends
            rows.append(
                {
                    "case": f"detect {method} passes={passes}",
                    "n": n1,
                    "metric": f"local_exponent_from_{n0}",
                    "value": float(np.log(t1 / t0) / np.log(n1 / n0)),
                }
            )


def finetune_steps(rows: list, steps: int = 10) -> None:
    """Seconds per fine-tuning step at batch 128 on the tiny model: plain CLIP, `filter`
    (the recipe the pipeline runs: CLIP steps on the unflagged pairs) and NCU's phase B;
    the median over repeats of `steps`-step runs, after one warm-up run."""
    from otcurate import finetuning, models
    from otcurate.data import builtin
    from otcurate.options import NCUOptions

    recs = [builtin.shapes_record(0, i) for i in range(320)]
    noisy = np.zeros(len(recs), dtype=bool)
    noisy[::5] = True  # 20% flagged: filter keeps 256, a batch of 128 as plain CLIP's
    kw = dict(batch_size=128, lr=1e-4, warmup=0, weight_decay=0.2, seed=0)
    per_step = {}
    for name in ("clip", "filter", "ncu"):
        torch.manual_seed(0)
        clip = models.create("otcurate-tiny")
        x, t = models.pairs_to_tensors([r.image for r in recs], [r.caption for r in recs], clip)
        opts = NCUOptions(phase_a_fraction=0.0) if name == "ncu" else None  # phase B only

        def run(n, name=name, clip=clip, x=x, t=t, opts=opts):
            finetuning.finetune(name, clip.model, x, t, opts, noisy=noisy, steps=n, **kw)

        run(2)  # warm-up: allocators and kernels
        ts, _ = timed(lambda run=run: run(steps))
        per_step[name] = [s / steps for s in ts]
        rows += spread(
            "finetune step otcurate-tiny B=128", 128, f"seconds_{name}_step", per_step[name]
        )
    med = {k: statistics.median(v) for k, v in per_step.items()}
    for name in ("filter", "ncu"):
        rows.append(
            {
                "case": "finetune step otcurate-tiny B=128",
                "n": 128,
                "metric": f"{name}_over_clip_step",
                "value": med[name] / med["clip"],
            }
        )
    print(
        "step: "
        + ", ".join(f"{k} {v:.3f}s" for k, v in med.items())
        + f"; filter/clip {med['filter'] / med['clip']:.2f}, ncu/clip {med['ncu'] / med['clip']:.2f}",
        flush=True,
    )


def optimizer_step(rows: list, steps: int = 20) -> None:
    """Seconds per AdamW update of otcurate-tiny's 4.6M parameters (random gradients, the
    parameter groups and settings of otcurate.optim): torch's default on the CPU (a loop
    over the parameters), its multi-tensor `foreach` form, and the fused kernel that
    `make_optimizer` uses wherever the parameters allow; in turn, median of the repeats."""
    from otcurate import models
    from otcurate.optim import param_groups

    torch.manual_seed(0)
    model = models.create("otcurate-tiny").model
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opts = {
        k: torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, **kw)
        for k, kw in kinds.items()
    }

    def run(opt) -> None:
        with torch.no_grad():
            for _ in range(steps):
                opt.step()

    for opt in opts.values():
        run(opt)  # warm-up: the moments allocated
    per_step = {k: [] for k in opts}
    for _ in range(REPEATS):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            run(opt)
            per_step[k].append((time.perf_counter() - t0) / steps)
    case = "AdamW update otcurate-tiny (4.6M parameters)"
    for k, ts in per_step.items():
        rows += spread(case, 1, f"seconds_{k}", ts)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    rows += [
        {"case": case, "n": 1, "metric": f"{k}_over_loop", "value": med[k] / med["loop"]}
        for k in ("foreach", "fused")
    ]
    print("AdamW update: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()), flush=True)


def markdown(rows: list) -> str:
    lines = [
        "# Speed benchmark",
        "",
        f"Generated by `bench/speed.py` on {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}.",
        "",
        "| case | n | metric | value |",
        "|---|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['n']} | {r['metric']} | {r['value']:.4g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ot-sizes", nargs="+", type=int, default=[128, 256, 512, 1024])
    ap.add_argument("--batched", type=int, default=16)
    ap.add_argument("--reg", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--method", default="ot")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="runs per timing (the median is kept)")
    ap.add_argument(
        "--only", nargs="+", choices=["ot", "steps", "optimizer", "detect"], default=None
    )
    ap.add_argument(
        "--plain-lse",
        action="store_true",
        help="the log domain as before 06a7c1b: a fresh torch.logsumexp temporary each "
        "iteration, no buffer kept, no slices (otcurate.ot._lse's reference); it holds for "
        "every part run, detection's timings included",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.plain_lse:
        otl.LSE_CELLS = 10**18
        otl._workspace = lambda *xs: None
    global REPEATS
    REPEATS = args.repeats
    parts = args.only or ["ot", "steps", "optimizer", "detect"]
    rows: list = []
    if args.plain_lse:
        rows.append({"case": "settings: --plain-lse", "n": 0, "metric": "plain_lse", "value": 1})
    if "ot" in parts:
        ot_vs_pot(args.ot_sizes, args.batched, args.reg, args.iters, rows)
    if "steps" in parts:
        finetune_steps(rows)
    if "optimizer" in parts:
        optimizer_step(rows)
    if "detect" in parts:
        detection_throughput(args.sizes, args.method, args.passes, rows)
    rows = [{"bench": "speed", **r} for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    save("speed", rows, markdown(rows), args.out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
