"""ingest on every local source format, the messages for common mistakes, exact-duplicate
handling, and resume after a crash (simulated in-process, and a real SIGKILL)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from otcurate_support import ROOT, TinyRun, write_params, write_tar
from PIL import Image

from otcurate import faults
from otcurate.data import builtin


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 5 % 256, 255 - i * 5 % 256, (i * 37) % 256)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _ingest(tmp_path: Path, hf: dict, **ingest) -> tuple[int, TinyRun, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    run = TinyRun(tmp_path)
    params = write_params(
        tmp_path,
        {
            "ingest": {
                "source": "hf",
                "size": None,
                "hf": hf,
                "val_fraction": 0.2,
                "test_fraction": 0.2,
                **ingest,
            }
        },
    )
    code = run.run("ingest", params=params, out="data/ingest", results="results/ingest")
    return code, run, params


def _rows(run: TinyRun) -> pa.Table:
    files = sorted(Path(run.p("data/ingest")).glob("*-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _metrics(run: TinyRun) -> dict:
    return json.loads(Path(run.p("results/ingest/metrics.json")).read_text())


N = 40


def make_csv(folder: Path, missing: int | None = None) -> dict:
    (folder / "images").mkdir(parents=True)
    lines = ["path,text"]
    for i in range(N):
        if i != missing:
            (folder / "images" / f"{i}.png").write_bytes(_png(i))
        lines.append(f"images/{i}.png,swatch number {i}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return {
        "path": "csv",
        "data_files": [str(folder / "pairs.csv")],
        "image_column": "path",
        "caption_column": "text",
    }


def make_parquet(folder: Path) -> dict:
    folder.mkdir(parents=True)
    t = pa.table(
        {
            "image": pa.array([_png(i) for i in range(N)], pa.binary()),
            "caption": [f"swatch number {i}" for i in range(N)],
        }
    )
    pq.write_table(t.slice(0, 25), folder / "a.parquet")
    pq.write_table(t.slice(25), folder / "b.parquet")
    return {"path": "parquet", "data_files": [str(folder / "a.parquet"), str(folder / "b.parquet")]}


def make_webdataset(folder: Path, corrupt: int | None = None) -> dict:
    folder.mkdir(parents=True)
    files = []
    for shard in range(2):
        path = folder / f"shard-{shard}.tar"
        members = []
        for i in range(shard * N // 2, (shard + 1) * N // 2):
            img = b"\x89PNG broken" if i == corrupt else _png(i)
            members += [(f"{i:04d}.png", img), (f"{i:04d}.txt", f"swatch {i}".encode())]
        write_tar(path, members)
        files.append(str(path))
    return {
        "path": "webdataset",
        "data_files": files,
        "image_column": "png",
        "caption_column": "txt",
    }


def make_imagefolder(folder: Path) -> dict:
    folder.mkdir(parents=True)
    lines = ["file_name,caption"]
    for i in range(N):
        (folder / f"{i}.png").write_bytes(_png(i))
        lines.append(f"{i}.png,swatch number {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return {"path": "imagefolder", "data_dir": str(folder)}


@pytest.mark.parametrize("make", [make_csv, make_parquet, make_webdataset, make_imagefolder])
def test_each_local_format_ingests_every_pair(tmp_path, make):
    code, run, _ = _ingest(tmp_path, make(tmp_path / "src"), shard_size=8)
    assert code == 0
    rows = _rows(run)
    assert rows.num_rows == N and len(set(rows["uid"].to_pylist())) == N
    text = "swatch {}" if make is make_webdataset else "swatch number {}"
    # planted noise permutes train captions among themselves: the multiset stays
    assert sorted(rows["caption"].to_pylist()) == sorted(text.format(i) for i in range(N))
    m = _metrics(run)
    assert m["pairs"] == N and m["rejected"] == 0
    assert m["train_pairs"] + m["val_pairs"] + m["test_pairs"] == N
    # fixed-size shards: every shard but the last of a split has shard_size rows
    for split in ("train", "val", "test"):
        sizes = [
            pq.read_metadata(f).num_rows
            for f in sorted(Path(run.p("data/ingest")).glob(f"{split}-*.parquet"))
        ]
        assert all(s == 8 for s in sizes[:-1]) and 0 < sizes[-1] <= 8


@pytest.mark.parametrize("make", [make_parquet, make_webdataset, make_imagefolder])
def test_streaming_reads_the_same_pairs_as_a_download(tmp_path, make):
    """ingest.hf.streaming goes through datasets' IterableDataset (what a hub name uses
    online); on a local source it must give exactly the shards a plain load gives."""
    hf = make(tmp_path / "src")
    code, plain, _ = _ingest(tmp_path / "plain", hf, shard_size=8)
    assert code == 0
    code, streamed, _ = _ingest(tmp_path / "streamed", {**hf, "streaming": True}, shard_size=8)
    assert code == 0
    assert _rows(streamed).equals(_rows(plain))
    assert _metrics(streamed)["pairs"] == N


def test_wrong_column_names_say_which_columns_exist(tmp_path, capsys):
    hf = make_csv(tmp_path / "src")
    code, _, _ = _ingest(tmp_path, {**hf, "caption_column": "caption"})
    err = capsys.readouterr().err
    assert code == 2
    assert "ingest.hf.caption_column is 'caption'" in err and "['path', 'text']" in err
    assert "set ingest.hf.caption_column to one of them" in err


def test_missing_image_file_is_listed_with_its_path(tmp_path, capsys):
    code, run, _ = _ingest(tmp_path, make_csv(tmp_path / "src", missing=7))
    assert code == 0
    rejects = Path(run.p("data/ingest/rejects.jsonl")).read_text().splitlines()
    assert len(rejects) == 1
    assert "image file not found" in rejects[0] and "images/7.png" in rejects[0]
    assert "skipped 1 bad records" in capsys.readouterr().err


def test_unreadable_tar_member_is_rejected_not_fatal(tmp_path, capsys):
    code, run, _ = _ingest(tmp_path, make_webdataset(tmp_path / "src", corrupt=5))
    assert code == 0
    (reject,) = [
        json.loads(x) for x in Path(run.p("data/ingest/rejects.jsonl")).read_text().splitlines()
    ]
    assert "undecodable image" in reject["reason"] and reject["index"] == 5
    assert _metrics(run)["pairs"] == N - 1


def _hostile(folder: Path) -> dict:
    """Good pairs with a decompression bomb, an image over a 100k-pixel limit, a caption of
    control characters, one of zero-width spaces and a 10 MB caption among them."""
    folder.mkdir(parents=True)
    bomb, big = io.BytesIO(), io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    Image.new("RGB", (400, 400)).save(big, format="PNG")
    images = [_png(i) for i in range(N)]
    captions = [f"swatch number {i}" for i in range(N)]
    images[3], images[4] = bomb.getvalue(), big.getvalue()
    captions[5], captions[6], captions[7] = "\x00\x1b[2J", "\u200b\u200b", "x" * 10_000_000
    pq.write_table(pa.table({"image": images, "caption": captions}), folder / "a.parquet")
    return {"path": "parquet", "data_files": [str(folder / "a.parquet")]}


def test_hostile_records_are_listed_rejects_under_skip(tmp_path, capsys):
    hf = _hostile(tmp_path / "src")
    code, run, _ = _ingest(tmp_path, hf, max_image_pixels=100_000)
    assert code == 0, capsys.readouterr().err
    rejects = {
        r["index"]: r["reason"]
        for r in map(json.loads, Path(run.p("data/ingest/rejects.jsonl")).read_text().splitlines())
    }
    assert sorted(rejects) == [3, 4, 5, 6, 7]
    assert "a decompression bomb" in rejects[3] and "400x400 = 160000 pixels" in rejects[4]
    assert "control characters" in rejects[5] and "no visible text" in rejects[6]
    assert "caption too long (10000000 characters" in rejects[7]
    assert _metrics(run)["pairs"] == N - 5
    assert "skipped 5 bad records" in capsys.readouterr().err


def test_hostile_record_under_fail_is_a_clear_stop(tmp_path, capsys):
    hf = _hostile(tmp_path / "src")
    code, run, _ = _ingest(tmp_path, hf, on_bad_record="fail")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "bad record 3" in err and "a decompression bomb" in err
    assert "ingest.on_bad_record: skip" in err
    assert not Path(run.p("data/ingest")).exists()


def test_a_latin1_metadata_file_is_named_with_the_fix(tmp_path, capsys):
    hf = make_imagefolder(tmp_path / "src")
    meta = tmp_path / "src" / "metadata.csv"
    meta.write_bytes(
        meta.read_text().replace("swatch number 3", "swatch caf\u00e9").encode("latin-1")
    )
    code, _, _ = _ingest(tmp_path, hf)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"ingest.hf: cannot read {meta}: it is not UTF-8 text" in err and "iconv" in err


def test_imagefolder_files_named_like_splits_keep_their_captions(tmp_path):
    """`datasets` infers a split from names like train_0001.png and then drops the
    metadata file; ingest lists the files itself so the captions stay."""
    folder = tmp_path / "src"
    folder.mkdir()
    lines = []
    for i in range(N):
        (folder / f"train_{i:04d}.png").write_bytes(_png(i))
        lines.append(json.dumps({"file_name": f"train_{i:04d}.png", "text": f"swatch {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    code, run, _ = _ingest(
        tmp_path, {"path": "imagefolder", "data_dir": str(folder), "caption_column": "text"}
    )
    assert code == 0
    assert sorted(_rows(run)["caption"].to_pylist()) == sorted(f"swatch {i}" for i in range(N))


def test_a_label_column_of_class_names_is_read_as_classes(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    kinds = ["stripes", "checkerboard", "dots"]
    t = pa.table(
        {
            "image": pa.array([_png(i) for i in range(N)], pa.binary()),
            "caption": [f"swatch number {i}" for i in range(N)],
            "label": [kinds[i % 3] for i in range(N)],
        }
    )
    pq.write_table(t, folder / "a.parquet")
    hf = {"path": "parquet", "data_files": [str(folder / "a.parquet")], "label_column": "label"}
    code, run, _ = _ingest(tmp_path, hf, noise={"rate": 0.0})
    assert code == 0
    classes = json.loads(Path(run.p("data/ingest/classes.json")).read_text())
    assert classes["class_names"] == sorted(kinds)
    rows = _rows(run)
    for caption, label in zip(rows["caption"].to_pylist(), rows["label"].to_pylist(), strict=True):
        assert sorted(kinds)[label] == kinds[int(caption.split()[-1]) % 3]
    # names given: a name outside them is a listed reject naming the key
    code, run, _ = _ingest(
        tmp_path / "b", {**hf, "class_names": ["dots", "stripes"]}, noise={"rate": 0.0}
    )
    assert code == 0
    reasons = [
        json.loads(x)["reason"]
        for x in Path(run.p("data/ingest/rejects.jsonl")).read_text().splitlines()
    ]
    assert len(reasons) == sum(1 for i in range(N) if i % 3 == 1)
    assert all(r == "label 'checkerboard' is not in ingest.hf.class_names" for r in reasons)


def test_an_empty_split_names_the_fractions(tmp_path, capsys):
    code, run, _ = _ingest(tmp_path, make_parquet(tmp_path / "src"), val_fraction=0.001)
    assert code == 2
    err = capsys.readouterr().err
    assert "the val split is empty" in err and "val_fraction=0.001" in err
    assert not Path(run.p("data/ingest")).exists()


def test_exact_duplicates_are_counted_and_dropped(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    # rows 30..34 repeat the images of rows 0..4 with new captions; rows 35..39 repeat rows 5..9
    images = (
        [_png(i) for i in range(30)] + [_png(i) for i in range(5)] + [_png(i) for i in range(5, 10)]
    )
    captions = [f"swatch number {i}" for i in range(30)]
    captions += [f"another swatch {i}" for i in range(5)] + [
        f"swatch number {i}" for i in range(5, 10)
    ]
    pq.write_table(pa.table({"image": images, "caption": captions}), folder / "dups.parquet")
    hf = {"path": "parquet", "data_files": [str(folder / "dups.parquet")]}
    code, run, _ = _ingest(tmp_path / "a", hf)
    assert code == 0
    m = _metrics(run)
    assert (m["duplicates"], m["duplicate_images"], m["duplicate_captions"]) == (5, 10, 5)
    assert m["pairs"] == 35
    code, run, _ = _ingest(tmp_path / "b", hf, duplicates="drop_images")
    assert code == 0 and _metrics(run)["pairs"] == 30


def test_crash_mid_ingest_resumes_after_the_finished_shards(tmp_path, monkeypatch, capsys):
    """A source that fails at record 700 (shard_size 128: 5 finished chunks); the rerun
    regenerates only the records after them, and the output equals an uninterrupted run."""
    overrides = {"ingest": {"source": "shapes", "size": 1000, "shard_size": 128}}
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    ref = TinyRun(tmp_path / "ref")
    params = write_params(tmp_path / "ref", overrides)
    assert ref.run("ingest", params=params, out="data/ingest", results="results/ingest") == 0

    made: list[int] = []
    crashed: list[bool] = []
    real = builtin.shapes_record

    def failing(seed, index, image_size=32):
        if index == 700 and not crashed:
            crashed.append(True)
            raise OSError(5, "the disk went away")  # EIO: a bug-class failure, not transient
        made.append(index)
        return real(seed, index, image_size)

    monkeypatch.setattr(builtin, "shapes_record", failing)
    run = TinyRun(tmp_path / "run")
    params = write_params(tmp_path / "run", overrides)
    assert run.run("ingest", params=params, out="data/ingest", results="results/ingest") == 1
    staging = Path(run.p("data/ingest.partial"))
    assert sorted(p.name for p in staging.glob("chunk-*.parquet")) == [
        f"chunk-{k:06d}.parquet" for k in range(5)
    ]
    assert not Path(run.p("data/ingest")).exists()
    made.clear()
    capsys.readouterr()
    assert run.run("ingest", params=params, out="data/ingest", results="results/ingest") == 0
    assert made == list(range(640, 1000))  # 5 x 128 records were not made again
    assert "resuming after 640 source records (5 finished shards" in capsys.readouterr().err
    assert not staging.exists()
    got, want = _rows(run), _rows(ref)
    assert got.equals(want)
    assert len(set(got["uid"].to_pylist())) == got.num_rows == 1000
    assert _metrics(run) == _metrics(ref)


def test_sigkill_mid_ingest_then_rerun_keeps_finished_shards(tmp_path):
    params = write_params(
        tmp_path, {"ingest": {"source": "shapes", "size": 6000, "shard_size": 256}}
    )
    cmd = [sys.executable, "-m", "stages.ingest", "--params", str(params)]
    cmd += ["--out", str(tmp_path / "ingest"), "--results", str(tmp_path / "res")]
    cmd += ["--sources", str(tmp_path / "sources.json")]  # none: a built-in source
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    ready = tmp_path / "stopped.pid"
    stop = {faults.STOP_AT: "staging:chunk:3", faults.STOP_READY: str(ready)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**env, **stop}, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():  # written when the third chunk is finished
            assert proc.poll() is None, f"ingest exited {proc.returncode} before its third chunk"
            assert time.monotonic() < deadline, "ingest did not finish 3 chunks in 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    staging = tmp_path / "ingest.partial"
    finished = json.loads((staging / "state.json").read_text())["counts"]
    assert finished["consumed"] == 3 * 256 and not (tmp_path / "ingest").exists()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming after {finished['consumed']} source records" in again.stderr
    rows = pa.concat_tables(
        [pq.read_table(f, columns=["uid"]) for f in sorted((tmp_path / "ingest").glob("*.parquet"))]
    )
    assert rows.num_rows == len(set(rows["uid"].to_pylist())) == 6000
    # the rerun read only the records after the finished chunks
    total = 6000 - finished["consumed"]
    assert f"ingest: records: {total}/{total}" in again.stderr
