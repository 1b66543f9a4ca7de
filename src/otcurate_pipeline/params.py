"""Typed, strict loading of params.yaml sections.

Each stage owns one section (same name as the stage) and reads `base` too.
Loading is strict: an unknown key, a wrong type or a bad combination raises
`ParamsError` naming the key and the fix, before any work starts. Missing keys
take the defaults below, which are also the values shipped in params.yaml.

Method names are checked against the library's registries
(`otcurate.options`: `DETECT_METHODS`, ...) so a new method needs no change here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ParamsError(ValueError):
    """A params.yaml value is unknown, mistyped or inconsistent."""


def _choices(registry: str) -> dict[str, Any]:
    return {"choices": registry}


@dataclass(frozen=True)
class Base:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads; the same seed and threads give the same bytes.
    threads: int = 2


@dataclass(frozen=True)
class Noise:
    # Planted per caption (NCR-style): this fraction of train captions is replaced ...
    rate: float = 0.0
    # ... by another pair's (shuffle), a close pair's (near), an uninformative one (generic),
    # or an equal mix of the three (otcurate.data.records.plant_noise).
    kind: Literal["shuffle", "near", "generic", "mixed"] = "shuffle"


@dataclass(frozen=True)
class HFSource:
    # Anything `datasets.load_dataset` opens: a hub name, or a builder such as
    # "imagefolder", "csv", "parquet", "webdataset" with data_dir/data_files.
    path: str | None = None
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str | None = None
    # Base folder for relative image paths in CSV/JSON sources.
    image_root: str | None = None
    # Class names for label ids (zero-shot evaluation); null = from the dataset features.
    class_names: list[str] | None = None
    # Read the source as a stream (`datasets` streaming: hub datasets, no local Arrow cache).
    streaming: bool = False


@dataclass(frozen=True)
class SourceSpec:
    """A clean source read whole (evaluation sets, the coreset target), not ingested."""

    source: Literal["shapes", "glyphs", "digits", "hf"] = "hf"
    size: int | None = 1000  # pairs to read at most (null = all; shapes: how many to make)
    seed: int = 1  # built-in sources: a seed other than base.seed draws pairs training never saw
    image_size: int = 32
    hf: HFSource = field(default_factory=HFSource)

    def check(self) -> None:
        if self.size is not None:
            _positive("size", self.size)
        if self.source in ("shapes", "glyphs") and self.size is None:
            raise ParamsError(f"a '{self.source}' source needs a size (how many pairs to make).")
        if self.source == "hf" and not self.hf.path:
            raise ParamsError(
                "an 'hf' source needs hf.path (a hub name or imagefolder | csv | json | parquet | "
                "webdataset with hf.data_dir or hf.data_files)."
            )


@dataclass(frozen=True)
class EvalSet(SourceSpec):
    # classification: images + labels + class names (+ prompt templates) -> zero-shot top-1/5;
    # retrieval: image-text pairs, several captions per image allowed (rows sharing an image,
    # or a list-of-captions column) -> i2t / t2i recall@k.
    name: str = ""
    task: Literal["classification", "retrieval"] = "retrieval"
    templates: list[str] | None = None  # classification prompts, "{}" = class name

    def check(self) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", self.name):
            raise ParamsError(
                f"evaluate.sets: each set needs a name of letters, digits, _ or - (got {self.name!r})."
            )
        super().check()
        if self.task == "classification" and self.source == "hf" and not self.hf.label_column:
            raise ParamsError(
                f"evaluate.sets {self.name}: a classification set needs hf.label_column (and "
                "hf.class_names unless the column is a ClassLabel)."
            )


@dataclass(frozen=True)
class Ingest:
    source: Literal["shapes", "glyphs", "digits", "hf"] = "shapes"
    # Number of pairs to generate (shapes, glyphs) or to keep at most (digits, hf; null = all).
    size: int | None = 12000
    image_size: int = 32
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    shard_size: int = 4096
    on_bad_record: Literal["skip", "fail"] = "skip"
    # A record over either limit is a bad record (skipped and listed, or a stop under `fail`):
    # pixels from the image header (before decoding; decompression bombs are refused at any
    # size), characters of the caption.
    max_image_pixels: int = 64_000_000
    max_caption_chars: int = 4096
    # Exact duplicates (sha1): identical pairs are always dropped; drop_images also drops a
    # pair whose image bytes came earlier (with another caption). Both are counted.
    duplicates: Literal["drop_pairs", "drop_images"] = "drop_pairs"
    noise: Noise = field(default_factory=Noise)
    hf: HFSource = field(default_factory=HFSource)

    def check(self) -> None:
        for key in ("max_image_pixels", "max_caption_chars"):
            if getattr(self, key) < 1:
                raise ParamsError(f"ingest.{key} must be >= 1; got {getattr(self, key)}.")
        _frac("ingest.val_fraction", self.val_fraction)
        _frac("ingest.test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ParamsError(
                "ingest.val_fraction + ingest.test_fraction must be < 1 so that a train split remains; "
                f"got {self.val_fraction} + {self.test_fraction}."
            )
        _frac("ingest.noise.rate", self.noise.rate)
        _positive("ingest.image_size", self.image_size)
        _positive("ingest.shard_size", self.shard_size)
        if self.size is not None:
            _positive("ingest.size", self.size)
        if self.source in ("shapes", "glyphs") and self.size is None:
            raise ParamsError(
                f"ingest.size must be set for source '{self.source}' (how many pairs to generate)."
            )
        if self.source == "hf" and not (self.hf.path):
            raise ParamsError(
                "ingest.source is 'hf' but ingest.hf.path is empty: set it to a hub dataset name or a "
                "builder ('imagefolder', 'csv', 'parquet', 'webdataset') with ingest.hf.data_dir or data_files."
            )


class _Methods:
    """Sections with per-method subsections: `method_options()` is the chosen one's record."""

    def method_options(self) -> Any:
        registry = _registry(type(self).METHOD_OPTIONS)
        return getattr(self, self.method, None) or registry[self.method].options()


