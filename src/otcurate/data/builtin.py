"""Built-in image-text sources that need no download.

- `shapes`: procedural coloured shapes with compositional captions
  ("a small red circle at the top left"); class label = shape.
- `digits`: scikit-learn's 8x8 handwritten digits, upscaled, with templated
  captions; class label = digit. Small (1,797 images): a model trained for a few
  hundred steps memorises its pairs, so it is a poor judge of noise detection.
- `glyphs`: procedural digits (Pillow's built-in font, scaled, rotated, sheared, in
  colour on a noisy background) with captions that the image determines ("a large
  red seven at the top left"); class label = digit. As many pairs as asked for.

Each generator is a pure function of (seed, index), so any subset of records
can be made independently and in any order; `workers` > 1 makes them in that many
processes, in chunks, and yields them in index order (the same bytes).
"""

from __future__ import annotations

import io
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from otcurate.data.records import ClassInfo

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SIZES = {"small": 0.17, "large": 0.3}
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
SHAPE_TEMPLATES = (
    "a {size} {color} {shape} at the {pos}",
    "a {color} {shape} in the {pos}",
    "{size} {color} {shape}, {pos}",
    "a picture of a {size} {color} {shape}",
    "the {shape} is {color} and {size}",
)
SHAPE_PROMPTS = ("a {}", "a photo of a {}", "a {} shape", "a drawing of a {}")

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {digit}",
    "a photo of the digit {name}",
    "handwritten {name}",
    "the digit {digit} written by hand",
)
DIGIT_PROMPTS = ("a handwritten digit {}", "the number {}", "a photo of the digit {}")


GLYPH_TEMPLATES = (
    "a {size} {color} {name} at the {pos}",
    "the number {digit} in {color}, {pos}",
    "a {color} digit {name} in the {pos}",
    "{size} {color} {digit}, {pos}",
    "a picture of a {size} {color} {name}",
)
GLYPH_PROMPTS = ("the digit {}", "a picture of the number {}", "a {}", "the number {}")
GLYPH_SIZES = {"small": 0.42, "large": 0.68}  # glyph height / image side


@dataclass(frozen=True)
class Record:
    uid: str
    image: bytes  # encoded image (PNG for built-ins)
    caption: str
    label: int  # -1 when the source has no labels


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = np.array([-90, 30, 150]) + rot
        return [(cx + r * np.cos(np.radians(a)), cy + r * np.sin(np.radians(a))) for a in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.45 * r
            a = np.radians(-90 + 36 * k + rot)
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts
    if shape == "hexagon":
        return [
            (cx + r * np.cos(np.radians(60 * k + rot)), cy + r * np.sin(np.radians(60 * k + rot)))
            for k in range(6)
        ]
    raise ValueError(shape)


def shapes_record(seed: int, index: int, image_size: int = 32) -> Record:
    """One procedural shape image and a caption describing it."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
    template = SHAPE_TEMPLATES[rng.integers(len(SHAPE_TEMPLATES))]

    scale = 4  # draw large, then downsample: anti-aliased edges
    s = image_size * scale
    bg = tuple(int(v) for v in rng.integers(0, 70, size=3))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[pos]
    cx = (fx + rng.uniform(-0.06, 0.06)) * s
    cy = (fy + rng.uniform(-0.06, 0.06)) * s
    r = SIZES[size] * s * rng.uniform(0.85, 1.15)
    rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
    rot = float(rng.uniform(-15, 15))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=rgb)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=rgb)
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    caption = _articles(template.format(size=size, color=color, shape=shape, pos=pos))
    return Record(f"shapes-{index:08d}", png_bytes(img), caption, SHAPES.index(shape))


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _chunk(
    make: Callable[..., Record], seed: int, lo: int, hi: int, image_size: int
) -> list[Record]:
    return [make(seed, i, image_size) for i in range(lo, hi)]


def _exit_with(parent: int) -> None:
    """A pool worker's initializer: exit as soon as `parent`, the process that started the
    pool, is gone (a SIGKILL of it included, which no pool shutdown sees)."""
    import os
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the stage's to handle; it stops us

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _picklable(obj) -> bool:
    import pickle

    try:
        pickle.dumps(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def generate(
    make: Callable[[int, int, int], Record],
    seed: int,
    size: int,
    image_size: int = 32,
    start: int = 0,
    workers: int = 1,
    chunk: int = 256,
) -> Iterator[Record]:
    """`make(seed, i, image_size)` for i in [start, size), in order. With `workers` > 1, chunks
    of `chunk` indices are made in that many spawned processes, at most 2 x workers chunks
    ahead of the consumer (bounded memory), never more processes than CPUs. A `make` that
    cannot be sent to another process (a local function, a test's stand-in) runs here, one
    record at a time. Workers import `make`'s module afresh: a patch made to it in this
    process after import does not reach them."""
    import os

    workers = min(workers, os.cpu_count() or 1)
    if workers <= 1 or size - start <= chunk or not _picklable(make):
        for i in range(start, size):
            yield make(seed, i, image_size)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = [(lo, min(lo + chunk, size)) for lo in range(start, size, chunk)]
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_exit_with, initargs=(os.getpid(),)
    )
    ahead: deque = deque()
    try:
        for lo, hi in bounds:
            ahead.append(pool.submit(_chunk, make, seed, lo, hi, image_size))
            if len(ahead) >= 2 * workers:
                yield from ahead.popleft().result()
        while ahead:
            yield from ahead.popleft().result()
    finally:  # also when the consumer stops early: what is queued is not made
        pool.shutdown(wait=True, cancel_futures=True)


def shapes(
    seed: int, size: int, image_size: int = 32, start: int = 0, workers: int = 1
) -> Iterator[Record]:
    return generate(shapes_record, seed, size, image_size, start, workers)


def shapes_classes() -> ClassInfo:
    return ClassInfo(list(SHAPES), list(SHAPE_PROMPTS))


def digits_count() -> int:
    from sklearn.datasets import load_digits

    return len(load_digits().target)


def digits(
    seed: int, size: int | None = None, image_size: int = 32, start: int = 0
) -> Iterator[Record]:
    """scikit-learn's handwritten digits, upscaled to `image_size`, with templated captions."""
    from sklearn.datasets import load_digits

    d = load_digits()
    n = len(d.target) if size is None else size
    if n > len(d.target):
        raise ValueError(
            f"ingest.size={size} exceeds the {len(d.target)} images of the 'digits' source; "
            "set ingest.size to null (all) or a smaller number."
        )
    for i in range(start, n):
        rng = np.random.default_rng([seed, i])
        img8 = (d.images[i] / 16.0 * 255.0).astype(np.uint8)
        img = Image.fromarray(img8, mode="L").resize(
            (image_size, image_size), Image.Resampling.BILINEAR
        )
        img = img.convert("RGB")
        label = int(d.target[i])
        template = DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))]
        caption = template.format(name=DIGIT_NAMES[label], digit=label)
        yield Record(f"digits-{i:08d}", png_bytes(img), caption, label)


