"""Every method's options record and the four method registries, without torch.

A record is a keyword-only frozen dataclass that checks its own values; params.yaml's
per-method subsections (`detect.ot`, `coreset.goracs`, `finetune.ncu`, ...) are built from
them. A registry maps each method's name to its function (``module:name``, imported when the
method runs) and its record. Nothing here imports torch, so that params can be checked, and a
stage can start, in a fraction of a second; the algorithms' modules re-export their records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from otcurate.methods import Method

# ------------------------------------------------------------------ detect


@dataclass(frozen=True, kw_only=True)
class MinibatchOptions:
    """Random batches of ``batch_size`` pairs, scores averaged over ``passes`` partitions."""

    batch_size: int = 256
    passes: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2; got {self.batch_size}.")
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1; got {self.passes}.")


@dataclass(frozen=True, kw_only=True)
class SinkhornOptions(MinibatchOptions):
    """Entropic OT on each batch: ``reg`` on the max-normalised 1 - cosine cost."""

    reg: float = 0.02
    max_iter: int = 1000
    tol: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reg > 0:
            raise ValueError(f"reg must be > 0; got {self.reg}.")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1; got {self.max_iter}.")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0; got {self.tol}.")


@dataclass(frozen=True, kw_only=True)
class OTOptions(SinkhornOptions):
    """ot: minibatch entropic OT (see `ot_score`). ``relative_to``: a pair's own-cell plan
    mass relative to its image's best cell (``row``), or also to its caption's best cell
    (``both``: the geometric mean of the two ratios; a caption that another image of the
    batch explains better scores lower). ``trim``: ``mixture`` first sets aside the pairs
    a two-component mixture on the cosine calls noisy with a posterior above
    ``trim_posterior`` (they score below every other pair, in the cosine's order) and
    solves OT among the rest only; ``none`` solves it on all."""

    relative_to: Literal["row", "both"] = "row"
    trim: Literal["none", "mixture"] = "none"
    trim_posterior: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.relative_to not in ("row", "both"):
            raise ValueError(f"relative_to must be 'row' or 'both'; got {self.relative_to!r}.")
        if self.trim not in ("none", "mixture"):
            raise ValueError(f"trim must be 'none' or 'mixture'; got {self.trim!r}.")
        if not 0.0 < self.trim_posterior < 1.0:
            raise ValueError(f"trim_posterior must be in (0, 1); got {self.trim_posterior}.")


@dataclass(frozen=True, kw_only=True)
class SoftmaxOptions(MinibatchOptions):
    """ncu_batch, gmm_loss: in-batch InfoNCE with the CLIP temperature ``logit_scale`` (the
    scale itself, not its log; clamped to <= 100). None is CLIP's clamp, 100; the pipeline
    gives the model's own."""

    logit_scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0; got {self.logit_scale}.")

    @property
    def scale(self) -> float:
        return 100.0 if self.logit_scale is None else float(self.logit_scale)


@dataclass(frozen=True, kw_only=True)
class InfoOTOptions(SinkhornOptions):
    """infoot: ``lam`` weighs the mutual-information term, ``h`` the kernel bandwidth
    (relative to the median distance), ``outer_iter`` Sinkhorn solves on the linearised
    objective."""

    lam: float = 0.01
    h: float = 0.5
    outer_iter: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0; got {self.lam}.")
        if not self.h > 0:
            raise ValueError(f"h must be > 0; got {self.h}.")
        if self.outer_iter < 1:
            raise ValueError(f"outer_iter must be >= 1; got {self.outer_iter}.")


# ------------------------------------------------------------------ coreset, distill


@dataclass(frozen=True, kw_only=True)
class GoracsOptions:
    """goracs: cost = distance/max - lam * gradnorm/max; swap refinement limits."""

    lam: float = 0.5
    max_iters: int = 100  # accepted swaps at most (the reference's default)
    cut_num: int = 10  # members and outsiders tried per swap round (pruned by the duals' estimate)
    grouped: bool = True  # split the budget by the target's classes (or text clusters)
    groups: int = 10  # k-means clusters of the text embeddings when there are no labels
    target_max: int = 2000  # subsample the target (val) to at most this many pairs
    candidate_max: int = 20000  # pre-cluster larger pools into max(this, 2 x budget)
    grad_batch_size: int = 256  # batches for the per-pair gradient norms

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0; got {self.lam}.")
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0; got {self.max_iters}.")
        for name in ("cut_num", "groups", "target_max", "candidate_max", "grad_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}.")


STAT_LAYERS = ("stages", "batchnorm")  # where wmdd matches activation statistics


@dataclass(frozen=True, kw_only=True)
class WmddOptions:
    """wmdd: per-class Wasserstein barycenter (``barycenter_iter`` iterations), then
    ``steps`` of pixel optimisation (Adam betas (0.5, 0.9), cosine ``lr``) weighing three
    terms; ``stat_samples`` real images per class give the activation statistics."""

    barycenter_iter: int = 100
    steps: int = 300
    lr: float = 0.05
    w_feat: float = 1.0  # feature-to-barycenter distance
    w_ce: float = 1.0  # cross-entropy against the zero-shot class embeddings
    w_stat: float = 1.0  # per-class activation statistics matching
    stat_samples: int = 256  # real images per class for the statistics
    # Each step's augmentation: "resized" (SRe2L/WMDD recover's random resized crop, area in
    # [min_scale, 1], and flip; the same views relabel draws) or "shift" (reflection-padded
    # shift and flip, as this stage had before relabel).
    crop: str = "resized"
    min_scale: float = 0.08
    # Where the statistics are matched: "stages" (the outputs of the ResNet's residual
    # stages) or "batchnorm" (the input of every BatchNorm layer, as the reference's
    # BNFeatureHook), the first layer's term weighted by first_stat_weight (the reference's
    # first_bn_multiplier is 10).
    stat_layers: str = "stages"
    first_stat_weight: float = 1.0
    # The pixels' start: "noise" (the reference, SRe2L's) or "real" (the real candidate
    # nearest each barycenter point, as DM/MTT-style distillation starts from real images).
    init: str = "noise"

    def __post_init__(self) -> None:
        if self.init not in ("noise", "real"):
            raise ValueError(f"init must be 'noise' or 'real'; got {self.init!r}.")
        if self.stat_layers not in STAT_LAYERS:
            raise ValueError(
                f"stat_layers must be one of {', '.join(STAT_LAYERS)}; got {self.stat_layers!r}."
            )
        if self.first_stat_weight < 0:
            raise ValueError(f"first_stat_weight must be >= 0; got {self.first_stat_weight}.")
        for name in ("barycenter_iter", "steps", "lr", "stat_samples"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}.")
        if self.crop not in ("resized", "shift"):
            raise ValueError(f"crop must be 'resized' or 'shift'; got {self.crop!r}.")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1]; got {self.min_scale}.")
        for name in ("w_feat", "w_ce", "w_stat"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}.")


