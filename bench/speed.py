"""Speed benchmark: the OT layer vs POT, detection throughput and its scaling, NCU vs CLIP steps.

    .venv/bin/python -m bench.speed                    # everything (the 1M point takes a while on 2 CPU cores)
    .venv/bin/python -m bench.speed --sizes 10000 100000

Writes bench/results/speed.json (flat rows {"bench": "speed", "case", "n", "metric", "value"})
and speed.md. Times are wall-clock medians over repeats, measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import platform
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


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def marginal_error(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    return float((P.sum(-1) - a).abs().sum() + (P.sum(-2) - b).abs().sum())


def ot_vs_pot(sizes, batch: int, reg: float, iters: int, rows: list) -> None:
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_ours, r = timed(
                lambda a=a, M=M: otl.sinkhorn_log(a, a, M, reg, max_iter=iters, tol=0.0)
            )
            t_pot, P = timed(
                lambda a=a, M=M: ot.sinkhorn(
                    a, a, M, reg, method="sinkhorn_log", numItermax=iters, stopThr=0.0
                )
            )
        e_ours, e_pot = marginal_error(r.plan, a, a), marginal_error(P, a, a)
        case = f"sinkhorn_log B={B}"
        rows += [
            {"case": case, "n": B, "metric": "seconds_ours", "value": t_ours},
            {"case": case, "n": B, "metric": "seconds_pot", "value": t_pot},
            {"case": case, "n": B, "metric": "ratio_vs_pot", "value": t_ours / t_pot},
            {"case": case, "n": B, "metric": "marginal_error_ours", "value": e_ours},
            {"case": case, "n": B, "metric": "marginal_error_pot", "value": e_pot},
        ]
        print(
            f"{case}: ours {t_ours:.3f}s (err {e_ours:.1e}) vs POT {t_pot:.3f}s (err {e_pot:.1e})",
            flush=True,
        )
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_ours, _ = timed(lambda: otl.sinkhorn_log(a, a, Ms, reg, max_iter=iters, tol=0.0))
        t_pot, _ = timed(
            lambda: [
                ot.sinkhorn(a, a, Ms[i], reg, method="sinkhorn_log", numItermax=iters, stopThr=0.0)
                for i in range(batch)
            ]
        )
    case = f"sinkhorn_log batched {batch}x{B}"
    rows += [
        {"case": case, "n": batch * B, "metric": "seconds_ours", "value": t_ours},
        {"case": case, "n": batch * B, "metric": "seconds_pot", "value": t_pot},
        {"case": case, "n": batch * B, "metric": "ratio_vs_pot", "value": t_ours / t_pot},
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
            t, _ = timed(
                lambda img=img, txt=txt: det.score(method, img, txt, passes=passes, seed=0),
                repeats=1,
            )
        rows += [
            {"case": f"detect {method} passes={passes}", "n": n, "metric": "seconds", "value": t},
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


def ncu_vs_clip_step(rows: list, steps: int = 10) -> None:
    from otcurate import models
    from otcurate.data import builtin
    from otcurate.ncu import NCUOptions, finetune_ncu
    from otcurate.train import train_contrastive

    recs = [builtin.shapes_record(0, i) for i in range(256)]
    times = {}
    for name in ("clip", "ncu"):
        torch.manual_seed(0)
        clip = models.create("otcurate-tiny")
        x, t = models.pairs_to_tensors([r.image for r in recs], [r.caption for r in recs], clip)
        noisy = np.zeros(len(recs), dtype=bool)
        noisy[::5] = True
        # The first call warms up allocators and kernels; the second is timed.
        for n_steps in (2, steps):
            kw = dict(steps=n_steps, batch_size=128, lr=1e-4, warmup=0, weight_decay=0.2, seed=0)
            t0 = time.perf_counter()
            if name == "clip":
                train_contrastive(clip.model, x, t, **kw)
            else:  # phase B steps only: the unlearning step that runs for most of the budget
                opts = NCUOptions(phase_a_fraction=0.0)
                finetune_ncu(clip.model, x, t, opts, noisy=noisy, **kw)
            times[name] = (time.perf_counter() - t0) / n_steps
    rows += [
        {
            "case": "finetune step otcurate-tiny B=128",
            "n": 128,
            "metric": "seconds_clip_step",
            "value": times["clip"],
        },
        {
            "case": "finetune step otcurate-tiny B=128",
            "n": 128,
            "metric": "seconds_ncu_step",
            "value": times["ncu"],
        },
        {
            "case": "finetune step otcurate-tiny B=128",
            "n": 128,
            "metric": "ncu_over_clip_step",
            "value": times["ncu"] / times["clip"],
        },
    ]
    print(
        f"step: clip {times['clip']:.3f}s, ncu (phase B) {times['ncu']:.3f}s, ratio {times['ncu'] / times['clip']:.2f}",
        flush=True,
    )


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
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list = []
    ot_vs_pot(args.ot_sizes, args.batched, args.reg, args.iters, rows)
    ncu_vs_clip_step(rows)
    detection_throughput(args.sizes, args.method, args.passes, rows)
    rows = [{"bench": "speed", **r} for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    save("speed", rows, markdown(rows), args.out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
