"""Noisy-pair detection from precomputed embeddings (cleanlab-style: outputs in, flags out).

Every scorer maps L2-normalised image and text embeddings, (n, d) each, to a cleanliness
score per pair (higher = more likely a true match), given its options record (keyword-only,
frozen: the schema params.yaml's `detect.<method>` subsections are built from). `flag`
turns scores into noisy flags by a fraction, a threshold or a mixture on the scores.

Split by job, as POT splits `ot/bregman/`:

- `minibatch`: seeded partitions, the per-pair mean over passes, chunked Sinkhorn;
- `scorers`: clip_score, ot, ncu_batch, gmm_loss (and NCR's small-loss posterior);
- `infoot`: fused InfoOT on minibatches, its fit and conditional projection;
- `flags`: scores to flags, and their quality against ground truth;
- `methods`: the registry (scorer + options per name), `score` and `detect`;
- `detector`: the fitted detector that scores new pairs, and its saved state.
"""

from otcurate.detect.detector import (
    Detector,
    detector_from_state,
    detector_state,
    fit_detector,
    score_new,
)
from otcurate.detect.flags import (
    Detection,
    RateEstimate,
    Separation,
    estimate_rate,
    flag,
    mixture_flags,
    quality,
    raised_fraction,
    roc_curve,
    separation,
)
from otcurate.detect.infoot import (
    InfoOTFit,
    InfoOTOptions,
    infoot_fit,
    infoot_project,
    infoot_score,
)
from otcurate.detect.methods import METHODS, Method, detect, options, score
from otcurate.detect.minibatch import MinibatchOptions, SinkhornOptions
from otcurate.detect.scorers import (
    OTOptions,
    SoftmaxOptions,
    clip_score,
    gmm_loss_score,
    ncu_batch_score,
    ot_score,
    small_loss_posterior,
)

__all__ = [
    "METHODS",
    "Detection",
    "Detector",
    "InfoOTFit",
    "InfoOTOptions",
    "RateEstimate",
    "Method",
    "MinibatchOptions",
    "OTOptions",
    "Separation",
    "SinkhornOptions",
    "SoftmaxOptions",
    "clip_score",
    "detect",
    "detector_from_state",
    "detector_state",
    "estimate_rate",
    "fit_detector",
    "flag",
    "raised_fraction",
    "gmm_loss_score",
    "infoot_fit",
    "infoot_project",
    "infoot_score",
    "mixture_flags",
    "ncu_batch_score",
    "options",
    "ot_score",
    "quality",
    "roc_curve",
    "separation",
    "score",
    "score_new",
    "small_loss_posterior",
]
