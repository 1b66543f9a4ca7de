"""The fitted detector: the method, options and cut behind a run's flags, saved by detect
and applied by `otcurate score` to pairs it has never seen, without refitting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from otcurate.detect.flags import Detection
from otcurate.detect.infoot import InfoOTFit, infoot_fit, infoot_project
from otcurate.detect.methods import METHODS, options, score


@dataclass(frozen=True)
class Detector:
    """A fitted detector: scores pairs it has never seen, without refitting.

    method, opts, seed : the detect method, its options (the temperature included) and seed;
    cutoff : new pairs scoring below it are flagged (chosen on the train pairs so that the
    train flags are reproduced: the same fraction, threshold or mixture split);
    fit : InfoOT's plan on reference train pairs (``infoot``: new pairs are scored by its
    conditional projection, `infoot_project`); None for the other methods, which score new
    pairs by their own rule (the cosine, or their minibatch OT/softmax/mixture score over
    the new pairs).
    """

    method: str
    opts: Any
    seed: int
    cutoff: float
    fit: InfoOTFit | None = None


def _cutoff(scores: np.ndarray, flags: np.ndarray) -> float:
    """A score cut that flags the same fraction of these scores as `flags` does."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = int(np.asarray(flags, dtype=bool).sum())
    if k == 0:
        return float("-inf")
    if k >= len(s):
        return float("inf")
    return float((s[k - 1] + s[k]) / 2)


def fit_detector(
    method: str,
    image: torch.Tensor,
    text: torch.Tensor,
    result: Detection,
    opts=None,
    *,
    threshold: float | None = None,
    seed: int = 0,
) -> Detector:
    """The detector behind `result` (train scores and flags), ready to score new pairs.

    ``infoot`` fits one plan on a ``batch_size`` subset of the train pairs and places the
    cut on the train pairs' projections at the train flag fraction; the other methods keep
    the user's threshold, or cut between the flagged and unflagged train scores.
    """
    if method not in METHODS:
        raise ValueError(f"unknown detect method {method!r}; known: {', '.join(sorted(METHODS))}.")
    opts = opts if opts is not None else options(method)
    if method == "infoot":
        fit = infoot_fit(image, text, opts, size=opts.batch_size, seed=seed)
        # The cut is placed on train pairs outside the reference set when there are enough
        # of them: the references' own cells make their projections optimistic.
        held = np.ones(image.shape[0], dtype=bool)
        held[fit.rows.numpy()] = False
        if held.sum() < 50:
            held[:] = True
        sel = torch.as_tensor(held, device=image.device)
        projected = infoot_project(fit, image[sel], text[sel]).double().cpu().numpy()
        return Detector(method, opts, seed, _cutoff(projected, result.noisy[held]), fit)
    cut = float(threshold) if threshold is not None else _cutoff(result.scores, result.noisy)
    return Detector(method, opts, seed, cut)


def score_new(detector: Detector, image: torch.Tensor, text: torch.Tensor) -> Detection:
    """Scores and flags of new pairs by a fitted detector (no refit)."""
    if detector.fit is not None:
        s = infoot_project(detector.fit, image, text).double().cpu().numpy()
    else:
        s = score(detector.method, image, text, detector.opts, seed=detector.seed)
    return Detection(s, s < detector.cutoff)


def detector_state(detector: Detector) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able description, tensors) of a detector, for saving; see `detector_from_state`."""
    meta = {
        "method": detector.method,
        "options": dataclasses.asdict(detector.opts),
        "seed": detector.seed,
        "cutoff": detector.cutoff,
    }
    tensors: dict[str, torch.Tensor] = {}
    if detector.fit is not None:
        f = detector.fit
        meta["bandwidth2_image"] = f.bandwidth2_image
        meta["bandwidth2_text"] = f.bandwidth2_text
        tensors = {"image": f.image, "text": f.text, "plan": f.plan}
    return meta, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def detector_from_state(meta: dict, tensors: dict[str, torch.Tensor]) -> Detector:
    fit = None
    if meta["method"] == "infoot":
        fit = InfoOTFit(
            tensors["image"],
            tensors["text"],
            tensors["plan"],
            float(meta["bandwidth2_image"]),
            float(meta["bandwidth2_text"]),
        )
    opts = options(meta["method"], **meta["options"])
    return Detector(meta["method"], opts, int(meta["seed"]), float(meta["cutoff"]), fit)
