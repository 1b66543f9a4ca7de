"""The registry of detect methods: each a scorer and its options record (`otcurate.methods`);
`score` and `detect` by name."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from otcurate import methods as registry
from otcurate.detect.flags import Detection, flag
from otcurate.methods import Method
from otcurate.options import DETECT_METHODS as METHODS


def options(method: str, **values: Any):
    """The options record of `method` with `values` set; an unknown key is an error."""
    return registry.options("detect", METHODS, method, **values)


def score(method: str, image: torch.Tensor, text: torch.Tensor, opts=None, *, seed: int = 0):
    """Cleanliness scores (n,) by the named method (``opts``: its options, None = defaults)."""
    opts = registry.checked("detect", METHODS, method, opts)
    s = METHODS[method].fn(image, text, opts, seed=seed)
    return s.detach().cpu().double().numpy()


def detect(
    method: str,
    image: torch.Tensor,
    text: torch.Tensor,
    opts=None,
    *,
    fraction: float | None = None,
    threshold: float | None = None,
    auto: bool = False,
    seed: int = 0,
) -> Detection:
    s: np.ndarray = score(method, image, text, opts, seed=seed)
    return Detection(s, flag(s, fraction=fraction, threshold=threshold, auto=auto, seed=seed))


__all__ = ["METHODS", "Method", "detect", "options", "score"]
