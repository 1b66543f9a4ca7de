"""The built-in default's result over seeds, and what a change of its params does to it.

For each seed, in a clone-like copy of the project under --work (bench.startup.clone_like):
`otcurate run --set base.seed=<seed>` from nothing (the built-in default, wall clock), then
for each `--variant name=key=value[,key=value...]` the same run with those params set as
well (DVC reruns only the stages they touch; params.yaml is restored from the commit before
every run, so no variant's keys leak into the next). Every figure is read from the run's own
`results/evaluate/metrics.json`: the clean test split, base vs fine-tuned.

Rows {case, seed, metric, value}: case = the variant (`default` for the params as committed);
metrics `seconds` (the run's wall clock: from nothing for `default`, the rerun otherwise),
`base_zs_acc`, `finetune_zs_acc`, `delta_zs_acc` (the zero-shot gain over the base),
`delta_i2t_r1`, `delta_t2i_r1`. The markdown gives mean ± std over seeds and each variant
against the default, paired by seed. Run it alone on the machine.

    .venv/bin/python -m bench.default_run --seeds 0 1 2 --variant steps200=finetune.steps=200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from bench.results_io import RESULTS, command, save
from bench.startup import BIN, ROOT, clone_like, timed

METRICS = ["base_zs_acc", "finetune_zs_acc", "delta_zs_acc", "delta_i2t_r1", "delta_t2i_r1"]


def variant(text: str) -> tuple[str, list[str]]:
    """`name=key=value[,key=value...]` -> (name, ["key=value", ...])."""
    name, _, sets = text.partition("=")
    if not name or "=" not in sets:
        raise argparse.ArgumentTypeError(f"{text!r}: expected name=key=value[,key=value...]")
    return name, sets.split(",")


def one_run(root: Path, seed: int, sets: list[str]) -> dict[str, float]:
    """`otcurate run` with base.seed and `sets` on the committed params; its seconds and
    the evaluate stage's metrics."""
    subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=root, check=True)
    argv = [str(BIN / "otcurate"), "run", "--set", f"base.seed={seed}"]
    for s in sets:
        argv += ["--set", s]
    seconds = timed(argv, root)
    metrics = json.loads((root / "results" / "evaluate" / "metrics.json").read_text())
    return {"seconds": seconds, **{m: float(metrics[m]) for m in METRICS}}


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.4f} ± {sd:.4f}"


def table(rows: list[dict], cases: dict[str, list[str]], seeds: list[int]) -> str:
    got = {(r["case"], r["seed"], r["metric"]): r["value"] for r in rows}
    lines = [
        "# The built-in default over seeds",
        "",
        f"`{command('default_run')}`. Clean test split, from each run's "
        "`results/evaluate/metrics.json`; mean ± std over seeds "
        f"({', '.join(map(str, seeds))}). `seconds`: the default from nothing, a variant's "
        "rerun of the stages its params touch.",
        "",
        "| case | params | base zs | zs gain over the base | i2t R@1 gain | t2i R@1 gain | "
        "zs gain per seed | seconds |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for case, sets in cases.items():

        def vals(metric: str, case: str = case) -> list[float]:
            return [got[case, s, metric] for s in seeds]

        per_seed = ", ".join(f"{v:+.4f}" for v in vals("delta_zs_acc"))
        lines.append(
            f"| {case} | {' '.join(sets) or 'as committed'} | "
            f"{statistics.mean(vals('base_zs_acc')):.4f} | {mean_std(vals('delta_zs_acc'))} | "
            f"{mean_std(vals('delta_i2t_r1'))} | {mean_std(vals('delta_t2i_r1'))} | "
            f"{per_seed} | {statistics.median(vals('seconds')):.1f} |"
        )
    if len(cases) > 1:
        lines += [
            "",
            "Against the default, paired by seed (variant - default):",
            "",
            "| case | zero-shot | i2t R@1 | t2i R@1 |",
            "|---|---:|---:|---:|",
        ]
        for case in list(cases)[1:]:
            diffs = {
                m: [got[case, s, m] - got["default", s, m] for s in seeds]
                for m in ("finetune_zs_acc", "delta_i2t_r1", "delta_t2i_r1")
            }
            lines.append(
                f"| {case} | {mean_std(diffs['finetune_zs_acc'])} | "
                f"{mean_std(diffs['delta_i2t_r1'])} | {mean_std(diffs['delta_t2i_r1'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variant", type=variant, action="append", default=[], metavar="NAME=K=V")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "default_run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="default_run", help="results file stem under --out")
    args = ap.parse_args()
    cases = {"default": [], **dict(args.variant)}
    if len(cases) != len(args.variant) + 1:
        ap.error("variant names must be distinct and not 'default'")
    rows: list[dict] = []
    for seed in args.seeds:
        root = clone_like(args.work / f"seed{seed}")
        for case, sets in cases.items():
            got = one_run(root, seed, sets)
            rows += [{"case": case, "seed": seed, "metric": m, "value": v} for m, v in got.items()]
            print(
                f"[default_run] seed {seed} {case}: zero-shot gain {got['delta_zs_acc']:+.4f}, "
                f"{got['seconds']:.1f} s",
                flush=True,
            )
    save(args.name, rows, table(rows, cases, args.seeds), args.out)
    print(table(rows, cases, args.seeds))


if __name__ == "__main__":
    main()
