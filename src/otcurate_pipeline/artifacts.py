"""One owner per stage output format: a writer and a reader each, the uid alignment checked
inside the reader, so a stage never reads another's output by hand.

| artifact | written by | files in the folder |
|---|---|---|
| embeddings | embed | `<split>-<k>.safetensors` + `.uids.parquet` (format: `otcurate.data.shards`) |
| scores | detect, `otcurate score` | `scores.parquet`: uid, score (high = clean), noisy; `otcurate score` adds index, caption |
| subset | coreset | `subset.parquet`: uid, weight, score |
| detector | detect | `detector.json` (+ `detector.safetensors`: the fitted InfoOT plan) |
| distilled set | distill | ingest's record format: `train-00000.parquet` + `classes.json` (+ `soft_labels.safetensors` and `soft_labels.json` when relabelled) |

Writers write into a folder the caller has opened with `otcurate.io.atomic_dir`. Readers
given `uids` raise `Mismatch` (a ValueError whose message says what to rerun) unless the
artifact covers exactly those uids in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from otcurate.io import read_json, write_json, write_parquet

SCORES, SUBSET = "scores.parquet", "subset.parquet"
DETECTOR, DETECTOR_TENSORS = "detector.json", "detector.safetensors"
SOFT_LABELS, SOFT_LABEL_TENSORS = "soft_labels.json", "soft_labels.safetensors"


class Mismatch(ValueError):
    """Two stage outputs disagree (different uids): an upstream stage must be rerun."""


def check_uids(
    folder: Path, got: list[str], uids: Sequence[str] | None, against: str, rerun: str
) -> None:
    """Mismatch unless `got` (the uids `folder` holds) are `uids`, in order; None checks nothing."""
    if uids is not None and got != list(uids):
        raise Mismatch(
            f"{folder} does not match {against} (different uids); "
            f"rerun {rerun} (dvc repro {rerun})."
        )


def read_embeddings(
    folder: str | Path, split: str, uids: Sequence[str] | None = None, *, against: str = ""
):
    """(uids, image (n, d), text (n, d)) of one split, as `otcurate.data.shards` stores them."""
    from otcurate.data.shards import read_embeddings as read

    got, image, text = read(folder, split)
    check_uids(Path(folder), got, uids, against or f"the {split} split", "embed")
    return got, image, text


@dataclass(frozen=True)
class Scores:
    uids: list[str]
    score: np.ndarray  # (n,) float64, high = clean
    noisy: np.ndarray  # (n,) bool, the detector's flags

    def flagged(self) -> set[str]:
        return {u for u, f in zip(self.uids, self.noisy, strict=True) if f}


def write_scores(
    folder: Path, uids: Sequence[str], score, noisy, extra: dict[str, pa.Array] | None = None
) -> None:
    """`scores.parquet`: uid, score, noisy, then the `extra` columns (e.g. index, caption)."""
    columns = {
        "uid": pa.array(list(uids), pa.string()),
        "score": pa.array(np.asarray(score, dtype=np.float64), pa.float64()),
        "noisy": pa.array(np.asarray(noisy, dtype=bool), pa.bool_()),
        **(extra or {}),
    }
    write_parquet(Path(folder) / SCORES, pa.table(columns))


def read_scores(
    folder: str | Path, uids: Sequence[str] | None = None, *, against: str = "the train split"
) -> Scores:
    folder = Path(folder)
    t = pq.read_table(folder / SCORES, columns=["uid", "score", "noisy"])
    got = t["uid"].to_pylist()
    check_uids(folder, got, uids, against, "detect")
    return Scores(
        got,
        np.asarray(t["score"].to_pylist(), dtype=np.float64),
        np.asarray(t["noisy"].to_pylist(), dtype=bool),
    )


@dataclass(frozen=True)
class Subset:
    uids: list[str]
    weight: np.ndarray  # (k,) float64
    score: np.ndarray  # (k,) float64


def write_subset(folder: Path, uids: Sequence[str], weight, score) -> None:
    table = pa.table(
        {
            "uid": pa.array(list(uids), pa.string()),
            "weight": pa.array(np.asarray(weight, dtype=np.float64), pa.float64()),
            "score": pa.array(np.asarray(score, dtype=np.float64), pa.float64()),
        }
    )
    write_parquet(Path(folder) / SUBSET, table)


def read_subset(folder: str | Path) -> Subset:
    t = pq.read_table(Path(folder) / SUBSET)
    return Subset(
        t["uid"].to_pylist(),
        np.asarray(t["weight"].to_pylist(), dtype=np.float64),
        np.asarray(t["score"].to_pylist(), dtype=np.float64),
    )


def write_detector(folder: Path, meta: dict[str, Any], tensors: dict[str, Any]) -> None:
    """A fitted detector's state (`otcurate.detect.detector_state`)."""
    from safetensors.torch import save_file

    write_json(Path(folder) / DETECTOR, meta)
    if tensors:
        save_file(tensors, str(Path(folder) / DETECTOR_TENSORS))