# ------------------------------------------------------------------ finetune


@dataclass(frozen=True, kw_only=True)
class FilterOptions:
    """filter: drop detect's flagged pairs. ``rounds`` > 1: after each equal share of the
    steps the pairs are scored again by the model being fine-tuned and as many as detect
    flagged are dropped. ``rescore``: the detect method that scores them (with the options
    the caller gives, else its defaults), or ``detect``: the method and options detect
    itself ran with (the pipeline reads them from detect's saved detector)."""

    rounds: int = 1
    rescore: str = "clip_score"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1; got {self.rounds}.")
        if self.rescore not in (*DETECT_METHODS, "detect"):
            raise ValueError(
                f"rescore must be 'detect' or one of {', '.join(DETECT_METHODS)}; "
                f"got {self.rescore!r}."
            )


@dataclass(frozen=True, kw_only=True)
class GradientAscentOptions:
    ascent_weight: float = 0.1  # weight of the (capped) ascent term on flagged pairs

    def __post_init__(self) -> None:
        if self.ascent_weight < 0:
            raise ValueError(f"ascent_weight must be >= 0; got {self.ascent_weight}.")


@dataclass(frozen=True, kw_only=True)
class NCUOptions:
    """NCU's own options; the optimisation budget (steps, batch, lr of phase B, warm-up,
    weight decay) is every fine-tuning method's and comes separately.

    Defaults follow the reference; the options marked *departure* keep this project's
    earlier behaviour available for the ablation (``bench/ncu_diag.py``)."""

    # Where noisy rows come from: detect's global flags, or the reference's per-batch rule.
    nc_source: Literal["detect", "batch"] = "detect"
    # Per-batch rule: flag the lowest int(nc_ratio * B) own-caption probabilities.
    nc_ratio: float = 0.1
    # nc_source='detect': unlearn at most int(unlearn_cap * B) flagged rows per batch, those
    # with the lowest own-caption probability (about the reference's count); the other
    # flagged rows are dropped from the batch (`others: drop`) or trained as clean (`keep`).
    # null: unlearn every flagged row (departure: the earlier behaviour).
    unlearn_cap: float | None = 0.1
    others: Literal["drop", "keep"] = "drop"
    phase_a_fraction: float = (
        0.2  # share of the steps learning the negation prompt (2 of 10 epochs)
    )
    n_ctx: int = 4  # prompt vectors after the start token (reference: 8 with a 77-token context)
    lr_phase_a: float = 2e-4  # text tower in phase A (reference ratio 1e-4 : 5e-5 to phase B)
    lr_prompt: float = 6e-4  # prompt in phase A (reference ratio 3e-4 : 5e-5)
    prompt_weight_decay: float = 0.2  # reference (departure: 0)
    reg: float = 0.03  # entropic strength of the unlearning OT
    gamma: float = 0.7  # weight of the OT plan in the targets
    # First text blocks frozen in phase B; null: the reference's share (5 of 12) of the depth.
    frozen_text_blocks: int | None = None
    freeze_token_embedding: bool = False  # departure: true
    train_image_projection: bool = True  # in phase A, as the reference (departure: false)
    # reference: the extra row carries gamma + (1 - gamma) k; normalised: departure
    text_targets: Literal["reference", "normalised"] = "reference"
    # one: one warm-up + cosine over both phases (reference); per_phase: departure
    schedule: Literal["one", "per_phase"] = "one"
    augment_negated: bool = True  # EDA swap/deletion on the caption the prompt negates

    def __post_init__(self) -> None:
        choices = {
            "nc_source": ("detect", "batch"),
            "others": ("drop", "keep"),
            "text_targets": ("reference", "normalised"),
            "schedule": ("one", "per_phase"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}."
                )
        for name in ("nc_ratio", "phase_a_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}.")
        if self.unlearn_cap is not None and not 0.0 < self.unlearn_cap <= 1.0:
            raise ValueError(f"unlearn_cap must be in (0, 1] or null; got {self.unlearn_cap}.")
        for name in ("n_ctx", "reg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}.")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1]; got {self.gamma}.")
        if self.prompt_weight_decay < 0:
            raise ValueError(f"prompt_weight_decay must be >= 0; got {self.prompt_weight_decay}.")
        if self.frozen_text_blocks is not None and self.frozen_text_blocks < 0:
            raise ValueError(
                f"frozen_text_blocks must be >= 0 or null; got {self.frozen_text_blocks}."
            )


