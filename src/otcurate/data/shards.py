"""Parquet shards of pair records: `<dir>/<split>-<k>.parquet`, in source order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from otcurate.data.records import SCHEMA, SPLITS, ClassInfo
from otcurate.io import dumps_json, write_parquet

CLASSES_FILE = "classes.json"
PROVENANCE_FILE = "provenance.json"  # what ingest knows about the data: {source, held_out_clean}


def write_split(out_dir: Path, split: str, table: pa.Table, shard_size: int) -> list[str]:
    """Write `table` (sorted by uid) as shards; returns the file names."""
    table = table.cast(SCHEMA).sort_by("uid")
    names = []
    n_shards = max(1, -(-table.num_rows // shard_size))
    for k in range(n_shards):
        name = f"{split}-{k:05d}.parquet"
        write_parquet(out_dir / name, table.slice(k * shard_size, shard_size))
        names.append(name)
    return names


def shard_files(data_dir: str | Path, split: str) -> list[Path]:
    return sorted(Path(data_dir).glob(f"{split}-*.parquet"))


def read_split(data_dir: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """All records of `split`, in uid order."""
    if split not in SPLITS and split != "distilled":
        raise ValueError(f"unknown split {split!r}")
    files = shard_files(data_dir, split)
    if not files:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def read_selected(
    data_dir: str | Path, split: str, uids, columns: list[str] | None = None
) -> pa.Table:
    """The rows of `split` whose uid is in `uids`, in shard order, one shard in memory at a time."""
    wanted = pa.array(list(uids), pa.string())
    parts = [
        select_uids(pq.read_table(f, columns=columns), wanted) for f in shard_files(data_dir, split)
    ]
    if not parts:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables(parts)


def select_uids(table: pa.Table, uids: list[str] | pa.Array) -> pa.Table:
    """Rows of `table` whose uid is in `uids`, in `table` order."""
    mask = pc.is_in(table["uid"], value_set=pa.array(uids, pa.string()))
    return table.filter(mask)


def write_classes(out_dir: Path, info: ClassInfo | None) -> None:
    payload = (
        None if info is None else {"class_names": info.class_names, "templates": info.templates}
    )
    (out_dir / CLASSES_FILE).write_text(dumps_json(payload))


def write_provenance(out_dir: Path, source: str, held_out_clean: bool) -> None:
    """`held_out_clean`: the val/test splits are known to be clean (a built-in source, whose
    pairs are right by construction; planted noise touches the train split only)."""
    payload = {"source": source, "held_out_clean": held_out_clean}
    (out_dir / PROVENANCE_FILE).write_text(dumps_json(payload))


def read_provenance(data_dir: str | Path) -> dict:
    """ingest's provenance.json, or {} (nothing known: held-out splits not known clean)."""
    path = Path(data_dir) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def read_classes(data_dir: str | Path) -> ClassInfo | None:
    path = Path(data_dir) / CLASSES_FILE
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    return None if payload is None else ClassInfo(payload["class_names"], payload["templates"])


# Embeddings: `<dir>/<split>-<k>.safetensors` (image, text: float32 (n, d)) beside
# `<dir>/<split>-<k>.uids.parquet`, one pair of files per ingest shard.


def write_embedding_shard(out_dir: Path, name: str, uids: list[str], image, text) -> None:
    from safetensors.torch import save_file

    save_file(
        {"image": image.contiguous(), "text": text.contiguous()},
        str(out_dir / f"{name}.safetensors"),
    )
    write_parquet(out_dir / f"{name}.uids.parquet", pa.table({"uid": pa.array(uids, pa.string())}))


def read_embeddings(emb_dir: str | Path, split: str):
    """(uids, image (n, d), text (n, d)) of `split`, in uid order."""
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(emb_dir).glob(f"{split}-*.safetensors"))
    if not files:
        raise FileNotFoundError(Path(emb_dir) / f"{split}-*.safetensors")
    uids: list[str] = []
    imgs, txts = [], []
    for f in files:
        t = load_file(str(f))
        imgs.append(t["image"])
        txts.append(t["text"])
        uids.extend(
            pq.read_table(f.with_name(f.name.replace(".safetensors", ".uids.parquet")))[
                "uid"
            ].to_pylist()
        )
    return uids, torch.cat(imgs), torch.cat(txts)
