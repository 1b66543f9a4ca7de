"""open_clip models: build, load and save in open_clip's own format.

A saved model is a folder with `open_clip_config.json` ({"model_cfg", "preprocess_cfg"})
and `model.safetensors`, so any open_clip tool opens it with
`open_clip.create_model_and_transforms("local-dir:<folder>")`.

`otcurate-tiny` (4.6M parameters, most of them the 49k-token embedding table;
a small ModifiedResNet image tower for 32 px images, a 2-layer text transformer with a
16-token context) is registered here for the built-in default: it pre-trains in about a
minute on 2 CPU cores. A small ResNet beat same-cost ViTs here (patch 8 and patch 4):
zero-shot 0.49 vs 0.20 and 0.18 on shapes after the same steps.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import get_model_config
from PIL import Image
from safetensors.torch import save_file

CONFIG_DIR = Path(__file__).parent / "model_configs"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "model.safetensors"
UNMIXED_FILE = "unmixed.safetensors"  # finetune with WiSE-FT: the weights before mixing
MAX_LOGIT_SCALE = float(torch.log(torch.tensor(100.0)))

open_clip.add_model_config(CONFIG_DIR)


@dataclass
class Clip:
    """A CLIP model with what it needs to read images and text."""

    model: torch.nn.Module
    preprocess: Any  # PIL image -> tensor (open_clip's eval transform)
    tokenizer: Any  # list[str] -> LongTensor (B, context_length)
    model_cfg: dict
    preprocess_cfg: dict

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _preprocess_cfg(model: torch.nn.Module) -> dict:
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def create(arch: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> Clip:
    """Build `arch` with random weights (pretrained=None), an open_clip tag, or a checkpoint path.

    A checkpoint path may be a saved otcurate/open_clip folder or a weights file.
    Random initialisation draws from torch's global RNG: seed it first.
    """
    name, pre = arch, pretrained
    model_cfg = get_model_config(arch)
    if pretrained is not None and Path(pretrained).is_dir():
        name, pre = f"local-dir:{Path(pretrained).resolve()}", None
        model_cfg = json.loads((Path(pretrained) / CONFIG_FILE).read_text())["model_cfg"]
    elif model_cfg is None:
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; known: {', '.join(open_clip.list_models())}."
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pre, device=device
        )
    except RuntimeError as exc:
        if pretrained and "download" in str(exc).lower():
            raise ValueError(
                f"could not fetch pretrained weights {pretrained!r} for {arch!r}: {exc}. Without network access, "
                "give a local checkpoint path in pretrain.pretrained."
            ) from exc
        raise
    tokenizer = open_clip.get_tokenizer(name)
    return Clip(model, preprocess, tokenizer, model_cfg, _preprocess_cfg(model))


def load_unmixed(folder: str | Path, device: str | torch.device = "cpu") -> Clip | None:
    """The model of `folder` with the fine-tuned weights as trained (before WiSE-FT mixed
    them with the base), or None when finetune did not mix."""
    from safetensors.torch import load_file

    path = Path(folder) / UNMIXED_FILE
    if not path.exists():
        return None
    clip = load(folder, device=device)
    clip.model.load_state_dict(load_file(str(path), device=str(clip.device)))
    return clip


def load(folder: str | Path, device: str | torch.device = "cpu") -> Clip:
    """Load a model saved by `save`."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists():
        raise FileNotFoundError(folder / CONFIG_FILE)
    return create("", pretrained=str(folder), device=device)


def save(clip: Clip, folder: Path) -> None:
    """Write `open_clip_config.json` + `model.safetensors` into `folder` (already created)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in clip.model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    payload = {"model_cfg": clip.model_cfg, "preprocess_cfg": clip.preprocess_cfg}
    (folder / CONFIG_FILE).write_text(json.dumps(payload, sort_keys=True, indent=2) + "\n")


def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep the CLIP temperature exp(logit_scale) in [1, 100], as open_clip training does."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def images_to_tensor(images: list[Image.Image], preprocess: Any) -> torch.Tensor:
    """(B, 3, H, W) float tensor from PIL images via the model's eval transform."""
    return torch.stack([preprocess(im) for im in images])


