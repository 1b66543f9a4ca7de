"""Curation benchmark: coreset selection and dataset distillation against their baselines,
through the pipeline's own stages (`stages.<name>.main` with params overrides).

For each dataset x seed (noise 0.2), in a scratch folder:
- ingest -> pretrain (the base) -> embed -> detect (clip_score, flagging the planted rate);
- coreset at each budget with random / clip_score / kcenter / goracs (unflagged candidates),
  then `finetune` (clip) on the coreset alone; plus `all_clean` (every truly clean train pair);
- distill at each ipc with random_real / wmdd (and wmdd's variants, `DISTILL_PARAMS`), each
  relabelled (the base's soft labels on `--relabel` views per image; finetune learns them by
  KL) or not (`:hard`, pairs);
  then each set alone fine-tuned from the base (`finetune_distill`), a student trained on it
  from a random init by the finetune stage, same steps/lr/batch for every set
  (`scratch_distill`), and the goracs coreset at the middle budget plus the set
  (`finetune_coreset_distill`, against `finetune_coreset` goracs at that budget);
- every model evaluated on the clean test split (zs_acc, i2t_r1, t2i_r1).
Then `goracs` refinement on ALGORITHMS.md's reference problem (15k x 5k, k = 1000), and its
selection time on synthetic 512-d embeddings at 10k, 100k, 1M pairs with the fitted scaling
exponent.

Writes bench/results/curation.json (flat rows) and curation.md. One command:

    .venv/bin/python -m bench.curation                                  # the full grid
    .venv/bin/python -m bench.curation --datasets shapes --seeds 0 --scale 10000   # a slice
    .venv/bin/python -m bench.curation --datasets digits --seeds 1 --scale --no-reference --merge
                                      # redo one cell, keeping the other rows of curation.json
    .venv/bin/python -m bench.curation --budgets 0.1 --coresets random goracs --no-all-clean \
        --scale --no-reference --merge     # the relabel grid (#15), keeping the goracs rows
    .venv/bin/python -m bench.curation --datasets shapes glyphs --budgets 0.1 --coresets goracs \
        --no-all-clean --relabel 16 --distillers random_real wmdd wmdd_real --scale \
        --no-reference --reuse             # distillers only, on the bases an earlier run made
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from bench.quality import DATASETS, PRETRAIN, evaluate_model, workspace
from bench.results_io import save

ROOT = Path(__file__).resolve().parents[1]

CORESETS = ["random", "clip_score", "kcenter", "goracs", "goracs_individual"]
# Bench-only names for a method with options: goracs_individual is goracs without its
# group-level budget split (coreset.goracs.grouped: false), one selection over all pairs.
CORESET_PARAMS = {"goracs_individual": {"method": "goracs", "goracs": {"grouped": False}}}
# Bench-only names for wmdd with options (distill.wmdd): the activation-statistics weight at
# the reference's r_bn for its 10-class sets (Liu-Hy/WMDD run.sh: 0.01; 1.0 is its
# Tiny-ImageNet value), and that with the reference's 1000 synthesis iterations.
DISTILL_PARAMS = {
    "wmdd_stat01": {"method": "wmdd", "wmdd": {"w_stat": 0.01}},
    "wmdd_stat01_1k": {"method": "wmdd", "wmdd": {"w_stat": 0.01, "steps": 1000}},
    # the statistics where the reference takes them: every BatchNorm's input, the stem's x10
    "wmdd_bn": {"method": "wmdd", "wmdd": {"stat_layers": "batchnorm", "first_stat_weight": 10.0}},
    "wmdd_1k": {"method": "wmdd", "wmdd": {"steps": 1000}},
    # a stronger pull to the barycenter point, and more weight on the statistics
    "wmdd_feat10": {"method": "wmdd", "wmdd": {"w_feat": 10.0}},
    "wmdd_stat10": {"method": "wmdd", "wmdd": {"w_stat": 10.0}},
    # from the real pair nearest each barycenter point instead of noise
    "wmdd_real": {"method": "wmdd", "wmdd": {"init": "real"}},
}
DISTILLERS = ["random_real", "wmdd", *DISTILL_PARAMS]
METRICS = ("zs_acc", "i2t_r1", "t2i_r1")


def one(dataset: str, seed: int, work: Path, args) -> list[dict]:

    from otcurate.data.shards import read_split

    rows: list[dict] = []

    def row(stage: str, setting, method: str, metric: str, value) -> None:
        rows.append(
            {
                "bench": "curation",
                "dataset": dataset,
                "noise": args.noise,
                "seed": seed,
                "stage": stage,
                "setting": setting,
                "method": method,
                "metric": metric,
                "value": float(value),
            }
        )

    common = {
        "base": {"seed": seed},
        "ingest": DATASETS[dataset] | {"noise": {"rate": args.noise}},
        "pretrain": PRETRAIN[dataset],
        "detect": {"method": "clip_score", "fraction": args.noise},
        "finetune": {"method": "clip", "steps": args.steps, "lr": args.lr},
    }
    cell = work / f"{dataset}-{seed}"
    known = cell / "params.yaml"
    before = yaml.safe_load(known.read_text()) if args.reuse and known.exists() else {}
    ws = workspace(cell, common)
    # --reuse: a cell run before with the same params up to the coreset keeps its base,
    # embeddings, flags, coresets and the models fine-tuned on them (each written
    # atomically: present means whole); every distilled set and its models are made again
    upstream = ("base", "ingest", "pretrain", "embed", "detect", "coreset", "finetune")
    reuse = args.reuse and all(before.get(k) == ws.params.get(k) for k in upstream)
    flags = "data/detect-clip_score"
    if not (reuse and (cell / flags).exists()):
        ws.check("ingest")  # dvc.yaml's paths (data/ingest, models/pretrain, ...) unless renamed
        ws.check("pretrain")
        ws.check("embed")
        ws.check("detect", out=flags)

    def evaluate(stage: str, setting, method: str, model: str) -> None:
        for k, v in evaluate_model(ws, model, Path(model).name).items():
            if k in METRICS:
                row(stage, setting, method, k, v)

    evaluate("base", "-", "base", "models/pretrain")

    def write_subset(name: str, uids: list[str]) -> str:
        from otcurate.io import atomic_dir
        from otcurate_pipeline import artifacts

        with atomic_dir(ws.root / "data" / name) as out:
            artifacts.write_subset(out, uids, [1.0] * len(uids), [0.0] * len(uids))
        return f"data/{name}"

    def finetune(coreset: str, distill: str, out: str) -> str:
        ws.check(
            "finetune",
            coreset=coreset,
            detect=flags,
            distill=distill,
            out=f"models/{out}",
            results=f"results/{out}",
        )
        return f"models/{out}"

    def distill(method: str, ipc: int, coreset: str, out: str) -> float:
        over = {"distill": {"method": method, "ipc": ipc}}
        return ws.check(
            "distill",
            over,
            detect=flags,
            coreset=coreset,
            out=f"data/{out}",
            results=f"results/{out}",
        )

    # Coreset alone: an empty distilled set beside it (bench-only empty subset file).
    empty = write_subset("coreset-empty", [])
    distill("random_real", 0, empty, "distill-none")
    for budget in args.budgets:
        for method in args.coresets:
            tag = f"coreset-{method}-{budget}"
            params = CORESET_PARAMS.get(method, {"method": method})
            if not (reuse and (cell / "models" / f"ft-{tag}" / "model.safetensors").exists()):
                sec = ws.check(
                    "coreset",
                    {"coreset": {**params, "fraction": budget}},
                    detect=flags,
                    out=f"data/{tag}",
                    results=f"results/{tag}",
                )
                row("coreset", budget, method, "seconds", sec)
                finetune(f"data/{tag}", "data/distill-none", f"ft-{tag}")
            if params["method"] == "goracs":
                m = ws.metrics(f"results/{tag}")
                for k in ("objective_greedy", "objective_refined", "swaps"):
                    row("coreset", budget, method, k, m[k])
            evaluate("finetune_coreset", budget, method, f"models/ft-{tag}")
    if args.all_clean:
        truth = read_split(ws.p("data/ingest"), "train", columns=["uid", "noisy"])
        pairs = zip(truth["uid"].to_pylist(), truth["noisy"].to_pylist(), strict=True)
        clean = write_subset("coreset-all_clean", [u for u, noisy in pairs if not noisy])
        model = finetune(clean, "data/distill-none", "ft-all_clean")
        evaluate("finetune_coreset", "all", "all_clean", model)

    # Distilled sets, relabelled (":soft<min_scale>": soft labels from the base on augmented
    # views of each image) or not (":hard", the set read as pairs). Each alone,
    # fine-tuned from the base; each alone, a student trained from a random init with the
    # same protocol (finetune stage, same steps, lr and batch for every set); and beside the
    # pipeline's coreset (goracs at the middle budget), against that coreset alone.
    init = scratch_init(ws, seed)
    combo = f"data/coreset-goracs-{args.budgets[len(args.budgets) // 2]}"
    scratch = {  # BatchNorm trains on the soft-labelled views, as it does on the pairs
        "finetune": {
            "steps": args.scratch_steps, "batch_size": 64, "lr": 1e-3, "warmup": 10,
            "soft_labels": {"batch_norm": "batch"},
        }
    }  # fmt: skip
    for ipc in args.ipc:
        for method in args.distillers:
            for spec in args.relabel:
                views, _, scale = spec.partition(":")
                relabel = {"views": int(views)} | ({"min_scale": float(scale)} if scale else {})
                name = f"{method}:soft{scale or ''}" if int(views) else f"{method}:hard"
                tag = f"distill-{method}-{ipc}-{spec.replace(':', '-')}"
                params = DISTILL_PARAMS.get(method, {"method": method})
                over = {"distill": params | {"ipc": ipc, "relabel": relabel}}
                sec = ws.check(
                    "distill", over, detect=flags, coreset=empty,
                    out=f"data/{tag}", results=f"results/{tag}",
                )  # fmt: skip
                row("distill", ipc, name, "seconds", sec)
                m = ws.metrics(f"results/{tag}")
                for k in (
                    "synthetic_zs_acc",
                    "relabel_teacher_view_acc",
                    "relabel_teacher_entropy",
                ):
                    if k in m:
                        row("distill", ipc, name, k, m[k])
                evaluate("finetune_distill", ipc, name, finetune(empty, f"data/{tag}", f"ft-{tag}"))
                out = f"scratch-{tag}"
                ws.check(
                    "finetune", scratch, model=init, coreset=empty, detect=flags,
                    distill=f"data/{tag}", out=f"models/{out}", results=f"results/{out}",
                )  # fmt: skip
                evaluate("scratch_distill", ipc, name, f"models/{out}")
                both = finetune(combo, f"data/{tag}", f"ft-goracs-{tag}")
                evaluate("finetune_coreset_distill", ipc, name, both)
    return rows


def scratch_init(ws, seed: int) -> str:
    """A randomly initialised model of the params' arch (seeded), in pretrain's format: the
    starting point of every from-scratch student."""
    import torch

    from otcurate import models
    from otcurate.io import atomic_dir

    rel = f"models/init-{seed}"
    if not Path(ws.p(rel), "model.safetensors").exists():
        torch.manual_seed(seed)
        with atomic_dir(ws.p(rel)) as out:
            models.save(models.create(ws.params["pretrain"]["arch"]), out)
    return rel


def synthetic(n: int, n_target: int, seed: int):
    """Unit-norm 512-d image and text embeddings around 50 shared centres (noise 0.3), for
    ``n`` candidates and ``n_target`` target pairs: float32 (n, 512) x 2, (n_target, 512) x 2."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(50, 512, generator=g), dim=1)

    def around(labels):
        noise = 0.3 * torch.randn(len(labels), 512, generator=g)
        return torch.nn.functional.normalize(centres[labels] + noise, dim=1)

    lab = torch.randint(0, 50, (n,), generator=g)
    tl = torch.randint(0, 50, (n_target,), generator=g)
    return around(lab), around(lab), around(tl), around(tl)


