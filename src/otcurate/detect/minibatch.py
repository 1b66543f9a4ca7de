"""Minibatch machinery the batch scorers share: seeded partitions into full batches, the
per-pair mean over passes, chunked log-domain Sinkhorn that warns once, CLIP logits."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from otcurate.options import MinibatchOptions, SinkhornOptions
from otcurate.ot import ConvergenceWarning, OTResult, sinkhorn_log

# Minibatch problems solved in one batched call. On the CPU a small chunk keeps each
# (chunk, B, B) temporary in cache (16 * 256**2 float32 = 4 MiB): OT detection on 100k
# pairs took 0.88 s at 16 and 1.37 s at 128 here. On a GPU a large chunk keeps the device
# busy while bounding the temporaries at 128 * 256**2 float32 = 32 MiB. A call stops when
# its worst problem converges, so scores differ between the two at the level of `tol`.
CHUNK_CPU = 16
CHUNK_DEVICE = 128


def check_pairs(image: torch.Tensor, text: torch.Tensor) -> None:
    if image.shape != text.shape:
        raise ValueError(
            f"image and text embeddings must have the same shape; got {tuple(image.shape)} and {tuple(text.shape)}."
        )
    if image.ndim != 2:
        raise ValueError(f"embeddings must be (n, d); got shape {tuple(image.shape)}.")


def partitions(n: int, batch_size: int, passes: int, seed: int) -> torch.Tensor:
    """Row indices of the minibatches, (passes, k, B), B = min(batch_size, n), k = ceil(n / B).

    Each pass is a fresh random permutation (a seeded CPU torch.Generator, never the
    global RNG) cut into k batches. The last batch is topped up with pairs from the
    start of the same permutation, which are never already in it, so every batch is a
    full B-pair context; flattened, a pass's first n entries are the permutation itself.
    """
    if n < 2:
        raise ValueError(f"need at least 2 pairs to form a batch; got {n}.")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2; got {batch_size}.")
    if passes < 1:
        raise ValueError(f"passes must be >= 1; got {passes}.")
    b = min(batch_size, n)
    k = -(-n // b)
    pad = k * b - n
    g = torch.Generator().manual_seed(int(seed))
    rows = []
    for _ in range(passes):
        perm = torch.randperm(n, generator=g)
        rows.append(torch.cat([perm, perm[:pad]]).view(k, b))
    return torch.stack(rows)


def batch_mean(
    image: torch.Tensor,
    text: torch.Tensor,
    idx: torch.Tensor,
    per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Mean over passes of `per_batch(img, txt) -> (K, B)` values, (n,).

    ``idx`` is `partitions`' (passes, k, B). A pair's value in a pass is the one from its
    own batch (the top-up copies in the last batch only give that batch its context), so
    the result is a plain scatter, deterministic on every device.
    """
    n = image.shape[0]
    passes, k, b = idx.shape
    idx = idx.to(image.device).reshape(passes * k, b)
    chunk = CHUNK_CPU if image.device.type == "cpu" else CHUNK_DEVICE
    values = torch.cat([per_batch(image[rows], text[rows]) for rows in idx.split(chunk)])
    own = idx.reshape(passes, k * b)[:, :n]
    out = values.new_empty(passes, n).scatter_(1, own, values.reshape(passes, k * b)[:, :n])
    return out.mean(dim=0)


def over_batches(
    image: torch.Tensor,
    text: torch.Tensor,
    opts: MinibatchOptions,
    seed: int,
    per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`batch_mean` of `per_batch` over the random partitions `opts` and `seed` give."""
    idx = partitions(image.shape[0], opts.batch_size, opts.passes, seed)
    return batch_mean(image, text, idx, per_batch)


class Sinkhorn:
    """Uniform-marginal log-domain Sinkhorn over chunks of batches; warns once per scorer call."""

    def __init__(self, method: str, opts: SinkhornOptions):
        self.method, self.reg, self.max_iter, self.tol = (
            method,
            float(opts.reg),
            int(opts.max_iter),
            opts.tol,
        )
        self.unconverged, self.worst = 0, 0.0

    def __call__(self, M: torch.Tensor, warmstart=None) -> OTResult:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            r = sinkhorn_log(
                None, None, M, self.reg, max_iter=self.max_iter, tol=self.tol, warmstart=warmstart
            )
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                self.unconverged += 1
                self.worst = max(self.worst, float(r.err.detach().max()))
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return r

    def report(self) -> None:
        if self.unconverged:
            warnings.warn(
                f"{self.method}: Sinkhorn reached max_iter={self.max_iter} in {self.unconverged} "
                f"solve(s), marginal error up to {self.worst:.1e} (tol {self.tol:.0e}); the scores "
                "use those plans. Raise max_iter or reg for exact plans.",
                ConvergenceWarning,
                stacklevel=3,  # report <- scorer <- caller
            )


def logits(img: torch.Tensor, txt: torch.Tensor, logit_scale: float) -> torch.Tensor:
    # The CLIP temperature s is clamped to <= 100 as in open_clip / NCU.
    s = min(float(logit_scale), 100.0)
    if not s > 0:
        raise ValueError(f"logit_scale must be > 0; got {logit_scale}.")
    return s * (img @ txt.mT)