class _Optimised:
    """Sections that train a model share these keys: steps, batch_size, lr, warmup, weight_decay."""

    def optim_kwargs(self) -> dict[str, Any]:
        return {
            k: getattr(self, k) for k in ("steps", "batch_size", "lr", "warmup", "weight_decay")
        }


def known_archs() -> list[str]:
    """open_clip's architecture names and otcurate's, from their config folders (without
    importing open_clip, which takes seconds)."""
    import importlib.util

    folders = [Path(__file__).resolve().parents[1] / "otcurate" / "model_configs"]
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) / "model_configs" for p in spec.submodule_search_locations]
    return sorted({f.stem for d in folders if d.is_dir() for f in d.glob("*.json")})


def check_arch(key: str, arch: str) -> None:
    if arch.startswith(("hf-hub:", "local-dir:")):
        return
    names = known_archs()
    if names and arch not in names:
        close = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ParamsError(
            f"{key} is {arch!r}, which is not an open_clip architecture.{hint} Known: "
            f'{", ".join(names[:12])}, ... ({len(names)} in all; `python -c "import open_clip; '
            'print(open_clip.list_models())"` lists them), or an hf-hub:ORG/NAME model.'
        )


@dataclass(frozen=True)
class Pretrain(_Optimised):
    # An open_clip architecture name, or "otcurate-tiny" (registered by otcurate).
    arch: str = "otcurate-tiny"
    # An open_clip pretrained tag, a checkpoint file/folder, or null to train `arch` from scratch.
    pretrained: str | None = None
    steps: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.1

    def check(self) -> None:
        _nonneg("pretrain.steps", self.steps)
        _positive("pretrain.batch_size", self.batch_size)
        _positive("pretrain.lr", self.lr)
        _nonneg("pretrain.warmup", self.warmup)
        _nonneg("pretrain.weight_decay", self.weight_decay)
        check_arch("pretrain.arch", self.arch)
        if self.pretrained is None and self.steps == 0:
            raise ParamsError(
                "pretrain.pretrained is null and pretrain.steps is 0: nothing would be trained. "
                "Set pretrain.steps > 0 or give pretrained weights."
            )