def scaling(sizes: list[int], seed: int, frac: float) -> list[dict]:
    """goracs selection seconds on synthetic 512-d embeddings (clustered, unit norm)."""
    import numpy as np

    from otcurate import coreset as cs

    rows = []
    for n in sizes:
        img, txt, t_img, t_txt = synthetic(n, 2000, seed)
        pool = cs.Pool(
            np.arange(n),
            img,
            txt,
            np.zeros(n),
            target_image=t_img,
            target_text=t_txt,
            logit_scale=50.0,
        )
        k = max(10, int(frac * n))
        t0 = time.perf_counter()
        opts = cs.GoracsOptions(groups=10, target_max=1000, candidate_max=20000)
        sel = cs.select("goracs", pool, k, opts, seed=seed)
        sec = time.perf_counter() - t0
        print(
            f"[curation] goracs n={n} k={k}: {sec:.1f} s, candidates {sel.info['candidates_after_preclustering']}",
            flush=True,
        )
        for metric, value in (
            ("seconds", sec),
            ("k", k),
            ("candidates_after_preclustering", sel.info["candidates_after_preclustering"]),
        ):
            rows.append(
                {
                    "bench": "curation",
                    "case": "goracs_selection",
                    "n": n,
                    "metric": metric,
                    "value": float(value),
                }
            )
    if len(sizes) > 1:
        x = np.log([r["n"] for r in rows if r["metric"] == "seconds"])
        y = np.log([r["value"] for r in rows if r["metric"] == "seconds"])
        rows.append(
            {
                "bench": "curation",
                "case": "goracs_selection",
                "n": max(sizes),
                "metric": "scaling_exponent",
                "value": float(np.polyfit(x, y, 1)[0]),
            }
        )
    return rows


