"""Atomic, byte-deterministic writes of stage outputs.

Every output is first written into a temporary sibling and renamed into place
only when complete, so a crash (even SIGKILL) never leaves a half-written
output, and the previous good output survives until the new one is whole.
Writers produce the same bytes for the same content: sorted JSON keys, no
timestamps, fixed parquet/safetensors options.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from otcurate import faults

_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


def _sweep_stale(path: Path) -> None:
    """Remove temporaries left by an earlier crashed write of `path`."""
    parent = path.parent
    if not parent.exists():
        return
    for sib in parent.iterdir():
        if sib.name.startswith(path.name + _TMP_MARK) or sib.name.startswith(path.name + _OLD_MARK):
            if sib.is_dir() and not sib.is_symlink():
                shutil.rmtree(sib, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    sib.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `path` on success.

    On an exception the temporary is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    faults.point(f"commit:{path}")
    old = path.with_name(f"{path.name}{_OLD_MARK}{uuid.uuid4().hex[:8]}")
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    faults.point(f"committed:{path}")
    if old.exists() or old.is_symlink():
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(_jsonable(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(dumps_json(obj))


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    """Write `table` without pandas metadata or statistics timestamps (same table, same bytes)."""
    with atomic_file(path, "wb") as fh:
        pq.write_table(
            table.replace_schema_metadata(None),
            fh,
            compression="zstd",
            use_dictionary=False,
            write_statistics=False,
        )


def write_tsv(path: str | os.PathLike, columns: Mapping[str, Any]) -> None:
    """Write equal-length columns as a TSV (the format DVC plots read)."""
    names = list(columns)
    rows = zip(*(columns[n] for n in names), strict=True)
    lines = ["\t".join(names)]
    for row in rows:
        lines.append("\t".join(_fmt(v) for v in row))
    write_text(path, "\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return f"{float(v):.6g}"
    return str(v)
