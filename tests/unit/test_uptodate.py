"""The no-op record: `Recorder` imports MLflow beside DVC's answer, writes the parent run and
one `skipped` child per stage when told the order, and writes nothing when cancelled."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from otcurate_pipeline.uptodate import Recorder, State

ROOT = Path(__file__).resolve().parents[2]


def _project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # the stages' names and paths
    return tmp_path


def test_recorder_writes_a_noop_parent_with_a_skipped_child_per_stage(tmp_path, monkeypatch):
    root = _project(tmp_path, monkeypatch)
    rows = Recorder(root, "nightly-check").record(["ingest", "pretrain"])
    assert rows == [
        {"stage": "ingest", "outcome": "skipped", "seconds": 0.0},
        {"stage": "pretrain", "outcome": "skipped", "seconds": 0.0},
    ]
    db = sqlite3.connect(root / "mlflow.db")
    (parent,) = db.execute(
        "select run_uuid from tags where key = 'otcurate.noop' and value = 'true'"
    ).fetchall()
    assert db.execute("select name, status from runs where run_uuid = ?", parent).fetchone() == (
        "nightly-check",
        "FINISHED",
    )
    children = db.execute(
        "select t.value from tags t join tags p on t.run_uuid = p.run_uuid "
        "where p.key = 'mlflow.parentRunId' and p.value = ? and t.key = 'dvc.outcome'",
        parent,
    ).fetchall()
    assert sorted(children) == [("skipped",), ("skipped",)]


def test_a_cancelled_recorder_writes_nothing(tmp_path, monkeypatch):
    root = _project(tmp_path, monkeypatch)
    recorder = Recorder(root, None)
    recorder.cancel()
    assert recorder.proc.returncode is not None
    assert not (root / "mlflow.db").exists()


def test_untouched_stages_are_up_to_date_with_nothing_stale_upstream():
    # a -> b -> d, a -> c; c stale: d is up to date but not downstream of c, b is neither
    up = {"a": frozenset(), "b": frozenset("a"), "c": frozenset("a"), "d": frozenset("ab")}
    order = ["a", "b", "c", "d"]
    assert State(order, {"c": ["changed deps"]}, up).untouched() == ["a", "b", "d"]
    assert State(order, {"b": ["changed outs"]}, up).untouched() == ["a", "c"]
    assert State(order, {"a": ["changed params"]}, up).untouched() == []
    assert State(order, {}, up).untouched() == order