def reference_cost(img, txt, t_img, t_txt):
    """ALGORITHMS.md's reference example's GORACS cost on `synthetic`'s embeddings (15k
    train x 5k target pairs): lambda 0.5, the gradient norms at logit scale 50."""
    from otcurate import coreset as cs

    grad = cs.contrastive_grad_norms(img, txt, 50.0).double()
    feat = cs.pair_features(img, txt).double()
    return cs.goracs_cost(feat, cs.pair_features(t_img, t_txt).double(), grad, 0.5).numpy()


def reference(seed: int, max_iters: int, cut_num: int) -> list[dict]:
    """ALGORITHMS.md's reference example: 15k train x 5k target, lambda 0.5, k = 1000, one
    group. Objective after greedy and after refinement, seconds of each stage."""

    from otcurate import coreset as cs

    pairs = synthetic(15_000, 5_000, seed)
    t0 = time.perf_counter()
    cost = reference_cost(*pairs)
    t1 = time.perf_counter()
    first = cs.greedy_kmedian(cost, 1000)
    greedy_obj = cs.ot_objective(cost[first])[0]
    t2 = time.perf_counter()
    _, refined, swaps, evals = cs.swap_refine(cost, first, max_iters=max_iters, cut_num=cut_num)
    t3 = time.perf_counter()
    print(
        f"[curation] reference 15k x 5k, k=1000: greedy {greedy_obj:.4f} -> refined {refined:.4f} "
        f"({100 * (greedy_obj - refined) / greedy_obj:.1f}% lower), {swaps} swaps, "
        f"{evals} exact solves, refinement {t3 - t2:.1f} s",
        flush=True,
    )
    values = {
        "objective_greedy": greedy_obj,
        "objective_refined": refined,
        "refinement_cut": (greedy_obj - refined) / greedy_obj,
        "swaps": swaps,
        "exact_solves": evals,
        "max_iters": max_iters,
        "cut_num": cut_num,
        "seconds_cost": t1 - t0,
        "seconds_greedy": t2 - t1,
        "seconds_refine": t3 - t2,
    }
    return [
        {
            "bench": "curation",
            "case": "goracs_reference",
            "n": 15_000,
            "metric": m,
            "value": float(v),
        }
        for m, v in values.items()
    ]


