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
| caption_from | string | uid of the pair whose caption this is (== uid when clean; "" for a generic caption) |
"""

from __future__ import annotations

import hashlib
import io
import unicodedata
import warnings
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


@dataclass(frozen=True)
class RecordLimits:
    """What a record may hold at most: a decoded image's pixels (width x height, checked from
    the header before any decoding) and a caption's characters. A web caption longer than a
    few hundred characters is rarely a caption; CLIP reads 77 tokens of it anyway."""

    max_image_pixels: int = 64_000_000
    max_caption_chars: int = 4096


def _caption_problem(caption: str, max_chars: int) -> str | None:
    if len(caption) > max_chars:
        return f"caption too long ({len(caption)} characters; the limit is {max_chars})"
    bad = sorted({c for c in caption if unicodedata.category(c) == "Cc" and c not in "\t\n\r"})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X}" for c in bad[:3])
        return f"caption holds control characters ({shown})"
    visible = [c for c in caption if not c.isspace() and unicodedata.category(c) != "Cf"]
    if not visible:
        return "caption has no visible text (only spaces or zero-width characters)"
    return None


def check_record(
    image: bytes | None, caption: object, limits: RecordLimits = RecordLimits()
) -> str | None:
    """Why a raw pair is unusable, or None when it is fine. Never raises on the record's
    content: a decompression bomb, an oversize image or a caption of control characters is
    a reason like any other."""
    if not isinstance(caption, str) or not caption.strip():
        return (
            "empty caption"
            if isinstance(caption, str) or caption is None
            else f"caption is not text ({type(caption).__name__})"
        )
    if (why := _caption_problem(caption, limits.max_caption_chars)) is not None:
        return why
    if not image:
        return "missing image bytes"
    guard = Image.MAX_IMAGE_PIXELS  # PIL refuses > 2x this in open(): make room for the limit
    try:
        if guard is not None and limits.max_image_pixels > guard:
            Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image)) as im:
                w, h = im.size  # from the header: nothing is decoded yet
                if w * h > limits.max_image_pixels:
                    return (
                        f"image too large ({w}x{h} = {w * h} pixels; the limit is "
                        f"{limits.max_image_pixels})"
                    )
                im.load()
                if im.width < 1 or im.height < 1:
                    return "image has no pixels"
    except Image.DecompressionBombError as exc:
        return f"a decompression bomb ({exc})"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"undecodable image ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001 - a decoder bug on hostile bytes is still one bad record
        return f"undecodable image ({type(exc).__name__}: {exc})"
    finally:
        Image.MAX_IMAGE_PIXELS = guard
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


NOISE_KINDS = ("shuffle", "near", "generic", "mixed")
# Uninformative captions, as web alt-text often is ("{n}" becomes a 4-digit number).
GENERIC_CAPTIONS = (
    "an image",
    "a photo",
    "a picture",
    "untitled",
    "click to enlarge",
    "photo {n}",
    "image {n}",
    "IMG_{n}.jpg",
)


@dataclass(frozen=True)
class PlantedNoise:
    captions: list[str]  # captions after planting
    caption_from: np.ndarray  # index of the pair each caption came from; -1: a generic caption
    noisy: np.ndarray  # bool: caption differs from the pair's own
    kind: np.ndarray  # str per pair: "" (kept its caption) or the noise kind planted on it


def plant_noise(
    captions: Sequence[str],
    rate: float,
    seed: int,
    kind: str = "shuffle",
    labels: Sequence[int] | None = None,
) -> PlantedNoise:
    """Replace the captions of round(rate * n) random pairs; each image keeps its place.

    Noise is planted per caption, as in NCR (Huang et al. 2021): the image of a noisy pair
    is a real image, its caption belongs to something else. Kinds:

    - ``shuffle``: the chosen pairs' captions are permuted among themselves by one cycle
      (Sattolo), so no chosen pair keeps its own (NCR's protocol).
    - ``near``: each chosen pair takes the caption of a close pair: the caption with the most
      words in common (ties broken at random) among those that cannot still describe the
      image. With ``labels`` (class ids, -1 unknown) the candidates are the pairs of another
      class: a neighbouring class, every other attribute kept where the captions are
      compositional (a red circle becomes a red square). Without labels, a candidate must
      swap a word rather than only drop or add words ("a red circle" is still true of "a
      small red circle"), stop words aside.
    - ``generic``: an uninformative caption (``GENERIC_CAPTIONS``, e.g. "photo 0412").
    - ``mixed``: the chosen pairs split in three equal parts, one per kind above.

    A pair counts as noisy when its caption text changed (two pairs may share an identical
    caption; swapping those plants nothing).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {', '.join(NOISE_KINDS)}; got {kind!r}.")
    n = len(captions)
    k = int(round(rate * n))
    src = np.arange(n)
    new = list(captions)
    kinds = np.full(n, "", dtype=object)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=k, replace=False) if k > 0 else np.zeros(0, dtype=np.int64)
    parts = {kind: chosen}
    if kind == "mixed":
        parts = dict(zip(("shuffle", "near", "generic"), np.array_split(chosen, 3), strict=True))
    for part, rows in parts.items():
        rows = np.sort(rows)
        if part == "shuffle" and len(rows) >= 2:
            perm = np.arange(len(rows))
            for i in range(len(rows) - 1, 0, -1):  # Sattolo: a single cycle
                j = int(rng.integers(i))
                perm[i], perm[j] = perm[j], perm[i]
            src[rows] = rows[perm]
        elif part == "near" and len(rows):
            src[rows] = _nearest_other_caption(captions, rows, rng, labels)
        for i in rows:
            new[i] = captions[src[i]]
        if part == "generic":
            for i in rows:
                text = GENERIC_CAPTIONS[int(rng.integers(len(GENERIC_CAPTIONS)))]
                new[i] = text.format(n=f"{int(rng.integers(10000)):04d}")
                src[i] = -1
        kinds[rows] = part
    noisy = np.array([new[i] != captions[i] for i in range(n)], dtype=bool)
    kinds[~noisy] = ""
    src[~noisy] = np.arange(n)[~noisy]
    return PlantedNoise(new, src, noisy, kinds)


def _nearest_other_caption(
    captions: Sequence[str],
    rows: np.ndarray,
    rng: np.random.Generator,
    labels: Sequence[int] | None = None,
) -> np.ndarray:
    """For each of ``rows``, the index of the caption sharing the most words with its own
    (random among equals) among the candidates that cannot still describe its image: of
    another class when ``labels`` are known, else a caption that swaps a content word."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

    vec = CountVectorizer(binary=True, token_pattern=r"(?u)\b\w+\b")
    words = vec.fit_transform(captions).tocsr()
    content = np.array([w not in ENGLISH_STOP_WORDS for w in vec.get_feature_names_out()])
    kept = words[:, np.flatnonzero(content)]  # content words only
    n_content = np.asarray(kept.sum(axis=1)).ravel()
    text_id = np.unique(np.asarray(captions, dtype=object), return_inverse=True)[1]
    lab = None if labels is None else np.asarray(labels)
    if text_id.max(initial=0) < 1:
        raise ValueError("near noise needs at least two different captions.")
    out = np.empty(len(rows), dtype=np.int64)
    chunk = max(1, 2**22 // max(1, len(captions)))  # bounded memory: chunk x n floats
    for lo in range(0, len(rows), chunk):
        r = rows[lo : lo + chunk]
        overlap = (words[r] @ words.T).toarray().astype(np.float64)
        ok = text_id[None, :] != text_id[r][:, None]  # never its own text
        if lab is not None and (lab[r] >= 0).all():
            ok &= lab[None, :] != lab[r][:, None]
        else:  # each side has a content word the other lacks: a swap, not a subset
            shared = (kept[r] @ kept.T).toarray()
            ok &= (shared < n_content[r][:, None]) & (shared < n_content[None, :])
        overlap += 0.5 * rng.random(overlap.shape)  # ties at random, below one word
        overlap[~ok] = -np.inf
        if not np.isfinite(overlap.max(axis=1)).all():
            raise ValueError("near noise found a caption with no candidate of another class.")
        out[lo : lo + len(r)] = overlap.argmax(axis=1)
    return out


def content_uid(image: bytes, caption: str) -> str:
    """A uid from the content: the same pair always gets the same id."""
    return hashlib.sha1(image + b"\0" + caption.encode()).hexdigest()[:20]
