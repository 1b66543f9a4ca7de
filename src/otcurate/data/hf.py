"""Image-text pairs from anything Hugging Face `datasets.load_dataset` opens.

A hub name (when online), or a packaged builder over local files:
`imagefolder` (images + metadata.csv/jsonl with a caption column), `csv`/`json`
(a column of image paths), `parquet` (image bytes or paths), `webdataset`
(tars of <key>.png/.jpg + <key>.txt). Images are never decoded by `datasets`
(`Image(decode=False)`), so one corrupt file becomes one rejected record with
its reason instead of a crash.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otcurate.data.records import ClassInfo, RecordLimits, check_record, content_uid


class SourceError(ValueError):
    """The source cannot be read as configured; the message says what to change."""


@dataclass(frozen=True)
class RawPair:
    index: int  # position in the source
    uid: str
    image: bytes | None
    caption: Any
    label: int
    reject: str | None  # why this pair is unusable, or None


def _image_bytes(value: Any, image_root: Path | None) -> tuple[bytes | None, str | None]:
    if value is None:
        return None, "missing image"
    if isinstance(value, bytes | bytearray):
        return bytes(value), None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        value = value.get("path")
        if not value:
            return None, "missing image"
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and image_root is not None:
            path = image_root / path
        try:
            return path.read_bytes(), None
        except FileNotFoundError:
            return None, f"image file not found: {path}"
        except OSError as exc:
            return None, f"image file unreadable: {path} ({exc})"
    if hasattr(value, "save"):  # a decoded PIL image
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue(), None
    return None, f"unsupported image value of type {type(value).__name__}"


def _not_utf8(key: str, exc: UnicodeDecodeError, data_files: Any, data_dir: Any) -> SourceError:
    files = data_files
    if not files and data_dir:  # imagefolder: its metadata file is the text
        files = sorted(str(f) for f in Path(data_dir).rglob("metadata.*")) or data_dir
    return SourceError(
        f"{key}: cannot read {_shown(files)}: it is not UTF-8 text ({exc}). Save it as UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8 FILE > NEW) and rerun."
    )


def _shown(files: Any) -> str:
    files = [files] if isinstance(files, str) else list(files or [])
    return ", ".join(map(str, files[:3])) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")


_SPLIT_DIRS = {"train", "training", "test", "testing", "val", "valid", "validation", "dev", "eval"}


def _imagefolder_files(data_dir: str, split: str) -> list[str] | None:
    """Every file under an imagefolder `data_dir`, to pass as the one `split`, or None when
    the folder has split subfolders (train/, test/ ...) for `datasets` to infer.

    Given a folder, `datasets` infers splits from the file names: with images named
    `train_0001.png` it makes a split of them that the top-level metadata file matches
    none of, drops the metadata and every caption with it. Listed files keep it."""
    root = Path(data_dir)
    if any(d.is_dir() and d.name.lower() in _SPLIT_DIRS for d in root.iterdir()):
        return None
    files = sorted(
        str(f)
        for f in root.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts)
    )
    return files or None


def _default_image_root(data_files: Any, data_dir: str | None) -> Path | None:
    if data_dir:
        return Path(data_dir)
    first = data_files[0] if isinstance(data_files, list) and data_files else data_files
    if isinstance(first, str):
        return Path(first).parent
    return None


def load_pairs(
    path: str,
    *,
    name: str | None = None,
    data_dir: str | None = None,
    data_files: str | list[str] | None = None,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    image_root: str | None = None,
    class_names: list[str] | None = None,
    limit: int | None = None,
    start: int = 0,
    streaming: bool = False,
    multi_caption: bool = False,
    limits: RecordLimits = RecordLimits(),
    key: str = "ingest.hf",
) -> tuple[Iterator[RawPair], ClassInfo | None, int | None]:
    """Open a `datasets` source; returns (pairs from row `start` on, class info or None,
    number of rows or None when streaming without `limit`). Each pair is checked by
    `records.check_record` under `limits`. Messages name the settings as `key`.<option>
    (the params section the caller read them from, e.g. "evaluate.sets[0].hf")."""
    import datasets

    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    if name:
        kwargs["name"] = name
    if data_dir:
        if not os.path.isdir(data_dir) and path in {
            "imagefolder",
            "csv",
            "json",
            "parquet",
            "webdataset",
        }:
            raise SourceError(
                f"{key}.data_dir {data_dir!r} is not a folder; point it at the folder with your files."
            )
        listed = _imagefolder_files(data_dir, split) if path == "imagefolder" else None
        if listed is not None and not data_files:
            kwargs["data_files"] = {split: listed}
        else:
            kwargs["data_dir"] = data_dir
    if data_files:
        kwargs["data_files"] = data_files
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except FileNotFoundError as exc:
        raise SourceError(
            f"{key}: cannot open {path!r}: {exc}. Check {key}.path, data_dir and data_files."
        ) from exc
    except UnicodeDecodeError as exc:
        raise _not_utf8(key, exc, data_files, data_dir) from None
    except (ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        where = f" from {_shown(data_files or data_dir)}" if data_files or data_dir else ""
        if "corresponds to no data" in str(exc):
            raise SourceError(
                f"{key}: {path!r}{where} holds no rows for split {split!r} (a file with a header "
                "only, or no matching files); give files with at least one pair."
            ) from None
        raise SourceError(f"{key}: cannot load {path!r}{where} (split {split!r}): {exc}") from exc
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        if isinstance(cause, UnicodeDecodeError):
            raise _not_utf8(key, cause, data_files, data_dir) from None
        raise SourceError(
            f"{key}: cannot read {_shown(data_files or data_dir)} as {path!r}: "
            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}. "
            f"Check that the files are {path} (UTF-8 text for csv/json) with one pair per row."
        ) from None
    except ConnectionError as exc:
        raise SourceError(
            f"{key}: {path!r} is not a local builder and the hub cannot be reached ({exc}). "
            "Use a local source (imagefolder/csv/parquet/webdataset) or run where the hub is reachable."
        ) from exc

    columns = ds.column_names
    if columns is None:  # a stream whose features are not declared: peek at the first row
        columns = list(next(iter(ds), {}).keys())
    for col, opt in ((image_column, "image_column"), (caption_column, "caption_column")):
        if col not in columns:
            raise SourceError(
                f"{key}.{opt} is {col!r} but the source has columns {columns}; "
                f"set {key}.{opt} to one of them."
            )
    if label_column is not None and label_column not in columns:
        raise SourceError(
            f"{key}.label_column is {label_column!r} but the source has columns {columns}."
        )
    if not columns or (not streaming and ds.num_rows == 0):
        raise SourceError(f"{key}: the source {path!r} split {split!r} has no rows.")

    features = ds.features or {}
    if isinstance(features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))

    info = None
    by_name: dict[str, int] | None = None  # a label column of class names: name -> id
    if label_column is not None:
        names = class_names
        feat = features.get(label_column)
        if names is None and isinstance(feat, datasets.ClassLabel):
            names = list(feat.names)
        if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
            if names is None and streaming:
                raise SourceError(
                    f"{key}.label_column {label_column!r} holds class names; a streamed source "
                    f"cannot be read ahead for them: list them in {key}.class_names."
                )
            if names is None:
                names = sorted({str(v) for v in ds[label_column] if v is not None})
            by_name = {str(c): i for i, c in enumerate(names)}
        if names is None:
            raise SourceError(
                f"{key}.label_column {label_column!r} holds plain ids; give their names in {key}.class_names."
            )
        info = ClassInfo(list(names), ["a photo of a {}", "a {}"])

    root = Path(image_root) if image_root else _default_image_root(data_files, data_dir)
    if streaming:
        n = limit
        rows = ds.select_columns([c for c in (image_column, caption_column, label_column) if c])
        rows = rows.skip(start) if start else rows
    else:
        n = ds.num_rows if limit is None else min(limit, ds.num_rows)
        rows = ds.select_columns([c for c in (image_column, caption_column, label_column) if c])
        rows = rows.select(range(min(start, n), n)) if start else rows

    def gen() -> Iterator[RawPair]:
        for i, row in enumerate(rows, start):
            if n is not None and i >= n:
                return
            image, reason = _image_bytes(row[image_column], root)
            caption = row[caption_column]
            if multi_caption and isinstance(caption, list | tuple) and caption:
                # several captions of one image (evaluation sets): one pair per caption
                for c in caption:
                    why = reason or check_record(image, c, limits)
                    uid = content_uid(image or b"", c) if why is None else f"row-{i}"
                    yield RawPair(i, uid, image, c.strip() if isinstance(c, str) else c, -1, why)
                continue
            if reason is None:
                reason = check_record(image, caption, limits)
            value = row[label_column] if label_column is not None else None
            if by_name is not None:
                label = by_name.get(str(value), -1) if value is not None else -1
                if value is not None and label < 0:
                    reason = reason or f"label {value!r} is not in {key}.class_names"
            else:
                label = int(value) if value is not None else -1
            if info is not None and not (0 <= label < len(info.class_names)):
                reason = (
                    reason or f"label {row[label_column]!r} outside 0..{len(info.class_names) - 1}"
                )
            uid = (
                content_uid(image or b"", caption if isinstance(caption, str) else "")
                if reason is None
                else f"row-{i}"
            )
            yield RawPair(
                i,
                uid,
                image,
                caption.strip() if isinstance(caption, str) else caption,
                label,
                reason,
            )

    return gen(), info, n


def source_kwargs(h) -> dict[str, Any]:
    """`load_pairs` keywords from a `params.HFSource` (ingest.hf, or a clean source's hf)."""
    keys = ("name", "data_dir", "data_files", "split", "image_column", "caption_column")
    keys += ("label_column", "image_root", "class_names", "streaming")
    return {"path": h.path, **{k: getattr(h, k) for k in keys}}


_BUILDERS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".tar": "webdataset",
}