SECTIONS = (
    ("base", "the base model (pre-trained on the noisy train split)", list(METRICS)),
    (
        "coreset",
        "coreset selection (budget = fraction of train)",
        ["seconds", "objective_greedy", "objective_refined", "swaps"],
    ),
    ("finetune_coreset", "fine-tuned from the base on the coreset alone", list(METRICS)),
    (
        "distill",
        "distillation (ipc = images per class; `:hard` = no relabel, the set read as pairs)",
        ["seconds", "synthetic_zs_acc", "relabel_teacher_view_acc", "relabel_teacher_entropy"],
    ),
    ("finetune_distill", "fine-tuned from the base on the distilled set alone", list(METRICS)),
    (
        "scratch_distill",
        "a student trained from a random init on the distilled set alone (same protocol for every set)",
        list(METRICS),
    ),
    (
        "finetune_coreset_distill",
        "fine-tuned from the base on the goracs coreset (middle budget) + the distilled set",
        list(METRICS),
    ),
)


def table(rows: list[dict]) -> str:
    from collections import defaultdict

    import numpy as np

    agg: dict = defaultdict(list)
    for r in rows:
        if "dataset" in r:
            agg[(r["stage"], r["dataset"], str(r["setting"]), r["method"], r["metric"])].append(
                r["value"]
            )
    out = [
        "# Curation benchmark",
        "",
        "Mean ± std over seeds (n = seeds); clean test split; planted noise as in the rows' `noise`. "
        "Generated by `bench/curation.py` (its arguments decide the slice).",
        "",
    ]
    for stage, title, metrics in SECTIONS:
        keys = sorted({(d, k, m) for (s, d, k, m, _) in agg if s == stage})
        if not keys:
            continue
        out += [
            f"## {title}",
            "",
            "| dataset | setting | method | " + " | ".join(metrics) + " | n |",
            "|---|---|---|" + "---:|" * (len(metrics) + 1),
        ]
        for d, k, m in keys:
            vals = [agg.get((stage, d, k, m, x), []) for x in metrics]
            cells = ["—" if not v else f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in vals]
            out.append(
                f"| {d} | {k} | {m} | " + " | ".join(cells) + f" | {max(len(v) for v in vals)} |"
            )
        out.append("")
    ref = {r["metric"]: r["value"] for r in rows if r.get("case") == "goracs_reference"}
    if ref:
        out += [
            "## goracs refinement on the reference problem (synthetic 512-d, 15k candidates x 5k target, k = 1000, lambda 0.5, one group)",
            "",
            f"max_iters {ref['max_iters']:.0f}, cut_num {ref['cut_num']:.0f}.",
            "",
            "| objective after greedy | after refinement | cut | swaps | exact solves | cost s | greedy s | refinement s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {ref['objective_greedy']:.4f} | {ref['objective_refined']:.4f} | "
            f"{100 * ref['refinement_cut']:.1f}% | {ref['swaps']:.0f} | {ref['exact_solves']:.0f} | "
            f"{ref['seconds_cost']:.1f} | {ref['seconds_greedy']:.1f} | {ref['seconds_refine']:.1f} |",
            "",
        ]
    scale = [r for r in rows if r.get("case") == "goracs_selection"]
    if scale:
        out += [
            "## goracs selection time (synthetic 512-d, k = 1% of n, target 1000, candidates pre-clustered to about 20000)",
            "",
            "| n | k | candidates after pre-clustering | seconds |",
            "|---:|---:|---:|---:|",
        ]
        for n in sorted({r["n"] for r in scale if r["metric"] == "seconds"}):
            get = {
                r["metric"]: r["value"]
                for r in scale
                if r["n"] == n and r["metric"] != "scaling_exponent"
            }
            out.append(
                f"| {n} | {get['k']:.0f} | {get['candidates_after_preclustering']:.0f} | {get['seconds']:.1f} |"
            )
        exp = [r["value"] for r in scale if r["metric"] == "scaling_exponent"]
        if exp:
            out += ["", f"Fitted scaling exponent (log seconds on log n): {exp[0]:.2f}"]
        out.append("")
    out += verdicts(rows)
    return "\n".join(out)


