"""`otcurate score`: new pairs scored by the detector that `detect` fitted (no refit), written
as detect's scores artifact plus a summary and a report of the most suspected pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from otcurate_pipeline import artifacts, layout
from otcurate_pipeline.params import load_all, read_file

REPORTS = Path("results") / "score"  # <root>/results/score/<source name> unless --out


class ScoreError(ValueError):
    """Bad input to `otcurate score`; the message says what to do."""


@dataclass(frozen=True)
class ScoreReport:
    out: Path
    summary: dict
    suspected: list[tuple[int, float, str]]  # (source index, score, caption), most suspected first

    def line(self) -> str:
        s = self.summary
        return (
            f"{s['method']} ({s['scorer']}), cutoff {s['cutoff']:.4f}: "
            f"{s['flagged']}/{s['pairs']} flagged, {s['rejected']} unreadable -> {self.out}"
        )


def score_source(
    root: Path,
    source: Path,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    model: Path | None = None,
    detector: Path | None = None,
    out: Path | None = None,
    top: int = 10,
) -> ScoreReport:
    """Score the pairs of `source` (a file or folder a local `hf` source can read) with the
    detector in `detector` (default: dvc.yaml's detect out) on the embeddings of `model`
    (default: the model detect scored with); columns default to params.yaml's ingest.hf."""
    import numpy as np
    import pyarrow as pa
    import torch

    from otcurate import detect as det
    from otcurate import models
    from otcurate.data.hf import SourceError, load_pairs, local_source
    from otcurate.io import atomic_dir, write_json, write_text
    from otcurate.runtime import make_reproducible, resolve_device

    params = load_all(read_file(root / "params.yaml"))
    hf = params["ingest"].hf
    if source.is_file() and source.stat().st_size == 0:
        raise ScoreError(f"{source} is empty; give a file with one image-text pair per row.")
    try:
        pairs, _, _ = load_pairs(
            **local_source(source),
            image_column=image_column or hf.image_column,
            caption_column=caption_column or hf.caption_column,
            key="score",
        )
        rows = list(pairs)
    except SourceError as exc:
        text = str(exc).replace("score.image_column", "--image-column")
        text = text.replace("Check score.path, data_dir and data_files.", "Check the path.")
        raise ScoreError(text.replace("score.caption_column", "--caption-column")) from None
    stage = layout.stages(root).get("detect")
    if stage is None and (model is None or detector is None):
        raise ScoreError("dvc.yaml has no detect stage: give --model and --detector.")
    wired = stage.paths if stage else {}
    model, detector = root / (model or wired["model"]), root / (detector or wired["out"])
    try:
        fitted = det.detector_from_state(*artifacts.read_detector(detector))
    except FileNotFoundError:
        raise ScoreError(
            f"no fitted detector at {detector / artifacts.DETECTOR}; run the pipeline first "
            "(otcurate run)."
        ) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ScoreError(
            f"{detector / artifacts.DETECTOR} was saved by another otcurate version ({exc!r}); "
            "rerun detect (otcurate run) to refit it."
        ) from None
    good = [r for r in rows if r.reject is None]
    rejected = len(rows) - len(good)
    if len(good) < 2:
        raise ScoreError(
            f"{source}: {len(good)} usable pairs ({rejected} rejected); need at least 2."
        )
    device = resolve_device(params["base"].device)
    make_reproducible(params["base"].seed, params["base"].threads, device)
    clip = models.load(model, device=device)
    image, text = models.encode(
        clip, *models.pairs_to_tensors([r.image for r in good], [r.caption for r in good], clip)
    )
    with torch.no_grad():
        found = det.score_new(fitted, image, text)
    out = root / (out or REPORTS / source.resolve().name.split(".")[0])
    summary = {
        "source": str(source),
        "method": fitted.method,
        "scorer": "infoot conditional projection"
        if fitted.fit is not None
        else "method's own rule",
        "cutoff": fitted.cutoff,
        "pairs": len(good),
        "rejected": rejected,
        "flagged": int(found.noisy.sum()),
        "flagged_fraction": float(found.noisy.mean()),
    }
    order = np.argsort(found.scores, kind="stable")[: min(top, summary["flagged"])]
    suspected = [(good[i].index, float(found.scores[i]), str(good[i].caption)[:80]) for i in order]
    lines = ["| index | score | caption |", "|---:|---:|---|"]
    lines += [f"| {i} | {s:.4f} | {c} |" for i, s, c in suspected]
    extra = {
        "index": pa.array([r.index for r in good], pa.int64()),
        "caption": pa.array([str(r.caption) for r in good], pa.string()),
    }
    with atomic_dir(out) as o:
        artifacts.write_scores(o, [r.uid for r in good], found.scores, found.noisy, extra)
        write_json(o / "summary.json", summary)
        write_text(
            o / "report.md",
            f"# Suspected noisy pairs in {source}\n\n"
            f"detect.method {fitted.method} ({summary['scorer']}), cutoff {fitted.cutoff:.4f}: "
            f"{summary['flagged']} of {len(good)} pairs flagged ({rejected} unreadable)."
            "\n\n" + "\n".join(lines) + "\n",
        )
    return ScoreReport(out, summary, suspected)
