"""The pipeline flow: DVC decides, Prefect drives, MLflow records.

One Prefect task per DVC stage, in the order of DVC's graph; each task runs
`dvc repro --single-item <stage>` in a subprocess (DVC skips it when nothing
changed, or restores it from its run-cache). No Prefect caching: a Prefect
cache hit would not restore files. Only transient failures (stage exit 75) are
retried. A failed stage gets `dvc.lock` back as it was and its last good outputs
restored from the DVC cache when the cache holds them (otcurate_pipeline.recovery).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from otcurate_pipeline import stageworker
from otcurate_pipeline.manifests import ALL_MANIFESTS
from otcurate_pipeline.recovery import Recovery, recover, uncached_outs
from otcurate_pipeline.runlock import RunLocked, run_lock
from otcurate_pipeline.tracking import open_tracker
from otcurate_pipeline.uptodate import dvc_state, sweep_leftovers, sync_sources

EXIT_TRANSIENT = 75
_EXIT_RE = re.compile(r"exited with (-?\d+)")
# DVC's advice about git and remotes, repeated after every stage: kept in the log, not echoed.
_QUIET_RE = re.compile(
    r"^\s*$|To track the changes with git|^\s+git add |To enable auto staging|core\.autostage|Use `dvc push`"
)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, tail: str, uncached: list[str] | None = None):
        self.stage, self.code, self.tail = stage, code, tail
        self.uncached = uncached or []  # outs computed but not cached (dvc repro exited 0)
        self.recovery: Recovery | None = None  # what the flow did about the outputs
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
    if env.get(stageworker.ENV, "").lower() in stageworker.OFF:  # its own process
        env.pop(stageworker.ENV, None)
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
    return dvc_state(root, with_status=False).order


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
def run_stage(
    name: str, root: str, env: dict[str, str] | None = None, up_to_date: bool = False
) -> StageResult:
    """`dvc repro --single-item <name>`, streaming its output, classified ran/restored/skipped.
    ``up_to_date``: `dvc status`, asked at the start of this run, found the stage and all it
    depends on unchanged; it is skipped without starting DVC (about 1.5 s a stage)."""
    if up_to_date:
        print(f"[{name}] Stage '{name}' didn't change (dvc status), skipping", flush=True)
        return StageResult(name, "skipped", 0.0)
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
    try:
        for line in proc.stdout:
            lines.append(line)
            if not _QUIET_RE.search(line):
                print(f"[{name}] {line}", end="", flush=True)
        code = proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM: stop dvc and the stage too, then go
        _stop_group(proc)
        raise
    log = "".join(lines)
    if code == 0 and _outcome(log, name) != "skipped":
        errors = [line for line in lines if line.startswith("ERROR: failed to")]
        missing = uncached_outs(Path(root), name)
        if missing:  # DVC said it succeeded, but did not keep what it computed
            note = f"DVC exited 0 but its cache lacks {', '.join(missing)}\n"
            raise StageFailed(name, 1, "".join(errors[-5:]) + note, uncached=missing)
    if code != 0:
        m = _EXIT_RE.findall(log)
        stage_code = int(m[-1]) if m else code
        tail = "".join(lines[-15:])
        if stage_code == EXIT_TRANSIENT or "Unable to acquire lock" in log:
            raise TransientStageFailure(name, stage_code, tail)
        raise StageFailed(name, stage_code, tail)
    return StageResult(name, _outcome(log, name), time.perf_counter() - t0)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop `dvc repro` and everything it started (the stage, torchrun workers): SIGTERM to
    each, SIGKILL to what is left after 10 s. (They share this process's group, so a kill
    of the whole group, SIGKILL included, reaches them without this.) A stage forked by a
    stage worker is not below `dvc`: its client, which is, passes SIGTERM on to it, and the
    worker kills it, and all it started, once the client is gone."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@flow(name="otcurate-pipeline", log_prints=False)
def pipeline(
    root: str = ".",
    run_name: str | None = None,
    allow_rewrite: bool = False,
    prepared: bool = False,
    order: list[str] | None = None,
    untouched: list[str] | None = None,
) -> list[dict]:
    """Run every stage in DVC's order; record each in MLflow; return [{stage, outcome, seconds}].
    ``allow_rewrite`` accepts a source whose known files changed (see otcurate_pipeline.manifests);
    ``prepared``: the caller swept the leftovers and synced the sources (uptodate.noop_run),
    and, from its `dvc status` after that, may pass the stage ``order`` and the stages this run
    cannot change (``untouched``, uptodate.State.untouched): those are skipped without DVC."""
    rootp = Path(root).resolve()
    if not prepared:
        sweep_leftovers(rootp)
        sync_sources(rootp, allow_rewrite)
    order = order or stage_order(rootp)
    known = untouched is not None  # else DVC may skip any stage: none waits for the worker
    untouched = set(untouched or ())
    may_run = [s for s in order if s not in untouched]
    tracker = open_tracker(rootp, run_name)  # the recorder's process after noop_run
    results: list[StageResult] = []
    try:
        # a stage worker of the run's own, booting while the first stage runs
        with stageworker.for_run(len(may_run), rootp) as worker:
            for name in order:
                child = tracker.start_stage(name)
                env = tracker.env()
                if child:
                    env["MLFLOW_RUN_ID"] = child
                if worker is not None and name not in untouched:
                    # the first stage waits for it only if it booted beside a Prefect server
                    first = name == may_run[0]
                    env.update(worker.env(wait=known and (worker.overlaps or not first)))
                t0 = time.perf_counter()
                lock = rootp / "dvc.lock"
                lock_before = lock.read_text() if lock.exists() else None
                try:
                    res = run_stage(name, str(rootp), env, up_to_date=name in untouched)
                except StageFailed as exc:
                    tracker.end_stage(child, name, "failed", time.perf_counter() - t0)
                    exc.recovery = recover(rootp, name, lock_before, exc.tail, dvc, exc.uncached)
                    raise
                tracker.end_stage(child, name, res.outcome, res.seconds)
                results.append(res)
    except BaseException:
        tracker.finish("FAILED", {r.stage: r.outcome for r in results})
        raise
    tracker.finish("FINISHED", {r.stage: r.outcome for r in results})
    return [asdict(r) for r in results]


def record_lock_on_branch(root: Path, branch: str, message: str) -> str:
    """Commit dvc.lock, params.yaml and the source manifests as they are now onto ``branch``
    (created from HEAD if missing) with git plumbing: the checkout, its index and HEAD are
    untouched. The commit's parents are the branch tip and HEAD (the code that ran), so
    `git log <branch>` is the lineage history. Returns the new commit."""

    def git(*args: str, env: dict | None = None, data: str | None = None) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
            input=data,
            env={**os.environ, **(env or {})},
        ).stdout.strip()

    head = git("rev-parse", "HEAD")
    tip = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip()
    index = root / ".git" / "otcurate-lineage.index"
    env = {"GIT_INDEX_FILE": str(index)}
    try:
        git("read-tree", head, env=env)
        for rel in ("dvc.lock", "params.yaml", *map(str, ALL_MANIFESTS)):
            if (root / rel).exists():
                blob = git("hash-object", "-w", rel)
                git("update-index", "--add", "--cacheinfo", f"100644,{blob},{rel}", env=env)
        tree = git("write-tree", env=env)
    finally:
        index.unlink(missing_ok=True)
    parents = [p for p in dict.fromkeys([tip, head]) if p]
    ident = {
        "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "otcurate"),
        "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "otcurate@localhost"),
        "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "otcurate"),
        "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "otcurate@localhost"),
    }
    args = ["commit-tree", tree, "-F", "-"]
    for p in parents:
        args += ["-p", p]
    commit = git(*args, env=ident, data=message)
    git("update-ref", f"refs/heads/{branch}", commit, *([tip] if tip else []))
    return commit


@flow(name="otcurate-nightly", log_prints=True)
def nightly(root: str = ".", lineage: str = "branch", branch: str = "otcurate/lineage") -> dict:
    """A scheduled run: refresh the source manifest, ask `dvc status`; when nothing changed do
    nothing, else run the pipeline and record dvc.lock (``lineage``: `branch` commits it to
    ``branch``; `mlflow` keeps only the copy logged on the pipeline's MLflow run). Each run
    appends one line to .otcurate/nightly.jsonl."""
    import json
    from datetime import datetime

    rootp = Path(root).resolve()
    if lineage not in ("branch", "mlflow"):
        raise ValueError(f"lineage must be 'branch' or 'mlflow'; got {lineage!r}.")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        with run_lock(rootp, "otcurate schedule (nightly)"):
            record = _nightly_locked(rootp, started, lineage, branch)
    except RunLocked as exc:
        print(f"skipped this tick: {exc}")
        record = {"started": started, "outcome": "busy", "holder": exc.holder}
    log = rootp / ".otcurate" / "nightly.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
    return record


def _nightly_locked(rootp: Path, started: str, lineage: str, branch: str) -> dict:
    sweep_leftovers(rootp)
    sources = sync_sources(rootp)
    state = dvc_state(rootp)
    record: dict = {"started": started, "new_files": sources["added"]}
    if not state.stale:
        print("nothing changed since the last run: no stage reruns")
        record.update(outcome="no-op")
    else:
        print(f"changed: {', '.join(s.split(':')[-1] for s in state.stale)}")
        results = pipeline(
            str(rootp),
            run_name=f"nightly {started}",
            prepared=True,
            order=state.order,
            untouched=state.untouched(),
        )
        record.update(outcome="ran", stages={r["stage"]: r["outcome"] for r in results})
        if lineage == "branch":
            ran = ", ".join(s for s, o in record["stages"].items() if o != "skipped")
            record["lineage_commit"] = record_lock_on_branch(
                rootp, branch, f"otcurate nightly {started}: {ran or 'nothing'} reran"
            )
            print(f"dvc.lock committed to {branch}: {record['lineage_commit'][:10]}")
    return record
