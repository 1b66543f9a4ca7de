"""detect: score every train pair's cleanliness and flag the suspected noisy ones.

Writes `<out>/scores.parquet` (uid, score, noisy), `<out>/detector.json` (+ `.safetensors`
for infoot: the fitted plan), the detector `otcurate score` applies to new pairs, and
`<results>/` (metrics.json; plots/scores.png and plots/roc.tsv when planted ground truth exists).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from otcurate.data.shards import read_split
from otcurate.io import atomic_dir, write_json, write_tsv
from otcurate_pipeline import artifacts
from stages._common import main_process, model_logit_scale, parser, read_params, run


def detect(args) -> None:
    base, p = read_params(args.params, "detect")
    truth_t = read_split(args.data, "train", columns=["uid", "noisy"])
    print(f"detect ({p.method}): scoring {truth_t.num_rows} train pairs", flush=True)
    # torch and POT load now, after the params and inputs are read (#18)
    from otcurate import detect as det
    from otcurate.evaluate import plot_score_hist
    from otcurate.runtime import make_reproducible

    make_reproducible(base.seed, base.threads)
    uids, image, text = artifacts.read_embeddings(
        args.embed, "train", truth_t["uid"].to_pylist(), against=args.data
    )
    truth = np.asarray(truth_t["noisy"].to_pylist(), dtype=bool)
    opts = p.method_options()
    scale = model_logit_scale(args.model)
    if getattr(opts, "logit_scale", False) is None:  # null: the pretrained model's own
        opts = dataclasses.replace(opts, logit_scale=scale)
    result = det.detect(
        p.method,
        image,
        text,
        opts,
        fraction=p.fraction,
        threshold=p.threshold,
        auto=p.auto,
        seed=base.seed,
    )
    estimate = det.estimate_rate(result.scores, seed=base.seed)
    share = p.fraction
    # detect.raise_fraction: the fraction is a floor; flag what a bimodal mixture says, if more
    if p.raise_fraction and p.fraction is not None:
        bimodal = det.separation(result.scores, result.noisy, seed=base.seed).bimodal
        share = det.raised_fraction(p.fraction, estimate, bimodal)
        if share > p.fraction:
            result = det.Detection(
                result.scores, det.flag(result.scores, fraction=share, seed=base.seed)
            )
        print(
            f"detect ({p.method}): detect.raise_fraction: flagging {share:.3f} of the pairs "
            f"(detect.fraction {p.fraction:g}; the scores' mixture estimates "
            f"{estimate.rate:.3f}, {'bimodal' if bimodal else 'not bimodal: not followed'})",
            flush=True,
        )
    detector = det.fit_detector(
        p.method, image, text, result, opts, threshold=p.threshold, seed=base.seed
    )
    meta, tensors = det.detector_state(detector)

    metrics: dict[str, float] = {
        "pairs": len(uids),
        "flagged": int(result.noisy.sum()),
        "logit_scale": getattr(opts, "logit_scale", None) or scale,
    }
    if getattr(opts, "trim", "none") == "mixture":
        # set-aside pairs score cosine - 2 (< -1), the kept ones OT's (0, 1] (`ot_score`)
        metrics["trimmed"] = int((result.scores < -0.5).sum())
    has_truth = bool(truth.any())
    if has_truth:
        metrics.update(det.quality(result.scores, result.noisy, truth))
    metrics.update(estimate.metrics("mixture_noise_rate"))  # what the scores suggest
    if not has_truth:
        metrics["est_noise_rate"] = float(result.noisy.mean())
    sep = det.separation(result.scores, result.noisy, truth if has_truth else None, seed=base.seed)
    metrics.update(sep.metrics())
    notes = []  # a mixture splits any scores in two: its rate means something only if bimodal
    if (
        p.fraction is not None
        and not p.raise_fraction
        and sep.bimodal
        and abs(estimate.rate - p.fraction) > 0.05 + 2 * estimate.std
    ):
        notes.append(
            f"detect.fraction is {p.fraction:g} but the scores suggest a noise rate of "
            f"{estimate.rate:.2f} (95% {estimate.low:.2f}-{estimate.high:.2f}); set "
            f"detect.fraction: {estimate.rate:.2f}, or detect.raise_fraction: true to flag "
            "what the scores suggest when it is more"
        )
    with atomic_dir(args.out) as out:
        artifacts.write_scores(out, uids, result.scores, result.noisy)
        artifacts.write_detector(out, meta, tensors)
    with atomic_dir(args.results) as res:
        (res / "plots").mkdir()
        plot_score_hist(
            res / "plots" / "scores.png",
            result.scores,
            truth if has_truth else None,
            f"detect: {p.method} scores on train",
        )
        if has_truth:
            fpr, tpr = det.roc_curve(result.scores, truth)
            write_tsv(res / "plots" / "roc.tsv", {"fpr": fpr, "tpr": tpr})
        write_json(res / "metrics.json", metrics)
    summary = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
    )
    print(f"detect ({p.method}): {summary}")
    if p.auto:
        trust = "" if sep.bimodal else " (the scores are not bimodal: do not trust it)"
        print(
            f"detect ({p.method}): detect.auto flagged {metrics['flagged']} pairs; the noise "
            f"rate the scores suggest: {estimate.rate:.3f} +- {estimate.std:.3f} "
            f"(95% {estimate.low:.3f}-{estimate.high:.3f}){trust}"
        )
    for w in [*sep.warnings, *notes]:
        print(f"detect ({p.method}): warning: {w}", file=sys.stderr)


def main(argv=None) -> int:
    ap = parser("detect", __doc__)
    ap.add_argument("--embed", required=True, help="embed output folder")
    ap.add_argument("--data", required=True, help="ingest output folder (ground truth)")
    ap.add_argument("--model", required=True, help="pretrain output folder (its temperature)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", required=True)
    return run("detect", detect, ap.parse_args(argv))


if __name__ == "__main__":
    main_process(main, __spec__ and __spec__.name)
