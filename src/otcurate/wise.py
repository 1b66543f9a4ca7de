"""WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): the
weight-space interpolation (1 - alpha) * base + alpha * fine-tuned, which keeps much of the
base's zero-shot ability on what the fine-tuning data does not cover at little cost on what
it does. alpha = 1 is the fine-tuned model, 0 the base.

Floating-point tensors are interpolated; others (integer buffers such as a position ids
table) are taken from the fine-tuned model. Reference: mlfoundations/wise-ft
`src/models/wise_ft.py` (`_merge`), which interpolates every entry of the state dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the grid `choose_alpha` searches by default


def interpolate(
    base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * base + alpha * finetuned, entry by entry (same keys and shapes)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}.")
    if base.keys() != finetuned.keys():
        extra = sorted(set(base) ^ set(finetuned))[:3]
        raise ValueError(
            f"the two models differ in their weights ({extra} ...): not one architecture."
        )
    out = {}
    for k, f in finetuned.items():
        b = base[k]
        if b.shape != f.shape:
            raise ValueError(
                f"{k}: shape {tuple(b.shape)} vs {tuple(f.shape)}: not one architecture."
            )
        out[k] = (
            torch.lerp(b.to(f.device, f.dtype), f, alpha) if f.is_floating_point() else f.clone()
        )
    return out


def choose_alpha(
    score: Callable[[float], float], alphas: Sequence[float] = ALPHAS
) -> tuple[float, dict[float, float]]:
    """The alpha of `alphas` with the best `score` (higher is better; a tie goes to the
    smaller alpha, nearer the base), and every alpha's score."""
    scores = {float(a): float(score(float(a))) for a in sorted(alphas)}
    best = max(scores, key=lambda a: (scores[a], -a))
    return best, scores