@dataclass(frozen=True)
class Embed:
    batch_size: int = 512
    # null: in-process; 'local' / 'local:N': a Dask LocalCluster of N workers on 127.0.0.1;
    # 'tcp://host:port': a running Dask scheduler (its workers must see the same paths).
    dask: str | None = None
    # DataLoader processes decoding images (in-process runs; 0 = decode in the main process).
    workers: int = 0
    # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def resolved_precision(self, device_type: str) -> str:
        if self.precision == "auto":
            return "bf16" if device_type == "cuda" else "fp32"
        return self.precision

    def check(self) -> None:
        _positive("embed.batch_size", self.batch_size)
        _nonneg("embed.workers", self.workers)
        from otcurate.data.cluster import check_dask_address

        try:
            check_dask_address(self.dask)
        except ValueError as exc:
            raise ParamsError(str(exc)) from None


@dataclass(frozen=True)
class Detect(_Methods):
    method: str = field(default="clip_score", metadata=_choices("otcurate.options:DETECT_METHODS"))
    # Flag by exactly one of: the lowest-scoring `fraction` of train pairs, scores below
    # `threshold`, or `auto` (a two-component mixture on the scores estimates the noise rate).
    fraction: float | None = 0.2
    threshold: float | None = None
    auto: bool = False
    # With `fraction`: flag more when the scores are bimodal and their mixture estimates a
    # higher noise rate (the fraction becomes a floor; bench/results/flagrule.md). Ignored
    # with `threshold` or `auto`.
    raise_fraction: bool = True
    # Per-method subsections (detect.ot, detect.ncu_batch, detect.gmm_loss, detect.infoot):
    # the library's options records (otcurate.options.DETECT_METHODS), added by _schema.
    METHOD_OPTIONS: typing.ClassVar[str] = "otcurate.options:DETECT_METHODS"

    def check(self) -> None:
        scale = getattr(self.method_options(), "logit_scale", None)
        if scale is not None and not 0 < scale <= 100:
            raise ParamsError(
                f"detect.{self.method}.logit_scale must be in (0, 100] (CLIP clamps it there); got {scale}."
            )
        if sum([self.fraction is not None, self.threshold is not None, self.auto]) != 1:
            raise ParamsError(
                "detect: set exactly one of detect.fraction and detect.threshold, or detect.auto: true "
                f"(got fraction={self.fraction}, threshold={self.threshold}, auto={self.auto}); "
                "set the others to null/false."
            )
        if self.fraction is not None:
            _frac("detect.fraction", self.fraction)


@dataclass(frozen=True)
class Coreset(_Methods):
    method: str = field(default="goracs", metadata=_choices("otcurate.options:CORESET_METHODS"))
    # Budget: exactly one of a fraction of the train split, or an absolute size.
    fraction: float | None = 0.5
    size: int | None = None
    # Leave out the pairs that `detect` flagged noisy.
    exclude_flagged: bool = True
    # goracs target: null = the ingest val split; or a clean source (as an evaluate.sets entry,
    # without name/task), embedded with the base model.
    target: SourceSpec | None = None
    # Per-method subsection coreset.goracs: otcurate.options.GoracsOptions, added by _schema.
    METHOD_OPTIONS: typing.ClassVar[str] = "otcurate.options:CORESET_METHODS"

    def check(self) -> None:
        if (self.fraction is None) == (self.size is None):
            raise ParamsError(
                "coreset: set exactly one of coreset.fraction and coreset.size "
                f"(got fraction={self.fraction}, size={self.size}); set the other to null."
            )
        if self.fraction is not None:
            if not 0.0 < self.fraction <= 1.0:
                raise ParamsError(f"coreset.fraction must be in (0, 1]; got {self.fraction}.")
        if self.size is not None:
            _positive("coreset.size", self.size)


@dataclass(frozen=True)
class Relabel:
    # WMDD's third step (SRe2L's relabel), for either method: `views` augmented views of
    # every distilled image (random resized crop, area in [min_scale, 1], and flip), each
    # with the base model's soft label over the class prompts; finetune learns the set by
    # KL to them (finetune.soft_labels). views 0 (the default, as measured in
    # bench/results/curation.md): no soft labels, the set is hard pairs.
    views: int = 0
    min_scale: float = 0.08

    def check(self) -> None:
        _nonneg("distill.relabel.views", self.views)
        if not 0.0 < self.min_scale <= 1.0:
            raise ParamsError(f"distill.relabel.min_scale must be in (0, 1]; got {self.min_scale}.")


