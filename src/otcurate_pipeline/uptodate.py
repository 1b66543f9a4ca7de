"""Is there anything to run? DVC's answer, in-process, without Prefect or the stages.

`otcurate run` asks first. When DVC finds every stage's deps, params and outs equal to
dvc.lock (and no new source file arrived), the run records itself in MLflow (a parent run
and one child per stage, outcome `skipped`, as a run through the flow would) and stops:
no Prefect flow, no `dvc repro` per stage, no model loaded. (A run whose --set changed a
param starts its temporary Prefect server before asking, and stops it unused if nothing
was found to run.)

Importing MLflow and opening its store cost about 5 s, more than DVC takes to answer, so
a recorder process does both on the second core while DVC decides (`Recorder`); it writes
the no-op record when told that nothing changed. Otherwise it becomes the flow run's
tracker (otcurate_pipeline.tracking.TrackerProcess), so that the flow does not wait for
MLflow before its first stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WHY_SKIPPED = "deps, params and outs match dvc.lock (dvc status)"
# "0": the flow run records itself in its own process, as before the handover (bench.startup)
TRACKING_PROCESS = "OTCURATE_TRACKING_PROCESS"


@dataclass(frozen=True)
class State:
    order: list[str]  # stage names in DVC's dependency order
    stale: dict  # `dvc status`: stage -> what changed; empty when up to date
    upstream: dict[str, frozenset[str]]  # stage -> every stage it depends on, transitively

    def untouched(self) -> list[str]:
        """The stages this run cannot change: up to date, and nothing they depend on is
        stale. `dvc repro` would only say "didn't change, skipping" for them; a stage
        downstream of a stale one may change once that one reruns, so it is not here."""
        return [
            s for s in self.order if s not in self.stale and not self.upstream[s] & set(self.stale)
        ]


def sweep_leftovers(root: Path) -> None:
    """Remove what an earlier failed run left (otcurate_pipeline.recovery.sweep), saying so."""
    from otcurate_pipeline.recovery import sweep

    swept = sweep(root)
    if swept:
        print(
            f"[cleanup] removed {len(swept)} temporary file(s) of an earlier failed run", flush=True
        )


def sync_sources(root: Path, allow_rewrite: bool = False) -> dict:
    """Refresh the content manifests (data/sources.json for ingest, and those of the clean
    sources in coreset.target and evaluate.sets) from the params."""
    from otcurate_pipeline.manifests import sync
    from otcurate_pipeline.params import parse_yaml

    params = parse_yaml((root / "params.yaml").read_text()) or {}
    report = sync(root, params, allow_rewrite=allow_rewrite)
    if report["added"]:
        shown = ", ".join(report["added"][:5]) + (" ..." if len(report["added"]) > 5 else "")
        print(f"[sources] {len(report['added'])} new file(s): {shown}", flush=True)
    for stage in report["clean_changed"]:
        print(f"[sources] {stage}'s clean source changed: {stage} reruns", flush=True)
    return report


def dvc_state(root: Path, with_status: bool = True) -> State:
    """The stages in an order that respects DVC's graph, and (``with_status``) what
    `dvc status` says changed, from one in-process DVC repo."""
    import networkx as nx
    from dvc.repo import Repo, lock_repo

    # under one repo lock, so that DVC builds its index (dvc.yaml, dvc.lock) once, not
    # again for `status` (each lock taken from outside resets it)
    with Repo(str(root)) as repo, lock_repo(repo):
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        stages = [s for s in reversed(list(nx.topological_sort(graph))) if getattr(s, "cmd", None)]
        upstream = {
            s.addressing: frozenset(
                d.addressing for d in nx.descendants(graph, s) if getattr(d, "cmd", None)
            )
            for s in stages
        }
        stale = repo.status() if with_status else {}
    return State([s.addressing for s in stages], dict(stale), upstream)


def record_noop(root: Path, order: list[str], run_name: str | None = None) -> None:
    """Write the MLflow record of a run in which nothing changed (in `Recorder`'s process)."""
    from otcurate_pipeline.tracking import Tracker, read_lock

    tracker = Tracker(root, run_name=run_name, tags={"otcurate.noop": "true"})
    lock = read_lock(root)  # unchanged through a no-op: read once
    for name in order:
        tracker.end_stage(tracker.start_stage(name), name, "skipped", 0.0, lock)
    tracker.finish("FINISHED", dict.fromkeys(order, "skipped"))


class Recorder:
    """A process that imports MLflow now and writes a no-op record (`record_noop`) once it
    is given the stage order, or serves the flow run's records (`hand_over`); `cancel`
    kills it unused. Its warnings go to our stderr."""

    def __init__(self, root: Path, run_name: str | None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otcurate_pipeline.uptodate", str(root), run_name or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def hand_over(self, stack: contextlib.ExitStack) -> None:
        """Make this process the tracker of the next flow run in this process
        (tracking.served_by) until ``stack`` closes."""
        from otcurate_pipeline.tracking import served_by

        stack.enter_context(served_by(self.proc))
        self.proc = None

    def record(self, order: list[str]) -> list[dict]:
        """Have the record written; the no-op's stage rows, whether or not it was."""
        self.proc.communicate(json.dumps(order) + "\n")
        if self.proc.returncode != 0:
            print(
                f"otcurate: tracking: the no-op record was not written (recorder exit "
                f"{self.proc.returncode}); nothing else is affected",
                file=sys.stderr,
            )
        return [{"stage": s, "outcome": "skipped", "seconds": 0.0} for s in order]

    def cancel(self) -> None:
        if self.proc is None:  # handed over
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def noop_run(
    root: Path,
    run_name: str | None,
    allow_rewrite: bool,
    stack: contextlib.ExitStack | None = None,
) -> tuple[list[dict] | None, State | None]:
    """(the no-op's stage rows, DVC's state) when nothing changed: the run is recorded in
    MLflow. Otherwise (None, the state, or None when DVC could not answer), and the caller
    runs the flow with ``prepared=True`` and the state's order and untouched stages: the
    leftovers of a failed run are swept and the source manifests synced here first, as the
    flow does. With ``stack``, the recorder, MLflow imported by now, records that flow run
    (`Recorder.hand_over`) until the stack closes, unless OTCURATE_TRACKING_PROCESS=0."""
    recorder = Recorder(root, run_name)  # imports MLflow while DVC answers
    try:
        sweep_leftovers(root)
        report = sync_sources(root, allow_rewrite)
        state = None
        if not (report["added"] or report["clean_changed"]):  # else every stage reruns
            from dvc.exceptions import DvcException

            try:
                state = dvc_state(root)
            except DvcException:  # e.g. DVC's lock held by a `dvc` command: the flow retries
                pass
            else:
                if not state.stale:
                    return recorder.record(state.order), state
        if stack is not None and os.environ.get(TRACKING_PROCESS, "1") != "0":
            recorder.hand_over(stack)
        return None, state
    finally:
        recorder.cancel()


def _recorder_main(root: str, run_name: str) -> int:
    """`Recorder`'s process: import MLflow's client and open an existing store (its engine
    and schema check, which MLflow caches per URI), then wait for the order (a no-op) or
    for a flow run's tracker to open (tracking.serve). A store that does not exist yet is
    left for the run that creates it: opening it would write.

    Our stdout carries only the answers to a flow run's tracker: whatever else prints
    goes to stderr. Ctrl-C and SIGTERM, which reach the whole process group, are left to
    the flow: it closes its runs through this process (FAILED) before it ends; this
    process ends at the end of its input, or when the run kills it."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - the slow import, done early
    from mlflow.tracking import MlflowClient

    from otcurate_pipeline.tracking import tracking_uri

    uri = tracking_uri(Path(root))
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///") :]).is_file():
        MlflowClient(tracking_uri=uri)

    line = sys.stdin.readline()
    if not line.strip():
        return 0  # cancelled: the flow runs and records itself
    request = json.loads(line)
    if isinstance(request, list):
        record_noop(Path(root), request, run_name or None)
        return 0
    from otcurate_pipeline.tracking import serve

    serve(Path(root), request, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    code = _recorder_main(*sys.argv[1:3])
    # The record is committed (sqlite) and its artifacts copied: end here, as multiprocessing
    # ends its workers, without the interpreter's teardown of MLflow's imports (~0.9 s on
    # the no-op's critical path, which waits for this process).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