def local_source(path: str | Path) -> dict[str, Any]:
    """`load_pairs` keywords for a local file or folder, by its contents.

    A file: by extension (.csv, .parquet, .json/.jsonl, .tar webdataset). A folder: its
    .tar shards (webdataset), its parquet files, an imagefolder (images + metadata.csv /
    metadata.jsonl), or its CSV files, in that order.
    """
    p = Path(path)
    if p.is_file():
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise SourceError(
                f"{p}: unknown file type {p.suffix!r}; give a .csv, .parquet, .json(l) or .tar (webdataset) file, or a folder."
            )
        return {"path": builder, "data_files": [str(p)]}
    if not p.is_dir():
        raise SourceError(f"{p} does not exist; give a file or folder of image-text pairs.")
    for pattern, builder in (("*.tar", "webdataset"), ("*.parquet", "parquet")):
        files = sorted(str(f) for f in p.glob(pattern))
        if files:
            return {"path": builder, "data_files": files}
    if (p / "metadata.csv").exists() or (p / "metadata.jsonl").exists():
        return {"path": "imagefolder", "data_dir": str(p)}
    files = sorted(str(f) for f in p.glob("*.csv"))
    if files:
        return {"path": "csv", "data_files": files}
    raise SourceError(
        f"{p} holds no .tar, .parquet, metadata.csv/jsonl (imagefolder) or .csv files of image-text pairs."
    )