@dataclass(frozen=True, kw_only=True)
class RematchOptions:
    mass: float = 0.1  # ρ: share of the (uniform, unit) mass the partial plan moves
    reg: float = 0.01  # entropic strength on the cost relu(1 - cosine)
    tau: float = 0.05  # temperature of the soft-target loss
    weight: float = 1.0  # weight of the rematch loss beside the clean pairs' CLIP loss
    pool: Literal["flagged", "batch"] = "flagged"  # captions a flagged image may take
    max_iter: int = 1000
    tol: float = 1e-3  # the reference's Sinkhorn stops at 1e-3

    def __post_init__(self) -> None:
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1]; got {self.mass}.")
        for name in ("reg", "tau", "max_iter", "tol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}.")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0; got {self.weight}.")
        if self.pool not in ("flagged", "batch"):
            raise ValueError(f"pool must be 'flagged' or 'batch'; got {self.pool!r}.")


# ------------------------------------------------------------------ registries

DETECT_METHODS: dict[str, Method] = {
    "clip_score": Method("otcurate.detect.scorers:clip_score"),
    "ot": Method("otcurate.detect.scorers:ot_score", OTOptions),
    "ncu_batch": Method("otcurate.detect.scorers:ncu_batch_score", SoftmaxOptions),
    "gmm_loss": Method("otcurate.detect.scorers:gmm_loss_score", SoftmaxOptions),
    "infoot": Method("otcurate.detect.infoot:infoot_score", InfoOTOptions),
}
CORESET_METHODS: dict[str, Method] = {
    "random": Method("otcurate.coreset:random"),
    "clip_score": Method("otcurate.coreset:clip_score"),
    "kcenter": Method("otcurate.coreset:kcenter"),
    "goracs": Method("otcurate.coreset:goracs", GoracsOptions),
}
DISTILL_METHODS: dict[str, Method] = {
    "random_real": Method("otcurate.distill:random_real"),
    "wmdd": Method("otcurate.distill:synthesize", WmddOptions),
}
# Every method (dispatched by otcurate.finetuning): fn(model, images, tokens, opts, *, noisy,
# steps, batch_size, lr, warmup, weight_decay, seed, log); `opts` is its options record
# (None: defaults).
FINETUNE_METHODS: dict[str, Method] = {
    "clip": Method("otcurate.train:finetune_clip"),
    "filter": Method("otcurate.filtering:finetune_filter", FilterOptions),
    "gradient_ascent": Method("otcurate.train:finetune_gradient_ascent", GradientAscentOptions),
    "ncu": Method("otcurate.ncu:finetune_ncu", NCUOptions),
    "rematch": Method("otcurate.train:finetune_rematch", RematchOptions),
}
