"""The pipeline flow: DVC decides, Prefect drives, MLflow records.

One Prefect task per DVC stage, in the order of DVC's graph; each task runs
`dvc repro --single-item <stage>` in a subprocess (DVC skips it when nothing
changed, or restores it from its run-cache). No Prefect caching: a Prefect
cache hit would not restore files. Only transient failures (stage exit 75) are
retried. A failed stage has its last good outputs restored with `dvc checkout`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from otcurate.tracking import Tracker

EXIT_TRANSIENT = 75
_EXIT_RE = re.compile(r"exited with (-?\d+)")
# DVC's advice about git and remotes, repeated after every stage: kept in the log, not echoed.
_QUIET_RE = re.compile(
    r"^\s*$|To track the changes with git|^\s+git add |To enable auto staging|core\.autostage|Use `dvc push`"
)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, tail: str):
        self.stage, self.code, self.tail = stage, code, tail
        super().__init__(f"stage '{stage}' failed (exit {code}):\n{tail}")


class TransientStageFailure(StageFailed):
    """The stage exited 75: an I/O hiccup or a lock; worth retrying."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    outcome: str  # ran | restored | skipped
    seconds: float


def _bin_dir() -> str:
    return str(Path(sys.executable).parent)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = _bin_dir() + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def dvc(root: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(_bin_dir()) / "dvc"), *args],
        cwd=root,
        env=_env(),
        text=True,
        capture_output=capture,
    )


def stage_order(root: Path) -> list[str]:
    """Stage names in an order that respects DVC's dependency graph."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        order = list(reversed(list(nx.topological_sort(graph))))
        return [s.addressing for s in order if getattr(s, "cmd", None)]


def _outcome(log: str, name: str) -> str:
    if f"Stage '{name}' didn't change, skipping" in log:
        return "skipped"
    if f"Stage '{name}' is cached - skipping run" in log:
        return "restored"
    return "ran"


def _retry_transient(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001
            return False
    return isinstance(exc, TransientStageFailure)


@task(
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=3,
    retry_condition_fn=_retry_transient,
    task_run_name="{name}",
)
def run_stage(name: str, root: str, env: dict[str, str] | None = None) -> StageResult:
    """`dvc repro --single-item <name>`, streaming its output, classified ran/restored/skipped."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(Path(_bin_dir()) / "dvc"), "repro", "--single-item", name],
        cwd=root,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if not _QUIET_RE.search(line):
            print(f"[{name}] {line}", end="", flush=True)
    code = proc.wait()
    log = "".join(lines)
    if code != 0:
        m = _EXIT_RE.findall(log)
        stage_code = int(m[-1]) if m else code
        tail = "".join(lines[-15:])
        if stage_code == EXIT_TRANSIENT or "Unable to acquire lock" in log:
            raise TransientStageFailure(name, stage_code, tail)
        raise StageFailed(name, stage_code, tail)
    return StageResult(name, _outcome(log, name), time.perf_counter() - t0)


@flow(name="otcurate-pipeline", log_prints=False)
def pipeline(root: str = ".", run_name: str | None = None) -> list[dict]:
    """Run every stage in DVC's order; record each in MLflow; return [{stage, outcome, seconds}]."""
    rootp = Path(root).resolve()
    order = stage_order(rootp)
    tracker = Tracker(rootp, run_name=run_name)
    results: list[StageResult] = []
    try:
        for name in order:
            child = tracker.start_stage(name)
            env = tracker.env()
            if child:
                env["MLFLOW_RUN_ID"] = child
            t0 = time.perf_counter()
            try:
                res = run_stage(name, str(rootp), env)
            except StageFailed:
                tracker.end_stage(child, name, "failed", time.perf_counter() - t0)
                restore = dvc(rootp, "checkout", "--force", name)
                if restore.returncode != 0:
                    print(
                        f"otcurate: could not restore the last outputs of '{name}': {restore.stderr.strip()}",
                        file=sys.stderr,
                    )
                raise
            tracker.end_stage(child, name, res.outcome, res.seconds)
            results.append(res)
    except BaseException:
        tracker.finish("FAILED", {r.stage: r.outcome for r in results})
        raise
    tracker.finish("FINISHED", {r.stage: r.outcome for r in results})
    return [asdict(r) for r in results]


if __name__ == "__main__":
    print(pipeline(sys.argv[1] if len(sys.argv) > 1 else "."))