@dataclass(frozen=True)
class Distill(_Methods):
    method: str = field(
        default="random_real", metadata=_choices("otcurate.options:DISTILL_METHODS")
    )
    # Images per class (or per cluster when the data has no labels); 0 disables distillation.
    ipc: int = 10
    # Clusters of the text embeddings used as classes when the data has no labels.
    clusters: int = 10
    relabel: Relabel = field(default_factory=Relabel)
    # Per-method subsection distill.wmdd: otcurate.options.WmddOptions, added by _schema.
    METHOD_OPTIONS: typing.ClassVar[str] = "otcurate.options:DISTILL_METHODS"

    def check(self) -> None:
        _nonneg("distill.ipc", self.ipc)
        _positive("distill.clusters", self.clusters)


@dataclass(frozen=True)
class Wise:
    # WiSE-FT: the model finetune writes is (1 - alpha) * base + alpha * fine-tuned. null:
    # off (the fine-tuned model as trained, alpha 1); a number in [0, 1]; or `choose: true`
    # to pick alpha from `alphas` on the val split (zero-shot top-1 when it has classes,
    # else mean R@1; clean for a built-in source, as noisy as the data otherwise).
    alpha: float | None = None
    choose: bool = False
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])

    def check(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ParamsError(f"finetune.wise.alpha must be in [0, 1] or null; got {self.alpha}.")
        if self.choose and (not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas)):
            raise ParamsError(
                f"finetune.wise.alphas must be a non-empty list of values in [0, 1]; got {self.alphas}."
            )

    @property
    def active(self) -> bool:
        return self.choose or (self.alpha is not None and self.alpha != 1.0)


@dataclass(frozen=True)
class SoftLabels:
    # How finetune learns a soft-labelled distilled set (distill.relabel.views > 0): each
    # step `batch_size` of its images, one stored view each, by KL to the teacher's soft
    # labels at `temperature` (times temperature²), weighted by `weight` beside the pairs.
    weight: float = 1.0
    temperature: float = 1.0
    batch_size: int = 64
    # BatchNorm on the views: running (its statistics kept as the base has them) | batch
    # (trained on the views: a model from scratch, pretrain.pretrained a fresh init).
    batch_norm: Literal["running", "batch"] = "running"

    def check(self) -> None:
        _nonneg("finetune.soft_labels.weight", self.weight)
        _positive("finetune.soft_labels.temperature", self.temperature)
        _positive("finetune.soft_labels.batch_size", self.batch_size)


@dataclass(frozen=True)
class Finetune(_Methods, _Optimised):
    method: str = field(default="clip", metadata=_choices("otcurate.options:FINETUNE_METHODS"))
    steps: int = 200
    batch_size: int = 128
    lr: float = 1e-4
    warmup: int = 15
    weight_decay: float = 0.2
    # Processes (torchrun, data parallel at the same global batch): gloo on CPU, nccl on CUDA.
    nproc: int = 1
    wise: Wise = field(default_factory=Wise)
    soft_labels: SoftLabels = field(default_factory=SoftLabels)
    # true: also fine-tune without the distilled set (twice the time) and keep whichever
    # scores higher on the val split; a warning says when the distilled set lowered it.
    check_distilled: bool = False
    # Per-method subsections finetune.filter, finetune.gradient_ascent, finetune.ncu,
    # finetune.rematch: the library's records (otcurate.options: FilterOptions,
    # GradientAscentOptions, NCUOptions, RematchOptions), added by _schema.
    METHOD_OPTIONS: typing.ClassVar[str] = "otcurate.options:FINETUNE_METHODS"

    def check(self) -> None:
        _positive("finetune.steps", self.steps)
        _positive("finetune.batch_size", self.batch_size)
        _positive("finetune.nproc", self.nproc)
        if self.nproc > self.batch_size:
            raise ParamsError(
                f"finetune.nproc ({self.nproc}) is more than finetune.batch_size ({self.batch_size}): "
                "each process needs at least one pair of the global batch; lower nproc."
            )
        _positive("finetune.lr", self.lr)
        _nonneg("finetune.warmup", self.warmup)
        _nonneg("finetune.weight_decay", self.weight_decay)