def verdicts(rows: list[dict]) -> list[str]:
    """The curation issue's targets, each a difference paired by dataset and seed (mean ± std
    over seeds, per dataset), with whether the mean meets the target."""
    from collections import defaultdict

    import numpy as np

    val: dict = {}
    for r in rows:
        if "dataset" in r:
            key = (r["dataset"], r["seed"], r["stage"], str(r["setting"]), r["method"], r["metric"])
            val[key] = r["value"]
    datasets = sorted({k[0] for k in val})
    seeds = sorted({k[1] for k in val})
    lines = []

    def paired(name, a, b, metric, target, cmp=">="):
        for d in datasets:
            diffs = [
                val[(d, s, *a, metric)] - val[(d, s, *b, metric)]
                for s in seeds
                if (d, s, *a, metric) in val and (d, s, *b, metric) in val
            ]
            if not diffs:
                continue
            m = float(np.mean(diffs))
            ok = m >= target if cmp == ">=" else m <= target
            lines.append(
                f"| {name} | {d} | {metric} | {m:+.3f} ± {np.std(diffs):.3f} | {len(diffs)} | "
                f"{cmp} {target:+.3f} | {'met' if ok else 'MISSED'} |"
            )

    labels = defaultdict(set)
    for _, _, stage, setting, method, _ in val:
        if stage in ("scratch_distill", "finetune_distill", "finetune_coreset_distill"):
            base, _, mode = method.partition(":")
            labels[(stage, setting)].add(mode)
    wmdds = sorted(
        {k[4].partition(":")[0] for k in val if k[2] == "scratch_distill"} - {"random_real"}
    )
    for stage, target in (("scratch_distill", 0.05), ("finetune_distill", 0.0)):
        for (st, ipc), modes in sorted(labels.items()):
            if st != stage:
                continue
            for wmdd in wmdds:
                for mode in sorted(modes):
                    paired(
                        f"{stage} ipc {ipc}: {wmdd}:{mode} − random_real:{mode}",
                        (stage, ipc, f"{wmdd}:{mode}"), (stage, ipc, f"random_real:{mode}"),
                        "zs_acc", target,
                    )  # fmt: skip
    budgets = sorted({k[3] for k in val if k[2] == "finetune_coreset" and k[4] == "goracs"})
    for (st, ipc), modes in sorted(labels.items()):
        if st != "finetune_coreset_distill" or not budgets:
            continue
        mid = budgets[len(budgets) // 2]
        for method in ("random_real", *wmdds):
            for mode in sorted(modes):
                for metric in ("zs_acc", "i2t_r1"):
                    paired(
                        f"coreset + {method}:{mode} (ipc {ipc}) − coreset alone (goracs {mid})",
                        (st, ipc, f"{method}:{mode}"), ("finetune_coreset", mid, "goracs"),
                        metric, -0.005,
                    )  # fmt: skip
    for b in budgets:
        paired(
            f"goracs − random coreset at {b}",
            ("finetune_coreset", b, "goracs"), ("finetune_coreset", b, "random"), "zs_acc", 0.03,
        )  # fmt: skip
    for b in budgets:
        for metric in ("zs_acc", "i2t_r1"):
            paired(
                f"goracs per group − goracs_individual at {b}",
                ("finetune_coreset", b, "goracs"), ("finetune_coreset", b, "goracs_individual"),
                metric, 0.0,
            )  # fmt: skip
    ref = {r["metric"]: r["value"] for r in rows if r.get("case") == "goracs_reference"}
    if ref:
        cut, sec = ref["refinement_cut"], ref["seconds_refine"]
        lines.append(
            f"| goracs refinement cut on the reference problem | synthetic | objective | "
            f"{100 * cut:.1f}% in {sec:.0f} s | 1 | >= 8% in <= 120 s | "
            f"{'met' if cut >= 0.08 and sec <= 120 else 'MISSED'} |"
        )
    if not lines:
        return []
    return [
        "## Against the targets (paired by dataset and seed)",
        "",
        "| comparison | dataset | metric | difference | seeds | target | verdict |",
        "|---|---|---|---:|---:|---|---|",
        *lines,
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    ap.add_argument(
        "--no-all-clean", dest="all_clean", action="store_false",
        help="skip the all-clean-pairs reference fine-tune",
    )  # fmt: skip
    ap.add_argument(
        "--ipc", nargs="*", type=int, default=[10], help="none: no distilled sets (coresets only)"
    )
    ap.add_argument(
        "--relabel",
        nargs="+",
        default=["16", "0"],
        help="distill.relabel for each distilled set, as VIEWS[:MIN_SCALE] (0 = no relabel: "
        "hard pairs); rows name them method:softMIN_SCALE or method:hard",
    )
    ap.add_argument("--coresets", nargs="+", default=CORESETS, choices=CORESETS)
    ap.add_argument("--distillers", nargs="+", default=DISTILLERS, choices=DISTILLERS)
    ap.add_argument(
        "--steps", type=int, default=200, help="fine-tuning steps, equal for every method"
    )
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--scratch-steps", type=int, default=300)
    ap.add_argument("--scale", nargs="*", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument(
        "--reference",
        nargs=2,
        type=int,
        default=[300, 10],
        metavar=("MAX_ITERS", "CUT_NUM"),
        help="the 15k x 5k, k = 1000 reference problem with these refinement settings",
    )
    ap.add_argument("--no-reference", dest="reference", action="store_const", const=None)
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing curation.json that this run does not redo",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep a cell's base, flags, coresets and their fine-tuned models from an earlier "
        "run with the same params up to the coreset (coreset seconds rows are then left out)",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "curation")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    rows: list[dict] = []
    if args.merge and (args.out / "curation.json").exists():
        redo = {(d, s) for d in args.datasets for s in args.seeds}
        cases = {"goracs_selection"} if args.scale else set()
        cases |= {"goracs_reference"} if args.reference else set()
        rows = [
            r
            for r in json.loads((args.out / "curation.json").read_text())
            if (r.get("dataset"), r.get("seed")) not in redo and r.get("case") not in cases
        ]

    def checkpoint():  # after each slice, so an interrupted grid keeps what it finished
        save("curation", rows, table(rows), args.out)

    for d in args.datasets:
        for s in args.seeds:
            t0 = time.perf_counter()
            rows += one(d, s, args.work, args)
            print(f"[curation] {d} seed={s}: {time.perf_counter() - t0:.0f} s", flush=True)
            checkpoint()
    if args.reference:
        rows += reference(0, *args.reference)
        checkpoint()
    if args.scale:
        rows += scaling(args.scale, 0, 0.01)
        checkpoint()
    print(table(rows))


if __name__ == "__main__":
    main()
