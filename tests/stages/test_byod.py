"""The README's "Bring your own data" walk-through, end to end at a small size: a folder of
PNGs named like splits (train_000001.png, the trap that drops metadata) with 40% of the
captions mismatched in the files themselves (no `ingest.noise`), a clean judge set given as
`evaluate.sets` (a parquet classification set whose labels are class names), every stage
in order. It checks that no caption is lost, that the report leads with the clean set and
calls the test split what it is, and that the closing table says the same."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from otcurate_support import ROOT, STAGE_PATHS, tiny_params
from PIL import Image

from otcurate.data import builtin
from otcurate_pipeline.runner import Workspace

N = 300


def _png(image: bytes) -> bytes:
    with Image.open(io.BytesIO(image)) as im:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


def _collection(folder: Path) -> int:
    """N shapes pairs as an imagefolder; 40% of the captions moved to another image."""
    import numpy as np

    folder.mkdir(parents=True)
    recs = list(builtin.shapes(3, N, 32))
    captions = [r.caption for r in recs]
    rng = np.random.default_rng(0)
    wrong = rng.choice(N, int(0.4 * N), replace=False)
    moved = np.roll(wrong, 1)
    for a, b in zip(wrong, moved, strict=True):
        captions[a] = recs[b].caption
    lines = []
    for i, r in enumerate(recs):
        name = f"train_{i:06d}.png"
        (folder / name).write_bytes(_png(r.image))
        lines.append(json.dumps({"file_name": name, "text": captions[i]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return int((np.array(captions) != np.array([r.caption for r in recs])).sum())


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


def test_own_folder_with_noise_in_the_files_and_a_clean_judge_end_to_end(tmp_path, capsys):
    wrong = _collection(tmp_path / "pairs")
    names = _judge(tmp_path / "judge.parquet")
    params = tiny_params(
        {
            "ingest": {
                "source": "hf",
                "size": None,
                "noise": {"rate": 0.0},
                "hf": {
                    "path": "imagefolder",
                    "data_dir": str(tmp_path / "pairs"),
                    "caption_column": "text",
                },
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
