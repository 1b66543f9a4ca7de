"""Fault injection on a real scratch repo (DVC + Prefect + MLflow): a full disk while DVC
caches a stage's outputs, two `otcurate run` at once, and a run killed mid-stage. Each test
asserts what is on disk, in dvc.lock and in MLflow afterwards, and what the console said.

Hostile records are in tests/stages/test_ingest_sources.py (ingest's own test module), the
recovery rules on a bare DVC repo in tests/unit/test_recovery.py. An immutable output folder
is not simulated here: the suite may run as root, whom file modes do not stop."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from otcurate_support import BIN, outs_md5, scratch_env, start_stopped

from otcurate_pipeline.recovery import uncached_outs
from otcurate_pipeline.runlock import holder

pytestmark = pytest.mark.e2e
INJECT = Path(__file__).parent / "inject"  # sitecustomize.py: the ENOSPC injection


def _otcurate(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "otcurate"), *args],
        cwd=root,
        env={**scratch_env(root.parent), **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _runs(root: Path) -> list:
    """Pipeline parent runs, oldest first, each with its stage children's tags."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("otcurate")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = sorted(
        (r for r in runs if r.data.tags.get("otcurate.kind") == "pipeline"),
        key=lambda r: r.info.start_time,
    )
    kids = {}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent:
            kids.setdefault(parent, {})[r.data.tags["dvc.stage"]] = r
    return [(p, kids.get(p.info.run_id, {})) for p in parents]


def _finetune_steps(root: Path) -> int:
    return yaml.safe_load((root / "params.yaml").read_text())["finetune"]["steps"]


def test_a_full_disk_while_caching_keeps_the_model_the_lock_and_the_truth(scratch):
    root, _, _ = scratch
    steps = _finetune_steps(root)
    lock_before = (root / "dvc.lock").read_text()
    env = {"PYTHONPATH": str(INJECT), "OTCURATE_TEST_ENOSPC": ".dvc/cache/files"}
    bad = _otcurate(root, "run", "--set", f"finetune.steps={steps + 1}", env=env)
    err = bad.stderr
    assert bad.returncode == 1, err
    assert "stage 'finetune' failed" in err and "No space left on device" in err
    assert "no space left on device while writing or caching models/finetune" in err
    assert "free at least" in err and "were restored" not in err
    assert "dvc.lock was put back as it was before 'finetune' ran" in err
    # the computed model stays in place; dvc.lock names only what the cache holds
    assert (root / "models" / "finetune" / "model.safetensors").stat().st_size > 0
    assert (root / "dvc.lock").read_text() == lock_before
    assert all(uncached_outs(root, s) == [] for s in yaml.safe_load(lock_before)["stages"])
    parent, kids = _runs(root)[-1]
    assert parent.info.status == "FAILED"
    assert kids["finetune"].info.status == "FAILED"
    assert kids["finetune"].data.tags["dvc.outcome"] == "failed"

    # space freed: the rerun sweeps DVC's orphans, finishes finetune and locks it
    good = _otcurate(root, "run")
    assert good.returncode == 0, good.stderr
    assert not list((root / ".dvc" / "cache").rglob("*.tmp"))
    assert uncached_outs(root, "finetune") == [] and uncached_outs(root, "evaluate") == []
    assert _runs(root)[-1][0].info.status == "FINISHED"
    assert _otcurate(root, "run", "--set", f"finetune.steps={steps}").returncode == 0


def test_a_second_run_refuses_at_once_and_changes_nothing(scratch):
    root, _, _ = scratch
    steps = _finetune_steps(root)
    first = subprocess.Popen(
        [str(BIN / "otcurate"), "run", "--set", f"finetune.steps={steps + 2}"],
        cwd=root,
        env=scratch_env(root.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        # the first run holds the lock and has written its --set (it takes the lock first)
        while holder(root).get("pid") != first.pid or _finetune_steps(root) != steps + 2:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        params = (root / "params.yaml").read_bytes()
        t0 = time.perf_counter()
        second = _otcurate(root, "run", "--set", "finetune.lr=0.0005")
        assert second.returncode == 3
        assert f"pid {first.pid} (otcurate run)" in second.stderr
        assert "Nothing was changed" in second.stderr
        assert time.perf_counter() - t0 < 30
        assert (root / "params.yaml").read_bytes() == params
        out, err = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    parent, kids = _runs(root)[-1]
    assert parent.info.status == "FINISHED"
    assert kids["finetune"].data.params["finetune.steps"] == str(steps + 2)
    assert kids["finetune"].data.params["finetune.lr"] != "0.0005"
    assert _otcurate(root, "run", "--set", f"finetune.steps={steps}").returncode == 0


def test_a_killed_run_is_marked_killed_and_diff_skips_it(scratch, tmp_path):
    root, _, _ = scratch
    steps = _finetune_steps(root)
    argv = [str(BIN / "otcurate"), "run", "--set", f"finetune.steps={steps + 3}"]
    env = scratch_env(root.parent)
    proc, _ = start_stopped(argv, root, env, "finetune (clip):step:2", tmp_path / "stop.pid")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run: flow, dvc and the stage
    proc.wait()
    killed, kids = _runs(root)[-1]
    assert killed.info.status == "RUNNING"  # nobody closed it: the process died
    diff = _otcurate(root, "diff")
    assert diff.returncode == 0, diff.stderr
    assert "marked KILLED" in diff.stderr
    assert "not counted for -1/-2: 1 run(s) killed or still running" in diff.stdout
    assert killed.info.run_id not in diff.stdout
    runs = _runs(root)
    assert runs[-1][0].info.status == "KILLED" and runs[-1][1]["finetune"].info.status == "KILLED"
    # the next run takes the lock the dead one held and finishes
    assert _otcurate(root, "run", "--set", f"finetune.steps={steps}").returncode == 0
    assert outs_md5(root)  # dvc.lock whole