def read_detector(
    folder: str | Path, with_tensors: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, tensors) for `otcurate.detect.detector_from_state`; FileNotFoundError if absent.
    ``with_tensors`` False: the meta alone (its method and options), tensors {}."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_json(folder / DETECTOR)
    tensors = folder / DETECTOR_TENSORS
    return meta, load_file(str(tensors)) if with_tensors and tensors.exists() else {}


def distilled_table(uids, images, captions, labels) -> pa.Table:
    """Synthetic pairs as ingest records (clean, their own caption source)."""
    from otcurate.data.records import SCHEMA

    n = len(uids)
    columns = {
        "uid": list(uids),
        "split": ["train"] * n,
        "image": list(images),
        "caption": list(captions),
        "label": pa.array(list(labels), pa.int32()),
        "noisy": [False] * n,
        "caption_from": list(uids),
    }
    return pa.table(columns, schema=SCHEMA)


def write_distilled(folder: Path, table: pa.Table, info) -> None:
    """The distilled set in ingest's format (one shard + classes.json), so `finetune` reads
    it like real data."""
    from otcurate.data.shards import write_classes, write_split

    write_split(Path(folder), "train", table, shard_size=max(1, table.num_rows))
    write_classes(Path(folder), info)


def read_distilled(folder: str | Path, columns: list[str] | None = None) -> pa.Table:
    from otcurate.data.shards import read_split

    return read_split(folder, "train", columns=columns)


def write_soft_labels(folder: Path, uids: Sequence[str], soft) -> None:
    """The distilled set's soft labels (`otcurate.distill.SoftLabels`), row i for uid i:
    views and teacher logits as tensors, the class prompts and uids as JSON."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file(
        {"views": soft.views.contiguous(), "logits": soft.logits.contiguous()},
        str(folder / SOFT_LABEL_TENSORS),
    )
    write_json(folder / SOFT_LABELS, {"uids": list(uids), "prompts": soft.prompts})


@dataclass(frozen=True)
class SoftLabelSet:
    views: Any  # (m, V, 5) torch.Tensor
    logits: Any  # (m, V, C) torch.Tensor
    prompts: list[list[str]]


def read_soft_labels(folder: str | Path, uids: Sequence[str]) -> SoftLabelSet | None:
    """The soft labels of the distilled set in `folder`, aligned to `uids` (its rows), or
    None when distill wrote none (distill.relabel.views 0)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / SOFT_LABELS).exists():
        return None
    meta = read_json(folder / SOFT_LABELS)
    check_uids(folder, meta["uids"], uids, "the distilled set", "distill")
    t = load_file(str(folder / SOFT_LABEL_TENSORS))
    return SoftLabelSet(t["views"], t["logits"], meta["prompts"])
