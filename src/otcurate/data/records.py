"""The pair record format, validation, deterministic splits and planted noise.

A record is one image-text pair:

| column       | type   | meaning |
|--------------|--------|---------|
| uid          | string | stable id, unique in the data set |
| split        | string | train / val / test |
| image        | binary | encoded image (PNG for built-ins; hf keeps its source encoding) |
| caption      | string | the caption as trained on (after planted noise) |
| label        | int32  | class id, -1 when the source has none |
| noisy        | bool   | ground truth: the caption was planted from another pair |
| caption_from | string | uid of the pair whose caption this is (== uid when clean) |
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class ClassInfo:
    """A labelled source's class names and its zero-shot prompt templates."""

    class_names: list[str]
    templates: list[str]  # zero-shot prompt templates with one "{}"


SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("split", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("label", pa.int32()),
        ("noisy", pa.bool_()),
        ("caption_from", pa.string()),
    ]
)
SPLITS = ("train", "val", "test")


def check_record(image: bytes | None, caption: object) -> str | None:
    """Why a raw pair is unusable, or None when it is fine."""
    if not isinstance(caption, str) or not caption.strip():
        return (
            "empty caption"
            if isinstance(caption, str) or caption is None
            else f"caption is not text ({type(caption).__name__})"
        )
    if not image:
        return "missing image bytes"
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "image has no pixels"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"undecodable image ({type(exc).__name__}: {exc})"
    return None


def decode_rgb(image: bytes) -> Image.Image:
    with Image.open(io.BytesIO(image)) as im:
        return im.convert("RGB")


def split_of(uid: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """train / val / test by a hash of (seed, uid): stable per pair, so new data never moves old pairs."""
    h = hashlib.sha1(f"{seed}:{uid}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def assign_splits(
    uids: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """`split_of` for each uid: an array of "train" / "val" / "test" strings, aligned with `uids`."""
    out = np.empty(len(uids), dtype=object)
    for i, uid in enumerate(uids):
        out[i] = split_of(uid, val_fraction, test_fraction, seed)
    return out


@dataclass(frozen=True)
class PlantedNoise:
    captions: list[str]  # captions after planting
    caption_from: np.ndarray  # index of the pair each caption came from
    noisy: np.ndarray  # bool: caption differs from the pair's own


def plant_noise(captions: Sequence[str], rate: float, seed: int) -> PlantedNoise:
    """NCR-style noise: permute the captions of round(rate * n) pairs among themselves.

    The chosen pairs get a cyclic permutation (Sattolo), so no chosen pair keeps
    its own caption. A pair counts as noisy when its caption text changed (two
    pairs may share an identical caption; swapping those plants nothing).
    """
    n = len(captions)
    k = int(round(rate * n))
    src = np.arange(n)
    if k >= 2:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(n, size=k, replace=False))
        perm = np.arange(k)
        for i in range(k - 1, 0, -1):  # Sattolo: a single k-cycle
            j = int(rng.integers(i))
            perm[i], perm[j] = perm[j], perm[i]
        src[chosen] = chosen[perm]
    new = [captions[j] for j in src]
    noisy = np.array([new[i] != captions[i] for i in range(n)], dtype=bool)
    return PlantedNoise(new, src, noisy)


def content_uid(image: bytes, caption: str) -> str:
    """A uid from the content: the same pair always gets the same id."""
    return hashlib.sha1(image + b"\0" + caption.encode()).hexdigest()[:20]
