"""The README's "Bring your own data" walk-through, end to end at a small size, once for each
local format it documents: an imagefolder of PNGs named like splits (train_000001.png, the
trap that drops metadata), a CSV of image paths, parquet files of image bytes, and
webdataset tars. In each, 40% of the captions are mismatched in the files themselves (no
`ingest.noise`), and a clean judge set is given as `evaluate.sets` (a parquet
classification set whose labels are class names); every stage runs in order. It checks that
no caption is lost, that the report leads with the clean set and calls the test split what
it is, and that the closing table says the same."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from otcurate_support import ROOT, STAGE_PATHS, tiny_params, write_tar
from PIL import Image

from otcurate.data import builtin
from otcurate_pipeline.runner import Workspace

N = 300


def _png(image: bytes) -> bytes:
    with Image.open(io.BytesIO(image)) as im:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


def _noisy_pairs() -> tuple[list[bytes], list[str], int]:
    """N shapes pairs as PNG bytes and captions, 40% of the captions moved to another image;
    also how many captions are now wrong."""
    recs = list(builtin.shapes(3, N, 32))
    captions = [r.caption for r in recs]
    rng = np.random.default_rng(0)
    wrong = rng.choice(N, int(0.4 * N), replace=False)
    for a, b in zip(wrong, np.roll(wrong, 1), strict=True):
        captions[a] = recs[b].caption
    n_wrong = int((np.array(captions) != np.array([r.caption for r in recs])).sum())
    return [_png(r.image) for r in recs], captions, n_wrong


def _imagefolder(folder: Path, images: list[bytes], captions: list[str]) -> dict:
    lines = []
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        name = f"train_{i:06d}.png"  # names datasets would read as a split of their own
        (folder / name).write_bytes(image)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {"path": "imagefolder", "data_dir": str(folder), "caption_column": "text"}


def _csv(folder: Path, images: list[bytes], captions: list[str]) -> dict:
    (folder / "images").mkdir()
    with open(folder / "pairs.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["filepath", "title"])
        for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
            (folder / "images" / f"{i:06d}.png").write_bytes(image)
            out.writerow([f"images/{i:06d}.png", caption])
    return {
        "path": "csv",
        "data_files": [str(folder / "pairs.csv")],
        "image_column": "filepath",
        "caption_column": "title",
    }


def _parquet(folder: Path, images: list[bytes], captions: list[str]) -> dict:
    t = pa.table({"image": pa.array(images, pa.binary()), "caption": captions})
    half = len(images) // 2
    files = [folder / "part-0.parquet", folder / "part-1.parquet"]
    pq.write_table(t.slice(0, half), files[0])
    pq.write_table(t.slice(half), files[1])
    return {"path": "parquet", "data_files": [str(f) for f in files]}


def _webdataset(folder: Path, images: list[bytes], captions: list[str]) -> dict:
    half = len(images) // 2
    files = [folder / "shard-00.tar", folder / "shard-01.tar"]
    for path, keys in zip(files, (range(half), range(half, len(images))), strict=True):
        write_tar(path, [m for i in keys for m in ((f"{i:06d}.png", images[i]),
                                                   (f"{i:06d}.txt", captions[i].encode()))])  # fmt: skip
    return {
        "path": "webdataset",
        "data_files": [str(f) for f in files],
        "image_column": "png",
        "caption_column": "txt",
    }


FORMATS = {"imagefolder": _imagefolder, "csv": _csv, "parquet": _parquet, "webdataset": _webdataset}


def _collection(folder: Path, fmt: str) -> tuple[dict, list[str], int]:
    """The noisy pairs written in `fmt` under `folder`: the `ingest.hf` section that reads
    them, the captions as written, and how many of them are wrong."""
    folder.mkdir(parents=True)
    images, captions, n_wrong = _noisy_pairs()
    return FORMATS[fmt](folder, images, captions), captions, n_wrong


def _judge(path: Path) -> list[str]:
    recs = list(builtin.shapes(11, 80, 32))
    names = builtin.shapes_classes().class_names
    t = pa.table(
        {
            "image": pa.array([r.image for r in recs], pa.binary()),
            "caption": [r.caption for r in recs],
            "label": [names[r.label] for r in recs],  # class names, not ids
        }
    )
    pq.write_table(t, path)
    return sorted(set(t["label"].to_pylist()))  # the classes the set's labels name


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_own_collection_with_noise_in_the_files_and_a_clean_judge_end_to_end(tmp_path, capsys, fmt):
    hf, captions, wrong = _collection(tmp_path / "pairs", fmt)
    names = _judge(tmp_path / "judge.parquet")
    params = tiny_params(
        {
            "ingest": {
                "source": "hf",
                "size": None,
                "noise": {"rate": 0.0},
                "hf": hf,
            },
            "evaluate": {
                "sets": [
                    {
                        "name": "judge",
                        "task": "classification",
                        "source": "hf",
                        "size": None,
                        "hf": {
                            "path": "parquet",
                            "data_files": [str(tmp_path / "judge.parquet")],
                            "label_column": "label",
                        },
                    }
                ]
            },
        }
    )
    ws = Workspace(tmp_path / "run", params, repo=ROOT)
    for stage, paths in STAGE_PATHS.items():
        assert ws.run(stage, **paths) == 0, capsys.readouterr().err
    m = ws.metrics("results/ingest")
    assert m["pairs"] == N and m["noise_rate_planted"] == 0.0  # every caption kept
    assert wrong > 0.3 * N
    shards = sorted((ws.root / "data" / "ingest").glob("*-*.parquet"))
    ingested = pa.concat_tables([pq.read_table(f, columns=["caption"]) for f in shards])
    assert sorted(ingested["caption"].to_pylist()) == sorted(captions)  # the files' own noise

    e = ws.metrics("results/evaluate")
    assert e["test_split_clean"] == 0.0
    assert 0 <= e["base_judge_zs_acc"] <= 1 and "forgetting_finetune_judge" in e
    report = (ws.root / "results" / "evaluate" / "report.md").read_text()
    judge_at = report.index(f"## judge (classification; 80 images, {len(names)} classes)")
    split_at = report.index("## held-out test split (may contain noise)")
    assert judge_at < split_at and "## Forgetting" in report
    assert "clean test split" not in report
    d = ws.metrics("results/detect")
    assert 0 <= d["mixture_noise_rate"] <= 1 and d["mixture_noise_rate_std"] >= 0

    from otcurate_pipeline import cli

    capsys.readouterr()
    cli._print_comparison(ws.root / "results" / "evaluate", ["judge"])
    out = capsys.readouterr().out
    assert out.index("judge (clean, evaluate.sets)") < out.index(
        "held-out test split (may contain noise)"
    )
    assert "Nothing clean judged" not in out
    cli._print_comparison(ws.root / "results" / "evaluate", [])
    assert "Nothing clean judged this model" in capsys.readouterr().out
