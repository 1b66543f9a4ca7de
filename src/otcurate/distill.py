"""Dataset distillation: a few examples per class that stand in for the data.

`random_real` returns `Distilled` index picks (real examples) per class; `wmdd` (WMDD,
reference code Liu-Hy/WMDD) synthesises images: per class, the free-support Wasserstein
barycenter of the real image features with `ipc` points, then pixels optimised from noise
so that each image's features land on its barycenter point, the zero-shot head calls it
its class, and its intermediate activations match the class's real statistics. Classes
are the data's labels, or k-means clusters of the text embeddings when it has none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from otcurate.data.records import ClassInfo
from otcurate.evaluate import class_means
from otcurate.options import DISTILL_METHODS as METHODS  # noqa: F401 - the registry, by name
from otcurate.options import STAT_LAYERS, WmddOptions
from otcurate.progress import track


@dataclass(frozen=True)
class Distilled:
    indices: np.ndarray  # (m,) sorted indices of the real pairs chosen
    classes: np.ndarray  # (m,) the class (or cluster) each stands for


def random_real(classes: np.ndarray, candidates: np.ndarray, ipc: int, *, seed: int) -> Distilled:
    """`ipc` random real pairs per class from `candidates` (fewer if a class has fewer)."""
    rng = np.random.default_rng(seed)
    picks, cls = [], []
    for c in np.unique(classes[candidates]):
        members = candidates[classes[candidates] == c]
        chosen = rng.choice(members, size=min(ipc, len(members)), replace=False)
        picks.append(chosen)
        cls.append(np.full(len(chosen), c))
    if not picks:
        return Distilled(np.empty(0, np.int64), np.empty(0, np.int64))
    idx, c = np.concatenate(picks), np.concatenate(cls)
    order = np.argsort(idx)
    return Distilled(idx[order].astype(np.int64), c[order].astype(np.int64))


# ------------------------------------------------------------------------------ WMDD


@dataclass(frozen=True)
class Barycenters:
    points: torch.Tensor  # (m, d) support points, `ipc` (or fewer) per class
    classes: np.ndarray  # (m,) the class of each point
    nearest: np.ndarray  # (m,) index of the real candidate nearest to each point
    cost: dict[int, float] = field(default_factory=dict)  # W2² from the class to its points


def barycenters(
    features: torch.Tensor,
    classes: np.ndarray,
    candidates: np.ndarray,
    ipc: int,
    *,
    seed: int,
    max_iter: int | None = None,
) -> Barycenters:
    """Per class, the free-support Wasserstein barycenter (POT
    ``ot.lp.free_support_barycenter``, uniform weights) of the candidates' features with
    ``min(ipc, members)`` points, initialised at seeded random members; ``max_iter`` None
    is wmdd's default (`WmddOptions.barycenter_iter`)."""
    import ot

    max_iter = WmddOptions.barycenter_iter if max_iter is None else max_iter

    rng = np.random.default_rng(seed)
    pts, cls, near, cost = [], [], [], {}
    x = features.double()
    for c in np.unique(classes[candidates]):
        members = candidates[classes[candidates] == c]
        k = min(ipc, len(members))
        xm = x[members]
        init = xm[torch.as_tensor(rng.choice(len(members), size=k, replace=False))]
        w = torch.full((len(members),), 1.0 / len(members), dtype=x.dtype)
        b = torch.full((k,), 1.0 / k, dtype=x.dtype)
        bar = ot.lp.free_support_barycenter([xm], [w], init, b=b, numItermax=max_iter)
        cost[int(c)] = float(ot.emd2(w, b, ot.dist(xm, bar)))
        pts.append(bar)
        cls.append(np.full(k, c))
        near.append(members[torch.cdist(bar, xm).argmin(dim=1).numpy()])
    if not pts:
        d = features.shape[1]
        return Barycenters(torch.empty(0, d), np.empty(0, np.int64), np.empty(0, np.int64))
    return Barycenters(
        torch.cat(pts).float(),
        np.concatenate(cls).astype(np.int64),
        np.concatenate(near).astype(np.int64),
        cost,
    )


