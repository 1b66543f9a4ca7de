import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from otcurate import faults
from otcurate.io import atomic_dir, atomic_file, dumps_json, write_parquet


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "a.txt").write_text("second, half written")
            raise RuntimeError("crash")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left
    with atomic_dir(out) as d:
        (d / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_atomic_file_keeps_old_content_on_error(tmp_path):
    f = tmp_path / "m.json"
    f.write_text("old")
    with pytest.raises(ValueError):
        with atomic_file(f, "w") as fh:
            fh.write("new")
            raise ValueError
    assert f.read_text() == "old"


def test_json_and_parquet_are_byte_deterministic(tmp_path):
    assert dumps_json({"b": 1, "a": [1.5, 2]}) == dumps_json({"a": [1.5, 2], "b": 1})
    t = pa.table({"uid": ["a", "b"], "x": [1.0, 2.0]})
    write_parquet(tmp_path / "1.parquet", t)
    write_parquet(tmp_path / "2.parquet", t)
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()


def test_non_finite_metrics_become_null():
    assert (
        dumps_json({"x": float("nan"), "y": [float("inf")]})
        == '{\n  "x": null,\n  "y": [\n    null\n  ]\n}\n'
    )


def _stop_at(point: str, script: str, tmp_path):
    """Run `script` in a child told to stop at `point`; return it once it stands there."""
    ready = tmp_path / "stopped.pid"
    env = {**os.environ, faults.STOP_AT: point, faults.STOP_READY: str(ready)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert int(ready.read_text()) == proc.pid
    return proc


def test_a_crash_point_stops_there_until_killed_and_the_next_write_sweeps_up(tmp_path):
    out = tmp_path / "out"
    script = (
        "from otcurate.io import atomic_dir\n"
        f"with atomic_dir({str(out)!r}) as d:\n"
        "    (d / 'a.txt').write_text('whole')\n"
        "raise SystemExit('went past the crash point')\n"
    )
    proc = _stop_at(f"commit:{out}", script, tmp_path)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (tmp,) = tmp_path.glob("out.tmp-*")  # written whole, never renamed
    assert (tmp / "a.txt").read_text() == "whole" and not out.exists()
    with atomic_dir(out) as d:
        (d / "b.txt").write_text("next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stopped.pid"]


def test_a_crash_point_not_asked_for_returns_without_stopping(monkeypatch, tmp_path):
    ready = tmp_path / "stopped.pid"
    monkeypatch.setenv(faults.STOP_READY, str(ready))
    monkeypatch.setenv(faults.STOP_AT, "commit:elsewhere")
    faults.point("commit:here")
    monkeypatch.delenv(faults.STOP_AT)
    faults.point("commit:here")
    assert not ready.exists()
