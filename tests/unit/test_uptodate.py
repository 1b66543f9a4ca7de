"""The no-op record: `Recorder` imports MLflow beside DVC's answer, writes the parent run and
one `skipped` child per stage when told the order, and writes nothing when cancelled; handed
over, it writes a flow run's records (tracking.TrackerProcess)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from otcurate_pipeline.tracking import Tracker, TrackerProcess, open_tracker, served_by
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


def test_a_handed_over_recorder_tracks_the_flow_run_as_its_owner(tmp_path, monkeypatch):
    root = _project(tmp_path, monkeypatch)
    with contextlib.ExitStack() as stack:
        Recorder(root, None).hand_over(stack)
        tracker = open_tracker(root, "changed")
        assert isinstance(tracker, TrackerProcess)
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C reaches the whole group: the
            tracker.proc.send_signal(sig)  # flow, not this process, decides how runs close
        child = tracker.start_stage("ingest")
        assert child and tracker.env() == {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        tracker.end_stage(child, "ingest", "ran", 1.5)
        tracker.finish("FINISHED", {"ingest": "ran"})
        assert tracker.proc is None  # the process ended with the run
    db = sqlite3.connect(root / "mlflow.db")
    assert db.execute("select status from runs where run_uuid = ?", (child,)).fetchone() == (
        "FINISHED",
    )
    (parent,) = db.execute(
        "select value from tags where run_uuid = ? and key = 'mlflow.parentRunId'", (child,)
    ).fetchone()
    assert db.execute("select name, status from runs where run_uuid = ?", (parent,)).fetchone() == (
        "changed",
        "FINISHED",
    )
    owner = db.execute(
        "select value from tags where run_uuid = ? and key = 'otcurate.pid'", (parent,)
    ).fetchone()
    assert owner == (str(os.getpid()),)  # the flow's pid, not the tracking process's: `reap`
    outcome = db.execute(
        "select value from tags where run_uuid = ? and key = 'dvc.outcome'", (child,)
    ).fetchone()
    assert outcome == ("ran",)
    assert db.execute(
        "select value from metrics where run_uuid = ? and key = 'stage_seconds'", (child,)
    ).fetchone() == (1.5,)


def test_a_tracking_process_that_dies_is_reported_once_and_never_raises(tmp_path, capsys):
    # a stand-in that opens the parent run, then exits
    answer = json.dumps({"result": {"parent_id": "p1", "live": True}})
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.stdin.readline(); print({answer!r})"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    tracker = TrackerProcess(proc, tmp_path)
    assert tracker.parent_id == "p1"
    assert tracker.start_stage("ingest") is None
    tracker.end_stage(None, "ingest", "ran", 1.0)
    tracker.finish("FINISHED")
    err = capsys.readouterr().err
    assert "could not start ingest" in err and "the tracking process exited 0" in err
    assert err.count("otcurate: tracking:") == 1  # reported once, then the run goes unrecorded
    assert tracker.proc is None and proc.returncode == 0


def test_a_recorder_nobody_took_is_stopped_unused(tmp_path, monkeypatch):
    root = _project(tmp_path, monkeypatch)
    with contextlib.ExitStack() as stack:
        recorder = Recorder(root, None)
        proc = recorder.proc
        recorder.hand_over(stack)
    assert proc.returncode is not None
    assert not (root / "mlflow.db").exists()


def test_a_tracking_process_that_never_answers_leaves_the_run_to_a_tracker_here(
    tmp_path, monkeypatch
):
    root = _project(tmp_path, monkeypatch)
    mute = subprocess.Popen(  # reads its request, then exits without an answer
        [sys.executable, "-c", "import sys; sys.stdin.readline()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(served_by(mute))
        tracker = open_tracker(root, "fallback")
    assert isinstance(tracker, Tracker) and tracker.parent_id
    tracker.finish("FINISHED")
    db = sqlite3.connect(root / "mlflow.db")
    assert db.execute("select status from runs where name = 'fallback'").fetchone() == ("FINISHED",)