@dataclass(frozen=True)
class Evaluate:
    batch_size: int = 512
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])
    # Clean evaluation sets besides the ingest test split (see EvalSet).
    sets: list[EvalSet] = field(default_factory=list)

    def check(self) -> None:
        _positive("evaluate.batch_size", self.batch_size)
        names = [s.name for s in self.sets]
        if "test" in names or len(set(names)) != len(names):
            raise ParamsError(
                f"evaluate.sets: names must be unique and not 'test' (the ingest test split); got {names}."
            )
        if not self.recall_at or any(k < 1 for k in self.recall_at):
            raise ParamsError(
                f"evaluate.recall_at must be a non-empty list of ints >= 1; got {self.recall_at}."
            )


SECTIONS: dict[str, type] = {
    "base": Base,
    "ingest": Ingest,
    "pretrain": Pretrain,
    "embed": Embed,
    "detect": Detect,
    "coreset": Coreset,
    "distill": Distill,
    "finetune": Finetune,
    "evaluate": Evaluate,
}


@functools.cache
def _schema(section: str) -> type:
    """The section's dataclass; a section with METHOD_OPTIONS gains one subsection per
    registered method that has options, typed and defaulted by the library's own record, so
    an option is written once (in the library) and a new method needs no change here."""
    cls = SECTIONS[section]
    spec = getattr(cls, "METHOD_OPTIONS", None)
    if spec is None:
        return cls
    subsections = [
        (name, m.options, field(default_factory=m.options))
        for name, m in _registry(spec).items()
        if dataclasses.fields(m.options)
    ]
    clash = {name for name, *_ in subsections} & {f.name for f in dataclasses.fields(cls)}
    if clash:  # a schema bug, not a user error
        raise TypeError(f"{section}: methods {sorted(clash)} clash with keys of the section.")
    made = dataclasses.make_dataclass(cls.__name__, subsections, bases=(cls,), frozen=True)
    made.__module__, made.__doc__ = cls.__module__, cls.__doc__
    return made


def _frac(name: str, v: float) -> None:
    if not 0.0 <= v < 1.0:
        raise ParamsError(f"{name} must be in [0, 1); got {v}.")


def _positive(name: str, v: float) -> None:
    if not v > 0:
        raise ParamsError(f"{name} must be > 0; got {v}.")


def _nonneg(name: str, v: float) -> None:
    if not v >= 0:
        raise ParamsError(f"{name} must be >= 0; got {v}.")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true/false"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is not None and len(others) == 1 and dataclasses.is_dataclass(others[0]):
            return build(others[0], value, key)  # its own, precise error
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ParamsError as exc:
                errors.append(exc)
        raise ParamsError(
            f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})."
        )
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ParamsError(f"{key}: expected one of {_type_name(tp)}, got {value!r}.")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(
                f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})."
            )
        (arg,) = typing.get_args(tp)
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{key}: expected null, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported params type {tp} for {key}")
    raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


