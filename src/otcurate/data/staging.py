"""Resumable streaming ingest: the source read once, in order, into fixed-size chunk files.

Phase 1 (`Stager`) appends validated records to `<staging>/chunk-<k>.parquet`, one file per
`size` source records, each written atomically together with a `state.json` that says how
far into the source the finished chunks reach. A crash loses at most the chunk being
filled: on a rerun with the same fingerprint (params + source manifest), the finished
chunks are kept, the dedup sets are rebuilt from their hash columns, and reading resumes
after the last finished chunk. Phase 2 (`finalize`) streams the chunks into the per-split
shards (`ShardWriter`), planting noise on the train captions. Memory is bounded by a chunk,
the dedup hash sets (8 bytes of sha1 per record) and the train captions.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from otcurate import faults
from otcurate.data.records import SCHEMA, SPLITS
from otcurate.io import write_json, write_parquet
from otcurate.progress import track

STATE = "state.json"
CHUNK_SCHEMA = pa.schema(  # the record columns of a shard, then the exact-duplicate hashes
    [SCHEMA.field(name) for name in ("uid", "split", "image", "caption", "label")]
    + [pa.field(name, pa.int64()) for name in ("pair_hash", "image_hash", "caption_hash")]
)


def h64(data: bytes) -> int:
    """The first 8 bytes of sha1 as a signed int64 (exact-duplicate detection)."""
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big", signed=True)


@dataclass
class Counts:
    consumed: int = 0  # source records covered by finished chunks
    rows: int = 0
    rejected: int = 0
    duplicate_pairs: int = 0
    duplicate_images: int = 0
    duplicate_captions: int = 0
    chunks: list[str] = field(default_factory=list)


class Stager:
    """Phase 1: records in, finished chunk files out; resumable. See the module doc."""

    def __init__(self, staging: Path, fingerprint: str, chunk_records: int, drop_images: bool):
        self.dir = Path(staging)
        self.fingerprint = fingerprint
        self.chunk_records = chunk_records
        self.drop_images = drop_images
        self.counts = Counts()
        self.pairs: set[int] = set()
        self.images: set[int] = set()
        self.captions: set[int] = set()
        self._rows: list[tuple] = []
        self._rejects: list[dict] = []
        self._pending = 0  # source records read since the last finished chunk
        self.resumed = self._resume()

    def _resume(self) -> bool:
        state = self.dir / STATE
        if state.exists():
            saved = json.loads(state.read_text())
            if saved.get("fingerprint") == self.fingerprint:
                self.counts = Counts(**saved["counts"])
                for name in self.counts.chunks:
                    t = pq.read_table(
                        self.dir / name, columns=["pair_hash", "image_hash", "caption_hash"]
                    )
                    self.pairs.update(t["pair_hash"].to_pylist())
                    self.images.update(t["image_hash"].to_pylist())
                    self.captions.update(t["caption_hash"].to_pylist())
                return bool(self.counts.chunks)
        shutil.rmtree(self.dir, ignore_errors=True)  # another source or params: start over
        self.dir.mkdir(parents=True)
        return False

    def reject(self, index: int, uid: str, reason: str) -> None:
        self._rejects.append({"index": index, "uid": uid, "reason": reason})
        self.counts.rejected += 1
        self._tick()

    def add(self, uid: str, split: str, image: bytes, caption: str, label: int) -> None:
        p, i, c = h64(image + b"\0" + caption.encode()), h64(image), h64(caption.encode())
        dup_image, dup_caption = i in self.images, c in self.captions
        self.counts.duplicate_images += dup_image
        self.counts.duplicate_captions += dup_caption
        if p in self.pairs:
            self.counts.duplicate_pairs += 1
        elif not (dup_image and self.drop_images):
            self.pairs.add(p)
            self.images.add(i)
            self.captions.add(c)
            self._rows.append((uid, split, image, caption, label, p, i, c))
        self._tick()

    def _tick(self) -> None:
        self._pending += 1
        if self._pending >= self.chunk_records:
            self.flush()

    def flush(self) -> None:
        """Write the chunk being filled (if any records were read) and the state, atomically."""
        if self._pending == 0:
            return
        name = f"chunk-{len(self.counts.chunks):06d}"
        cols = list(zip(*self._rows, strict=True)) if self._rows else [[]] * 8
        table = pa.table(
            {f.name: pa.array(list(v), f.type) for f, v in zip(CHUNK_SCHEMA, cols, strict=True)}
        )
        write_parquet(self.dir / f"{name}.parquet", table)
        (self.dir / f"{name}.rejects.jsonl").write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in self._rejects)
        )
        self.counts.chunks.append(f"{name}.parquet")
        self.counts.consumed += self._pending
        self.counts.rows += len(self._rows)
        self._rows, self._rejects, self._pending = [], [], 0
        write_json(
            self.dir / STATE, {"fingerprint": self.fingerprint, "counts": self.counts.__dict__}
        )
        faults.point(f"staging:chunk:{len(self.counts.chunks)}")

    def rejects(self) -> Iterable[str]:
        for name in self.counts.chunks:
            yield from (self.dir / name.replace(".parquet", ".rejects.jsonl")).open()


class ShardWriter:
    """Rows in, `<split>-<k>.parquet` files of exactly `size` rows out (the last may be short)."""

    def __init__(self, out: Path, split: str, size: int):
        self.out, self.split, self.size = Path(out), split, size
        self._parts: list[pa.Table] = []
        self._n = 0
        self.files: list[str] = []

    def add(self, table: pa.Table) -> None:
        self._parts.append(table)
        self._n += table.num_rows
        while self._n >= self.size:
            self._write(self.size)

    def _write(self, n: int) -> None:
        t = pa.concat_tables(self._parts)
        name = f"{self.split}-{len(self.files):05d}.parquet"
        write_parquet(self.out / name, t.slice(0, n).cast(SCHEMA))
        rest = t.slice(n)
        self._parts, self._n = ([rest] if rest.num_rows else []), rest.num_rows
        self.files.append(name)

    def close(self) -> None:
        if self._n or not self.files:
            self._write(self._n)


def finalize(
    staging: Path,
    chunks: list[str],
    out: Path,
    shard_size: int,
    train_uids: list[str],
    train_captions: list[str],
    noisy: np.ndarray,
    caption_from: np.ndarray,
) -> None:
    """Phase 2: the finished chunks, in order, into `out`'s per-split shards of `shard_size`
    rows. Train rows take their (possibly noised) caption from ``train_captions``, with
    ``noisy`` flags and ``caption_from`` (the train position whose caption they got, named
    by ``train_uids``; -1: a generic caption, from no pair), all indexed by train position; val and test keep their captions."""
    writers = {s: ShardWriter(out, s, shard_size) for s in SPLITS}
    k = 0  # position in the train split
    for name in track(chunks, total=len(chunks), description="ingest: shards"):
        t = pq.read_table(staging / name, columns=["uid", "split", "image", "caption", "label"])
        for s in SPLITS:
            part = t.filter(pc.equal(t["split"], s))
            m = part.num_rows
            if m == 0:
                continue
            if s == "train":
                caps = pa.array(train_captions[k : k + m], pa.string())
                flags = pa.array(noisy[k : k + m], pa.bool_())
                src = pa.array(
                    [train_uids[j] if j >= 0 else "" for j in caption_from[k : k + m]], pa.string()
                )
                k += m
            else:
                caps, flags, src = part["caption"], pa.array(np.zeros(m, bool)), part["uid"]
            columns = {
                "uid": part["uid"],
                "split": part["split"],
                "image": part["image"],
                "caption": caps,
                "label": part["label"],
                "noisy": flags,
                "caption_from": src,
            }
            writers[s].add(pa.table(columns))
    for w in writers.values():
        w.close()


def read_column(staging: Path, chunks: list[str], columns: list[str]) -> dict[str, list]:
    """Some columns of every chunk, concatenated (no images)."""
    out: dict[str, list] = {c: [] for c in columns}
    for name in chunks:
        t = pq.read_table(Path(staging) / name, columns=columns)
        for c in columns:
            out[c].extend(t[c].to_pylist())
    return out


def split_positions(splits: list[str], name: str) -> np.ndarray:
    return np.flatnonzero(np.asarray(splits, dtype=object) == name)