def digits_classes() -> ClassInfo:
    return ClassInfo(list(DIGIT_NAMES), list(DIGIT_PROMPTS))


def _glyph_font(px: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=px)  # Pillow's own font: the same on every machine


def glyphs_record(seed: int, index: int, image_size: int = 32) -> Record:
    """One procedural digit image and a caption that describes all it shows."""
    rng = np.random.default_rng([seed, index, 7])
    digit = int(rng.integers(10))
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = list(GLYPH_SIZES)[rng.integers(len(GLYPH_SIZES))]
    pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
    template = GLYPH_TEMPLATES[rng.integers(len(GLYPH_TEMPLATES))]

    scale = 4
    s = image_size * scale
    px = int(GLYPH_SIZES[size] * s * rng.uniform(0.9, 1.1))
    font = _glyph_font(px)
    rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
    # the glyph on its own transparent layer: rotate and shear it, then place it
    layer = Image.new("RGBA", (2 * px, 2 * px), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text(
        (px, px), str(digit), font=font, fill=rgb + (255,), anchor="mm",
        stroke_width=int(rng.integers(0, max(1, px // 12) + 1)), stroke_fill=rgb + (255,),
    )  # fmt: skip
    shear = float(rng.uniform(-0.25, 0.25))
    layer = layer.transform(
        layer.size, Image.Transform.AFFINE, (1, shear, -shear * px, 0, 1, 0),
        resample=Image.Resampling.BILINEAR,
    )  # fmt: skip
    layer = layer.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)
    noise = rng.integers(0, 60, size=(s // 8, s // 8, 3), dtype=np.uint8)
    img = Image.fromarray(noise, "RGB").resize((s, s), Image.Resampling.BILINEAR)
    fx, fy = POSITIONS[pos]
    cx = (fx + rng.uniform(-0.05, 0.05)) * s
    cy = (fy + rng.uniform(-0.05, 0.05)) * s
    img.paste(layer, (int(cx - px), int(cy - px)), layer)
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    caption = _articles(
        template.format(size=size, color=color, name=DIGIT_NAMES[digit], digit=digit, pos=pos)
    )
    return Record(f"glyphs-{index:08d}", png_bytes(img), caption, digit)


def glyphs(
    seed: int, size: int, image_size: int = 32, start: int = 0, workers: int = 1
) -> Iterator[Record]:
    return generate(glyphs_record, seed, size, image_size, start, workers)


def glyphs_classes() -> ClassInfo:
    return ClassInfo(list(DIGIT_NAMES), list(GLYPH_PROMPTS))
