"""evaluate: base vs fine-tuned on the clean sets of evaluate.sets and on the test split.

Zero-shot accuracy (class-name prompts), image->text and text->image recall@k,
and detection quality from `detect`. Writes `<results>/metrics.json`,
`<results>/report.md` and `<results>/plots/{comparison,scores}.png`.
"""

from __future__ import annotations

import numpy as np

from otcurate.data.shards import read_classes, read_provenance, read_split
from otcurate.io import atomic_dir, write_json, write_text
from otcurate_pipeline import artifacts
from stages._common import StageError, main_process, parser, read_params, run


def _load_sets(sets) -> list:
    from otcurate.data.evalsets import load_clean
    from otcurate.data.hf import SourceError

    out = []
    for i, spec in enumerate(sets):
        try:
            cset = load_clean(spec, key=f"evaluate.sets[{i}].hf")
        except (SourceError, ValueError) as exc:
            raise StageError(f"evaluate.sets[{i}] ({spec.name}): {exc}") from exc
        if not cset.images:
            raise StageError(f"evaluate.sets {spec.name}: the source gave no usable pairs.")
        out.append((spec, cset))
    return out


def evaluate(args) -> None:
    base, p = read_params(args.params, "evaluate")
    test = read_split(args.data, "test", columns=["image", "caption", "label"])
    if test.num_rows == 0:
        raise StageError(f"the test split in {args.data} is empty; raise ingest.test_fraction.")
    shown_sets = f" and {len(p.sets)} clean set(s)" if p.sets else ""
    print(f"evaluate: base and fine-tuned on {test.num_rows} test pairs{shown_sets}", flush=True)
    # torch and open_clip load now, after the params and inputs are read (#18)
    from otcurate import detect as det
    from otcurate import evaluate as ev
    from otcurate import models
    from otcurate.runtime import make_reproducible, resolve_device

    device = resolve_device(base.device)
    make_reproducible(base.seed, base.threads, device)
    info = read_classes(args.data)
    sets = _load_sets(p.sets)

    def measure(clip) -> dict[str, float]:
        got = ev.split_metrics(clip, test, info, p.recall_at, p.batch_size)
        for spec, cset in sets:
            try:
                m = ev.clean_set_metrics(
                    clip, cset, spec.task, spec.templates, p.recall_at, p.batch_size
                )
            except ValueError as exc:
                raise StageError(f"evaluate.sets {spec.name}: {exc}") from exc
            got.update({f"{spec.name}_{k}": v for k, v in m.items()})
        return got

    rows = {}
    for name, folder in (("base", args.base), ("finetune", args.finetuned)):
        rows[name] = measure(models.load(folder, device=device))
    unmixed = models.load_unmixed(args.finetuned, device=device)  # WiSE-FT was on
    if unmixed is not None:
        rows["unmixed"] = measure(unmixed)

    truth_t = read_split(args.data, "train", columns=["uid", "noisy"])
    scores = artifacts.read_scores(args.detect, truth_t["uid"].to_pylist(), against=args.data)
    s, flags = scores.score, scores.noisy
    truth = np.asarray(truth_t["noisy"].to_pylist(), dtype=bool)
    detection = (
        det.quality(s, flags, truth) if truth.any() else {"est_noise_rate": float(flags.mean())}
    )

    metrics = {f"{m}_{k}": v for m, r in rows.items() for k, v in r.items()}
    metrics.update({f"detect_{k}": v for k, v in detection.items()})
    for k in rows["base"]:
        metrics[f"delta_{k}"] = rows["finetune"][k] - rows["base"][k]
    zs_sets = [s.name for s, _ in sets if f"{s.name}_zs_acc" in rows["base"]]
    for name in zs_sets:  # forgetting: zero-shot lost on a clean set (> 0: forgot)
        for model in ("finetune", "unmixed"):
            if model in rows:
                metrics[f"forgetting_{model}_{name}"] = (
                    rows["base"][f"{name}_zs_acc"] - rows[model][f"{name}_zs_acc"]
                )

    clean = bool(read_provenance(args.data).get("held_out_clean", False))
    metrics["test_split_clean"] = float(clean)
    shown = [k for k in ev.HEADLINE if k in rows["base"]]
    described = [(spec.name, ev.describe_set(cset, spec.task)) for spec, cset in sets]
    report = ev.report_markdown(rows, shown, described, detection, test.num_rows, clean, zs_sets)
    split = "clean test split" if clean else "held-out test split, may contain noise"
    with atomic_dir(args.results) as res:
        (res / "plots").mkdir()
        ev.plot_comparison(
            res / "plots" / "comparison.png", rows, shown, f"base vs fine-tuned ({split})"
        )
        ev.plot_score_hist(
            res / "plots" / "scores.png",
            s,
            truth if truth.any() else None,
            "detection scores on train",
        )
        write_text(res / "report.md", report)
        write_json(res / "metrics.json", metrics)
    print(ev.headline_table(rows, shown))


def main(argv=None) -> int:
    ap = parser("evaluate", __doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--base", required=True, help="pretrain output folder")
    ap.add_argument("--finetuned", required=True, help="finetune output folder")
    ap.add_argument("--detect", required=True)
    ap.add_argument("--results", required=True)
    return run("evaluate", evaluate, ap.parse_args(argv))


if __name__ == "__main__":
    main_process(main, __spec__ and __spec__.name)