def build(cls: type, data: Any, key: str) -> Any:
    """Build dataclass `cls` from mapping `data` strictly; `key` names it in errors."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ParamsError(f"{key}: expected a mapping of keys to values, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        moved = [  # a method's option written flat, as params.yaml had it before subsections
            f"{key}.{name}.{k}"
            for name, f in fields.items()
            if dataclasses.is_dataclass(hints[name])
            and k in {g.name for g in dataclasses.fields(hints[name])}
        ]
        if moved:
            hint = f" A method's options live in its subsection: {', '.join(moved)}."
        raise ParamsError(
            f"{key}.{k}: unknown key.{hint} Known keys of '{key}': {', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = _convert(data[name], hints[name], f"{key}.{name}")
            registry = f.metadata.get("choices")
            if registry is not None:
                known = _registry(registry)
                if value not in known:
                    raise ParamsError(
                        f"{key}.{name}: unknown method {value!r}. Known: {', '.join(sorted(known))}."
                    )
            kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ValueError as exc:  # a library options record checks its own values
        raise ParamsError(f"{key}: {exc}") from None
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


def _registry(spec: str) -> dict[str, Any]:
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def parse_yaml(text: str) -> Any:
    """Parse params YAML the way DVC does (YAML 1.2: `5e-05` and `1e-3` are numbers)."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def load(params: Mapping[str, Any], section: str) -> Any:
    """The typed, validated `section` of a parsed params.yaml mapping."""
    if section not in SECTIONS:
        raise ParamsError(f"unknown params section {section!r}; known: {', '.join(SECTIONS)}.")
    unknown = [k for k in params if k not in SECTIONS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(SECTIONS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ParamsError(
            f"params.yaml: unknown section {unknown[0]!r}.{hint} Known sections: {', '.join(SECTIONS)}."
        )
    return build(_schema(section), params.get(section), section)


def load_all(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate every section; returns {section: typed params}."""
    return {name: load(params, name) for name in SECTIONS}


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


PARAMS_FILE = "params.yaml"  # at the project root, beside dvc.yaml


def _parse_value(text: str):
    try:
        return parse_yaml(text)
    except Exception:  # noqa: BLE001 - not YAML: keep the text
        return text


def _represent_null(representer, _data):
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _null_keeping():
    from ruamel.yaml.representer import RoundTripRepresenter

    class NullKeeping(RoundTripRepresenter):
        pass

    NullKeeping.add_representer(type(None), _represent_null)  # on the subclass only
    return NullKeeping


def apply_overrides(path: Path, overrides: list[str]) -> list[str]:
    """Write `section.key=value` overrides into the params file at `path` (comments kept),
    after validating the result; returns the changed ones. Nothing is written on an error."""
    from ruamel.yaml import YAML

    plain = read_file(path)  # a syntax error stops here, before anything is written
    ry = YAML()
    ry.preserve_quotes = True
    ry.Representer = _null_keeping()  # null stays `null` (ruamel writes an empty value)
    doc = ry.load(path.read_text())
    changed = []
    for item in overrides:
        if "=" not in item:
            raise ParamsError(
                f"--set {item!r}: expected section.key=value, e.g. --set finetune.lr=5e-5"
            )
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in SECTIONS:
            raise ParamsError(
                f"--set {item!r}: the key must start with a section ({', '.join(SECTIONS)})."
            )
        value = _parse_value(text)
        node, pnode = doc, plain
        for part in parts[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
                pnode[part] = {}
            node, pnode = node[part], pnode[part]
        if node.get(parts[-1]) != value:
            changed.append(f"{key}={value!r}")
        node[parts[-1]] = value
        pnode[parts[-1]] = value
    load_all(plain)  # strict: unknown keys, wrong types, bad combinations stop here
    if changed:
        from io import StringIO

        buf = StringIO()
        ry.dump(doc, buf)
        load_all(parse_yaml(buf.getvalue()))  # what is written must read back valid, too
        tmp = path.with_name(path.name + ".tmp-set")
        tmp.write_text(buf.getvalue())
        tmp.replace(path)
    return changed


def read_file(path: Path) -> dict[str, Any]:
    """The params file at `path` parsed (not yet validated); a YAML syntax error or a file
    that is not a mapping is a ParamsError naming the file, the line and the column."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ParamsError(
            f"params file {path} not found; run from the repository root or pass --params."
        ) from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8.") from None
    except Exception as exc:  # noqa: BLE001 - ruamel raises several parser error types
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(
            str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x
        )
        raise ParamsError(
            f"{path} is not valid YAML{where}: {what or exc}. Fix the syntax there and rerun."
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections; got {type(raw).__name__}.")
    return raw


def check_device(device: str) -> None:
    """base.device: 'cuda' needs a visible CUDA device (checked before any stage runs)."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ParamsError(
            "base.device is 'cuda' but no CUDA device is visible here "
            "(torch.cuda.is_available() is False); set base.device: auto (or cpu) and rerun."
        )


def validate_file(path: Path) -> dict[str, Any]:
    """Every section of the params file at `path`, typed and checked."""
    return load_all(read_file(path))