_NORM = torch.nn.modules.batchnorm._BatchNorm  # every BatchNorm layer's base class


def stat_modules(visual: torch.nn.Module, where: str = "stages") -> list[torch.nn.Module]:
    """Modules whose activation statistics WMDD matches. ``stages``: the outputs of a ResNet
    tower's residual stages; ``batchnorm``: the input of every BatchNorm layer, stem first (the
    reference's `BNFeatureHook`, Liu-Hy/WMDD recover/utils.py). A ViT tower (no BatchNorm):
    its transformer blocks' outputs either way."""
    if where not in STAT_LAYERS:
        raise ValueError(f"where must be one of {', '.join(STAT_LAYERS)}; got {where!r}.")
    if where == "batchnorm":
        norms = [m for m in visual.modules() if isinstance(m, _NORM)]
        if norms:
            return norms
    elif all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
        return [getattr(visual, f"layer{i}") for i in range(1, 5)]
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return list(blocks) if blocks is not None else []


def _moments(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance: over (N, H, W) of (N, C, H, W); over (N, L) of (N, L, D)."""
    dims = (0, 2, 3) if a.dim() == 4 else tuple(range(a.dim() - 1))
    return a.mean(dim=dims), a.var(dim=dims, unbiased=False)


class _Recorder:
    """Each forward's activations of ``modules``, in call order: a BatchNorm layer's input,
    any other module's output."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.out: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, m, inp, output):
        if isinstance(m, _NORM):
            self.out.append(inp[0])
        else:
            self.out.append(output[0] if isinstance(output, tuple) else output)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def class_statistics(
    model: torch.nn.Module,
    images: dict[int, torch.Tensor],
    batch_size: int = 256,
    where: str = "stages",
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per class, (mean, var) of each `stat_modules` (``where``) activation over that class's
    real images (normalised model inputs)."""
    rec = _Recorder(stat_modules(model.visual, where))
    was_training = model.training
    model.eval()  # the frozen model: BatchNorm with its running statistics
    out = {}
    try:
        for c, x in images.items():
            sums: list[list[torch.Tensor]] = []
            n = 0
            for i in range(0, len(x), batch_size):
                rec.out.clear()
                xb = x[i : i + batch_size]
                model.encode_image(xb)
                w = len(xb)
                moments = [_moments(a) for a in rec.out]
                m2 = [(mu, var + mu.square()) for mu, var in moments]  # E[a], E[a²]
                if not sums:
                    sums = [[mu * w, sq * w] for mu, sq in m2]
                else:
                    for acc, (mu, sq) in zip(sums, m2, strict=True):
                        acc[0] += mu * w
                        acc[1] += sq * w
                n += w
            out[int(c)] = [(a / n, b / n - (a / n).square()) for a, b in sums]
    finally:
        rec.close()
        model.train(was_training)
    return out


@dataclass(frozen=True)
class Synthetic:
    pixels: torch.Tensor  # (m, 3, H, W) in [0, 1]
    losses: list[float]
    terms: dict[str, float]  # the last step's loss terms


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop (pad by reflection, crop back at a random offset) and horizontal flip."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    x = xp[..., i : i + h, j : j + w]
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        x = x.flip(-1)
    return x


def synthesize(
    model: torch.nn.Module,
    bary: Barycenters,
    classifier: torch.Tensor,
    class_index: dict[int, int],
    real_stats: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    *,
    size: tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    scale: float,
    opts: WmddOptions | None = None,
    seed: int = 0,
    log: Callable[[str, float, int], None] | None = None,
    init: torch.Tensor | None = None,
) -> Synthetic:
    """WMDD image synthesis: one image per barycenter point, optimised from noise (the
    reference) or from ``init`` (m, 3, H, W) in [0, 1] (e.g. the real image nearest each
    point, ``opts.init`` real).

    Loss per step (batch means): w_feat·‖f(x̃_i) − point_i‖² + w_ce·CE(scale·f(x̃)·Wᵀ, y)
    + w_stat·Σ_classes Σ_layers w_l (‖μ̃ − μ‖ + ‖σ̃² − σ²‖)/classes, with f the L2-normalised image
    embedding, W the zero-shot class embeddings (``classifier``, rows indexed through
    ``class_index``), (μ, σ²) the class's real activation statistics at ``opts.stat_layers``
    (`stat_modules`), w_l = ``opts.first_stat_weight`` for the first and 1 after. One random view of
    the batch each step (``opts.crop``); Adam betas (0.5, 0.9), cosine lr; pixels clipped to
    [0, 1] after each step.
    The model's weights are not changed.
    """
    o = opts or WmddOptions()
    steps, lr = o.steps, o.lr
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    m = len(bary.points)
    pix = torch.rand(m, 3, *size, generator=gen).mul_(0.2).add_(0.4)  # drawn either way
    if init is not None:
        if tuple(init.shape) != (m, 3, *size):
            raise ValueError(f"init has shape {tuple(init.shape)}; expected {(m, 3, *size)}.")
        pix = init.detach().clone().float()
    pix = pix.to(dev).requires_grad_(True)
    mu = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    target = bary.points.to(dev)
    y = torch.tensor([class_index[int(c)] for c in bary.classes], device=dev)
    groups = {
        int(c): torch.as_tensor(np.flatnonzero(bary.classes == c), device=dev)
        for c in np.unique(bary.classes)
    }
    opt = torch.optim.Adam([pix], lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    rec = _Recorder(stat_modules(model.visual, o.stat_layers))
    losses, terms = [], {}
    pad = max(1, size[0] // 8)
    boxes = sample_views(steps, 1, size, o.min_scale, seed=seed)[:, 0]  # one per step
    try:
        for step in track(range(steps), total=steps, description="distill (wmdd): synthesis"):
            rec.out.clear()
            x = _augment(pix, gen, pad) if o.crop == "shift" else view_batch(pix, boxes[step])
            f = F.normalize(model.encode_image((x - mu) / sd), dim=-1)
            feat = (f - target).square().sum(dim=1).mean()
            ce = F.cross_entropy(scale * f @ classifier.to(dev).T, y)
            stat = torch.zeros((), device=dev)
            for c, rows in groups.items():
                if c not in real_stats:
                    continue
                for layer, (a, (rm, rv)) in enumerate(zip(rec.out, real_stats[c], strict=True)):
                    sm, sv = _moments(a[rows] if a.shape[0] == m else a[:, rows])
                    gap = torch.linalg.vector_norm(sm - rm.to(dev)) + torch.linalg.vector_norm(
                        sv - rv.to(dev)
                    )
                    stat = stat + (o.first_stat_weight if layer == 0 else 1.0) * gap
            stat = stat / max(1, len(groups))
            loss = o.w_feat * feat + o.w_ce * ce + o.w_stat * stat
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                pix.clamp_(0.0, 1.0)
            losses.append(float(loss.detach()))
            terms = {
                k: float(v.detach())
                for k, v in (("feature", feat), ("ce", ce), ("statistics", stat))
            }
            if log is not None:
                for k, v in terms.items():
                    log(f"wmdd_{k}", v, step)
    finally:
        rec.close()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    return Synthetic(pix.detach().cpu(), losses, terms)


# ------------------------------------------------------------------ relabel (SRe2L, WMDD)


@dataclass(frozen=True, kw_only=True)
class RelabelOptions:
    """WMDD's third step (SRe2L's relabel): ``views`` augmented views (random resized crop
    with area in [``min_scale``, 1], SRe2L's range, and a horizontal flip) of every image,
    each with the teacher's soft label over the class prompts; 0 views = no soft labels (the
    distilled set is used as hard pairs)."""

    views: int = 16
    min_scale: float = 0.08

    def __post_init__(self) -> None:
        if self.views < 0:
            raise ValueError(f"views must be >= 0; got {self.views}.")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1]; got {self.min_scale}.")


@dataclass(frozen=True)
class SoftLabels:
    """Per image, ``V`` views and the teacher's logits for each (its own logit scale times
    the cosine to each class's mean prompt embedding)."""

    views: torch.Tensor  # (m, V, 5) float: top, left, height, width, flip (0/1)
    logits: torch.Tensor  # (m, V, C)
    prompts: list[list[str]]  # (C, T): the prompts whose mean embedding is class c


def sample_views(
    n: int, views: int, size: tuple[int, int], min_scale: float, *, seed: int
) -> torch.Tensor:
    """(n, views, 5) random resized crop boxes (torchvision's ``RandomResizedCrop.get_params``,
    area in [min_scale, 1], ratio 3/4..4/3) and flips, drawn from ``seed`` alone (torch's
    global RNG is left as it was)."""
    from torchvision.transforms import RandomResizedCrop

    img = torch.empty(1, *size)
    out = torch.empty(n, views, 5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            for v in range(views):
                top, left, h, w = RandomResizedCrop.get_params(
                    img, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3)
                )
                out[i, v] = torch.tensor([top, left, h, w, float(torch.rand(()) < 0.5)])
    return out


def view_batch(x: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """``x`` (..., 3, H, W) cropped to one box ``view`` (5,: top, left, height, width, flip),
    resized back to (H, W) (bilinear, antialiased; differentiable) and flipped when set."""
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w, flip = (int(v) for v in view.tolist())
    y = TF.resized_crop(x, top, left, h, w, list(x.shape[-2:]), antialias=True)
    return y.flip(-1) if flip else y


def apply_views(pixels: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Row i of ``pixels`` (B, 3, H, W) in view ``views[i]`` (B, 5) (`view_batch`)."""
    rows = [view_batch(x, v) for x, v in zip(pixels, views, strict=True)]
    return torch.stack(rows) if rows else pixels


@torch.no_grad()
def relabel(
    model: torch.nn.Module,
    pixels: torch.Tensor,
    classifier: torch.Tensor,
    prompts: list[list[str]],
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    opts: RelabelOptions | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> SoftLabels:
    """The teacher's soft label for each of ``opts.views`` views of every image.

    pixels: (m, 3, H, W) in [0, 1] at the model's input size; classifier: (C, d) the
    teacher's `otcurate.evaluate.class_means` of ``prompts``' embeddings. A view's logits are the
    teacher's ``logit_scale.exp()`` times the cosines of its image embedding to the C
    classes; the student is trained by KL to their softmax (`SoftReplay`).
    """
    o = opts or RelabelOptions()
    m = len(pixels)
    views = sample_views(m, o.views, tuple(pixels.shape[-2:]), o.min_scale, seed=seed)
    dev = next(model.parameters()).device
    mu = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    was_training = model.training
    model.eval()
    scale = model.logit_scale.exp().clamp(max=100.0)
    w = classifier.to(dev)
    flat = views.reshape(m * o.views, 5)
    src = pixels.repeat_interleave(o.views, dim=0)
    out = []
    try:
        for i in range(0, len(flat), batch_size):
            x = apply_views(src[i : i + batch_size], flat[i : i + batch_size]).to(dev)
            f = F.normalize(model.encode_image((x - mu) / sd), dim=-1)
            out.append((scale * f @ w.T).float().cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(out) if out else torch.empty(0, len(classifier))
    return SoftLabels(views, logits.reshape(m, o.views, -1), [list(p) for p in prompts])


PICKERS: dict[str, Callable[..., Distilled]] = {"random_real": random_real}


def distill(
    method: str, classes: np.ndarray, candidates: np.ndarray, ipc: int, *, seed: int
) -> Distilled:
    """Index-picking methods (real examples); `wmdd` synthesises instead (`barycenters` +
    `synthesize`)."""
    if method not in PICKERS:
        raise ValueError(
            f"{method!r} does not pick real examples; pickers: {', '.join(sorted(PICKERS))}."
        )
    return PICKERS[method](classes, candidates, ipc, seed=seed)


@dataclass(frozen=True)
class WmddSet:
    """A synthesised set: one pair per barycenter point, in the ingest record format."""

    uids: list[str]
    captions: list[str]  # the class's prompt, or (no labels) the real caption nearest the point
    labels: list[int]  # -1 without labels
    images: list[bytes]  # PNG
    pixels: np.ndarray  # (m, 3, H, W) in [0, 1]
    row_names: list[str]  # the class (or cluster) name of each image
    losses: list[float]
    metrics: dict


def wmdd(
    clip,
    image: torch.Tensor,
    text: torch.Tensor,
    image_bytes: Callable[[int], bytes],
    captions: Sequence[str],
    classes: np.ndarray,
    candidates: np.ndarray,
    ipc: int,
    info: ClassInfo | None,
    opts: WmddOptions | None = None,
    *,
    seed: int,
    log: Callable[[str, float, int], None] | None = None,
) -> WmddSet:
    """WMDD's distilled set from the candidates (rows of the train split) in `clip`'s
    feature space: per class the barycenter of the candidates' image features (``image``),
    then one image synthesised per point (`synthesize`), captioned by the class's prompt.

    ``info`` None means ``classes`` are text clusters (no usable labels): each cluster's
    mean text embedding stands in for its class prompt, and each image takes the real
    caption nearest its point. ``image_bytes(i)`` and ``captions[i]`` are train row i's
    (only the rows sampled for the activation statistics are read)."""
    from PIL import Image

    from otcurate import models
    from otcurate.data.builtin import png_bytes
    from otcurate.evaluate import class_embeddings, zero_shot_accuracy

    o = opts or WmddOptions()
    device = clip.device
    bary = barycenters(image, classes, candidates, ipc, seed=seed, max_iter=o.barycenter_iter)
    cls_ids = [int(c) for c in np.unique(bary.classes)]
    index = {c: i for i, c in enumerate(cls_ids)}
    if info is not None:
        names = [info.class_names[c] for c in cls_ids]
        embed_text = functools.partial(models.encode_texts, clip, batch_size=512)
        classifier = class_embeddings(embed_text, names, info.templates)
    else:
        names = [f"cluster {c}" for c in cls_ids]
        means = [text[candidates[classes[candidates] == c]].mean(0) for c in cls_ids]
        classifier = F.normalize(torch.stack(means), dim=-1)
    rng = np.random.default_rng(seed)
    real = {}
    for c in cls_ids:
        members = candidates[classes[candidates] == c]
        take = np.sort(rng.choice(members, size=min(o.stat_samples, len(members)), replace=False))
        x, _ = models.pairs_to_tensors(
            [image_bytes(int(i)) for i in take], [captions[int(i)] for i in take], clip
        )
        real[c] = x.to(device)
    cfg = clip.preprocess_cfg
    start = None
    if o.init == "real":  # the real candidate nearest each barycenter point
        start = models.decode_pixels([image_bytes(int(i)) for i in bary.nearest], clip)
    syn = synthesize(
        clip.model,
        bary,
        classifier,
        index,
        class_statistics(clip.model, real, where=o.stat_layers),
        size=models.input_size(cfg) or (32, 32),
        mean=tuple(cfg.get("mean")),
        std=tuple(cfg.get("std")),
        scale=float(clip.model.logit_scale.detach().exp().clamp(max=100.0)),
        opts=o,
        seed=seed,
        log=log,
        init=start,
    )
    uid, cap, lab, png = [], [], [], []
    count: dict[int, int] = {}
    for j, c in enumerate(bary.classes.tolist()):
        n = count.get(c, 0)
        count[c] = n + 1
        uid.append(f"wmdd-{c}-{n}")
        if info is not None:
            cap.append(info.templates[n % len(info.templates)].format(info.class_names[c]))
        else:  # the real caption nearest (in image features) to the barycenter point
            cap.append(captions[int(bary.nearest[j])])
        lab.append(c if info is not None else -1)
        arr = (syn.pixels[j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        png.append(png_bytes(Image.fromarray(arr)))
    # Sanity: does the base model read each synthetic image as its class?
    x, _ = models.pairs_to_tensors(png, cap, clip)
    img, _ = models.encode(clip, x)
    y = torch.tensor([index[c] for c in bary.classes.tolist()])
    metrics = {
        "pairs": len(uid),
        "classes": len(cls_ids),
        "synthetic_zs_acc": zero_shot_accuracy(img, classifier.cpu(), y),
        "final_loss": syn.losses[-1] if syn.losses else float("nan"),
        **{f"final_{k}": v for k, v in syn.terms.items()},
        "barycenter_w2": float(np.mean(list(bary.cost.values()))),
    }
    rows = [names[index[c]] for c in bary.classes.tolist()]
    return WmddSet(uid, cap, lab, png, syn.pixels.numpy(), rows, syn.losses, metrics)


def class_prompts(
    info: ClassInfo | None,
    class_ids: Sequence[int],
    *,
    captions: Sequence[str] | None = None,
    text: torch.Tensor | None = None,
    classes: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    per_class: int = 8,
) -> list[list[str]]:
    """(C, T) prompts standing for each class in ``class_ids``: its zero-shot prompts (the
    templates filled with its name), or without labels (``info`` None) the ``T`` real
    captions nearest its cluster's mean text embedding, T = min(per_class, smallest cluster),
    so that every class has as many."""
    if info is not None:
        return [[t.format(info.class_names[c]) for t in info.templates] for c in class_ids]
    members = {c: candidates[classes[candidates] == c] for c in class_ids}
    t = max(1, min(per_class, *(len(m) for m in members.values())))
    out = []
    for c in class_ids:
        rows = members[c]
        centre = F.normalize(text[rows].mean(0), dim=0)
        near = rows[(text[rows] @ centre).argsort(descending=True)[:t].numpy()]
        out.append([captions[int(i)] for i in near])
    return out


def soft_label_set(
    clip,
    images: Sequence[bytes],
    prompts: list[list[str]],
    opts: RelabelOptions | None = None,
    *,
    seed: int,
) -> SoftLabels:
    """`relabel` with `clip` as the teacher, on encoded images (the distilled set's rows):
    its mean prompt embeddings are the classes."""  # fmt: skip
    from otcurate import models

    cfg = clip.preprocess_cfg
    texts = models.encode_texts(clip, [p for row in prompts for p in row], batch_size=512)
    return relabel(
        clip.model,
        models.decode_pixels(list(images), clip),
        class_means(texts, len(prompts)),
        prompts,
        mean=tuple(cfg.get("mean")),
        std=tuple(cfg.get("std")),
        opts=opts,
        seed=seed,
    )


@dataclass(frozen=True, kw_only=True)
class SoftReplay:
    """A soft-labelled distilled set (`otcurate.distill.relabel`) learned beside the pairs:
    each step, ``batch_size`` of its images, one stored view each, and the student's
    image-to-class distribution (its own logit scale, against its own mean embeddings of
    the class prompts) pulled by KL to the teacher's at ``temperature`` (SRe2L's loss,
    scaled by temperature²), weighted by ``weight`` beside the pair loss."""

    pixels: torch.Tensor  # (m, 3, H, W) in [0, 1]
    views: torch.Tensor  # (m, V, 5) crop boxes and flips
    logits: torch.Tensor  # (m, V, C) the teacher's
    prompts: torch.Tensor  # (C * T, L) tokens, class-major
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weight: float = 1.0
    temperature: float = 1.0
    batch_size: int = 64
    # BatchNorm on the views: "running" (normalise by the running statistics, never update
    # them: fine-tuning a trained model) or "batch" (train on them like any batch: a
    # student from scratch, as SRe2L's).
    batch_norm: str = "running"

    def __post_init__(self) -> None:
        if self.batch_norm not in ("running", "batch"):
            raise ValueError(f"batch_norm must be 'running' or 'batch'; got {self.batch_norm!r}.")
        m, v, c = self.logits.shape
        if len(self.pixels) != m or self.views.shape[:2] != (m, v):
            raise ValueError(
                f"soft labels for {m} images x {v} views, but {len(self.pixels)} images and "
                f"views of shape {tuple(self.views.shape)}."
            )
        if len(self.prompts) % c:
            raise ValueError(f"{len(self.prompts)} prompts do not split into {c} classes.")
        if self.temperature <= 0 or self.weight < 0 or self.batch_size < 1:
            raise ValueError(
                "SoftReplay needs temperature > 0, weight >= 0 and batch_size >= 1; got "
                f"{self.temperature}, {self.weight}, {self.batch_size}."
            )

    def loss(self, model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
        return soft_label_loss(model, self, gen, batch_stats=self.batch_norm == "batch")


def soft_label_loss(
    model: torch.nn.Module, r: SoftReplay, gen: torch.Generator, *, batch_stats: bool = False
) -> torch.Tensor:
    """T² · KL(teacher ‖ student) over the classes, averaged over a random batch of views.

    ``batch_stats`` False: the image tower's BatchNorm layers normalise the views by their
    running statistics and leave them as they are, so that synthetic or heavily cropped
    images never shift the statistics real images are read with (a student equal to its
    teacher then has loss 0). True (a student from scratch, as SRe2L's): BatchNorm trains
    on the views as on any batch.
    """
    device = next(model.parameters()).device
    m, n_views, c = r.logits.shape
    idx = torch.randperm(m, generator=gen)[: min(r.batch_size, m)]
    view = torch.randint(0, n_views, (len(idx),), generator=gen)
    x = apply_views(r.pixels[idx], r.views[idx, view]).to(device)
    mu = torch.tensor(r.mean, device=device).view(1, 3, 1, 1)
    sd = torch.tensor(r.std, device=device).view(1, 3, 1, 1)
    norms = [] if batch_stats else [
        layer for layer in model.modules()
        if isinstance(layer, _NORM) and layer.training
    ]  # fmt: skip
    for layer in norms:
        layer.eval()
    try:
        img = model.encode_image((x - mu) / sd, normalize=True)
    finally:
        for layer in norms:
            layer.train()
    cls = class_means(model.encode_text(r.prompts.to(device), normalize=True), c)
    t = r.temperature
    student = F.log_softmax(model.logit_scale.exp() * img @ cls.T / t, dim=-1)
    teacher = F.log_softmax(r.logits[idx, view].to(device) / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def soft_label_metrics(soft: SoftLabels, labels: Sequence[int] | None) -> dict[str, float]:
    """The teacher's view of the set: mean entropy (nats) of its soft labels and, with
    labels (indices into the classes), how often a view's top class is its image's."""
    p = soft.logits.softmax(-1)
    out = {
        "relabel_views": int(soft.logits.shape[1]),
        "relabel_teacher_entropy": float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()),
    }
    if labels is not None and len(labels):
        y = torch.as_tensor(list(labels)).view(-1, 1)
        out["relabel_teacher_view_acc"] = float((soft.logits.argmax(-1) == y).float().mean())
    return out
