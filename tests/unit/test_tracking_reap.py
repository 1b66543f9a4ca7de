"""MLflow records end truthfully: a run whose process died is marked KILLED by the next
command that finds it, and `diff`'s -1/-2 count complete runs only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from otcurate_pipeline import lineage
from otcurate_pipeline.tracking import EXPERIMENT, reap


@pytest.fixture
def client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_of_dead_processes_are_marked_killed_and_live_ones_kept(client):
    exp = client.create_experiment(EXPERIMENT)
    host = socket.gethostname()

    def run(pid, host=host):
        tags = {"otcurate.kind": "pipeline", "otcurate.pid": str(pid), "otcurate.host": host}
        return client.create_run(exp, tags=tags).info.run_id

    dead, live, elsewhere = run(_dead_pid()), run(os.getpid()), run(_dead_pid(), "other-host")
    legacy = client.create_run(exp, tags={"otcurate.kind": "pipeline"}).info.run_id
    done = run(_dead_pid())
    client.set_terminated(done, "FINISHED")
    assert reap(client, exp) == [dead]
    status = {r: client.get_run(r).info.status for r in (dead, live, elsewhere, legacy, done)}
    assert status == {
        dead: "KILLED",
        live: "RUNNING",
        elsewhere: "RUNNING",  # another machine's process: not ours to judge
        legacy: "RUNNING",  # no pid recorded: unknown, left alone
        done: "FINISHED",
    }
    assert reap(client, exp) == []  # idempotent


def _p(run_id, status, t):
    return lineage.PipelineRun(run_id, run_id, status, "c0ffee", t)


def test_minus_one_and_two_count_complete_runs_only():
    runs = [
        _p("a", "FINISHED", 1),
        _p("b", "FAILED", 2),
        _p("c", "KILLED", 3),
        _p("d", "RUNNING", 4),
    ]
    assert lineage.pipeline_run(runs, "-1").run_id == "b"
    assert lineage.pipeline_run(runs, "-2").run_id == "a"
    assert lineage.pipeline_run(runs, "c").status == "KILLED"  # named explicitly: allowed
    with pytest.raises(
        lineage.LineageError,
        match="only 2 complete pipeline runs are recorded "
        r"\(2 more killed or still running\)",
    ):
        lineage.pipeline_run(runs, "-3")
