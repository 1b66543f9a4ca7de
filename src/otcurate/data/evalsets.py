"""Clean sources read whole, for judging (evaluate.sets) and targeting (coreset.target).

A `CleanSet` holds each distinct image once (rows sharing the exact image bytes, or a
list-of-captions column, give one image with several captions), every caption with the
index of its image, and per-image labels when the source has classes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from otcurate.data import builtin
from otcurate.data.hf import load_pairs, source_kwargs
from otcurate.data.records import ClassInfo


@dataclass(frozen=True)
class CleanSet:
    images: list[bytes]  # distinct images
    labels: np.ndarray  # (n_images,) int, -1 when unknown
    captions: list[str]  # every caption
    caption_image: np.ndarray  # (n_captions,) index into images
    info: ClassInfo | None
    rejected: int  # unreadable rows, skipped

    def pairs(self) -> tuple[list[bytes], list[str]]:
        """One (image, caption) row per caption."""
        return [self.images[i] for i in self.caption_image], list(self.captions)


def _builtin(spec) -> tuple[list, ClassInfo]:
    if spec.source == "shapes":
        return list(builtin.shapes(spec.seed, spec.size, spec.image_size)), builtin.shapes_classes()
    if spec.source == "glyphs":
        return list(builtin.glyphs(spec.seed, spec.size, spec.image_size)), builtin.glyphs_classes()
    size = min(spec.size, builtin.digits_count()) if spec.size else None
    return list(builtin.digits(spec.seed, size, spec.image_size)), builtin.digits_classes()


def group_images(images: Sequence[bytes]) -> tuple[list[bytes], list[int]]:
    """Rows -> (distinct images in first-seen order, each row's index among them): rows
    that share an image's bytes (sha1) are one image with several captions."""
    index: dict[bytes, int] = {}
    unique, owner = [], []
    for image in images:
        key = hashlib.sha1(image).digest()
        if key not in index:
            index[key] = len(unique)
            unique.append(image)
        owner.append(index[key])
    return unique, owner


def load_clean(spec, key: str = "hf") -> CleanSet:
    """Read a `params.SourceSpec` (or EvalSet): built-in source or any `datasets` source;
    `key` is where the params hold its hf settings (for messages)."""
    if spec.source in ("shapes", "glyphs", "digits"):
        recs, info = _builtin(spec)
        rows = [(r.image, r.caption, r.label) for r in recs]
        rejected = 0
    else:
        pairs, info, _ = load_pairs(
            **source_kwargs(spec.hf), limit=spec.size, multi_caption=True, key=key
        )
        rows, rejected = [], 0
        for p in pairs:
            if p.reject is None:
                rows.append((p.image, p.caption, p.label))
            else:
                rejected += 1
    images, owner = group_images([image for image, _, _ in rows])
    labels = [-1] * len(images)
    for (_, _, label), o in reversed(list(zip(rows, owner, strict=True))):
        labels[o] = label  # the label of the image's first row
    captions = [caption for _, caption, _ in rows]
    return CleanSet(
        images, np.asarray(labels, np.int64), captions, np.asarray(owner, np.int64), info, rejected
    )
