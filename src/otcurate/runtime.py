"""Device choice and reproducibility switches (seed, threads, deterministic kernels)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "base.device is 'cuda' but no CUDA device is visible; set base.device: auto or cpu."
        )
    return torch.device(name)


def make_reproducible(seed: int, threads: int) -> None:
    """Same seed and threads, same bytes: seed every RNG, fix threads, deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if threads > 0:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