@torch.no_grad()
def encode(
    clip: Clip,
    images: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    batch_size: int = 512,
    precision: str = "fp32",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """L2-normalised image (N, d) and text (N, d) embeddings, computed in batches, on CPU.

    precision: fp32, or bf16 / fp16 (autocast on the model's device; float32 out).
    """
    clip.model.eval()
    dev = clip.device
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    out = []
    for x, fn in ((images, clip.model.encode_image), (tokens, clip.model.encode_text)):
        if x is None:
            out.append(None)
            continue
        parts = []
        for i in range(0, len(x), batch_size):
            with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                e = fn(x[i : i + batch_size].to(dev, non_blocking=True), normalize=True)
            parts.append(
                F.normalize(e.float(), dim=-1).cpu() if dtype is not None else e.float().cpu()
            )
        out.append(torch.cat(parts) if parts else torch.empty(0))
    return out[0], out[1]


def encode_texts(clip: Clip, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    """L2-normalised text embeddings (N, d) of raw strings (prompts, captions)."""
    return encode(clip, tokens=clip.tokenizer(list(texts)), batch_size=batch_size)[1]


def input_size(cfg: dict) -> tuple[int, int] | None:
    """The model's input (H, W) from its preprocess config, or None when it has none."""
    size = cfg.get("size")
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def pairs_to_tensors(
    images: list[bytes], captions: list[str], clip: Clip
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode encoded images and tokenize captions: ((N, 3, H, W) float, (N, L) long)."""
    if not images:
        return decode_images(images, clip), torch.empty(
            0, clip.model_cfg["text_cfg"].get("context_length", 77), dtype=torch.long
        )
    return decode_images(images, clip), clip.tokenizer(list(captions))


def decode_images(images: list[bytes], clip: Clip) -> torch.Tensor:
    """Encoded images -> (N, 3, H, W) float, through the model's own eval preprocessing."""
    from otcurate.data.records import decode_rgb

    return _to_tensor([decode_rgb(b) for b in images], clip)


def _to_tensor(pil: list[Image.Image], clip: Clip) -> torch.Tensor:
    """Decoded images -> (N, 3, H, W) float, through the model's own eval preprocessing."""
    if not pil:
        return torch.empty(0, 3, *(input_size(clip.preprocess_cfg) or (32, 32)))
    x = _fast_tensor(pil, clip.preprocess_cfg)
    return images_to_tensor(pil, clip.preprocess) if x is None else x


def decode_pixels(images: list[bytes], clip: Clip) -> torch.Tensor:
    """Encoded images -> (N, 3, H, W) in [0, 1]: `decode_images` before its normalisation
    (the model's size and crop, for augmenting in pixel space)."""
    x = decode_images(images, clip)
    mean = torch.tensor(clip.preprocess_cfg.get("mean", (0.0, 0.0, 0.0))).view(1, 3, 1, 1)
    std = torch.tensor(clip.preprocess_cfg.get("std", (1.0, 1.0, 1.0))).view(1, 3, 1, 1)
    return (x * std + mean).clamp_(0.0, 1.0)


DECODED_CACHE_BYTES = 2 << 30
"""Memory a training set's decoded images (RGB pixels) may keep: within it each image is
decoded once, not once per epoch (#18: a pre-training step of otcurate-tiny decoded 128
PNGs again)."""


class _Decoded:
    """Encoded images, and their decoded RGB images while their pixels fit `cache_bytes`.
    A batch goes through `decode_images`' own tensor path either way: the same values and
    the same memory layout (channels last on its vectorised path, where the convolutions
    round differently) as without the cache."""

    def __init__(self, images: list[bytes], clip: Clip, cache_bytes: int):
        self.images, self.clip, self.left = images, clip, cache_bytes
        self.rgb: dict[int, Image.Image] = {}

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        from otcurate.data.records import decode_rgb

        pil = []
        for i in rows.tolist():
            im = self.rgb.get(i)
            if im is None:
                im = decode_rgb(self.images[i])
                size = im.width * im.height * 3
                if size <= self.left:
                    self.rgb[i], self.left = im, self.left - size
            pil.append(im)
        return _to_tensor(pil, self.clip)


class LazyImages:
    """Encoded images decoded batch by batch: `images[idx]` -> (B, 3, H, W) float tensor.

    Stands in for a decoded image tensor in the training loops (which index rows with a
    LongTensor of batch indices, or a bool mask to keep a subset), so that only the
    compressed bytes stay in memory, and the decoded rows too while they fit
    `cache_bytes` (DECODED_CACHE_BYTES): then each image is decoded once, and a subset
    shares its parent's decoded rows. Each row decodes to the same values as
    `pairs_to_tensors` gives it.
    """

    def __init__(self, images: list[bytes], clip: Clip, *, cache_bytes: int = DECODED_CACHE_BYTES):
        self._decoded = _Decoded(list(images), clip, cache_bytes)
        self._rows = torch.arange(len(self._decoded.images))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, idx) -> torch.Tensor | LazyImages:
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:  # a subset: stay lazy, share the decoded rows
            sub = copy.copy(self)
            sub._rows = self._rows[idx]
            return sub
        return self._decoded.rows(self._rows[idx.reshape(-1)])


def lazy_pairs(
    images: list[bytes], captions: list[str], clip: Clip
) -> tuple[LazyImages, torch.Tensor]:
    """Lazily decoded images and tokenized captions, for training on many pairs."""
    return LazyImages(images, clip), clip.tokenizer(list(captions))


def _fast_tensor(images: list[Image.Image], cfg: dict) -> torch.Tensor | None:
    """The eval transform for images already at the model's size, vectorised.

    open_clip's eval transform is resize + centre crop (identities at the model's size),
    ToTensor and Normalize; at the model's size only the last two act, so they are
    applied to the whole batch at once. Returns None when the shortcut does not apply.
    """
    import numpy as np

    size = input_size(cfg) or ()
    if len(size) != 2 or any(im.size != (size[1], size[0]) for im in images):
        return None
    if cfg.get("resize_mode", "shortest") not in ("shortest", "squash", "longest"):
        return None
    arr = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    x = arr.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    return (x - mean) / std
