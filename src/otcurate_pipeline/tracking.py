"""MLflow records of pipeline runs: one parent run per flow run, one child run per stage.

Each child carries the stage's params (from dvc.lock), metrics and plots (from
the files dvc.yaml declares), and lineage tags:
`git.commit`, `git.dirty`, `dvc.stage`, `dvc.outcome` (ran|restored|skipped|failed),
`dvc.dep.<path>` and `dvc.out.<path>` (md5 from dvc.lock).
A tracking failure is reported and never loses computed results.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from otcurate_pipeline import layout

EXPERIMENT = "otcurate"
REGISTERED_MODEL = "otcurate-clip"
MODEL_STAGE = "finetune"  # the stage whose `out` is registered as a model version


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else an absolute sqlite URI at the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def artifact_root(root: Path) -> str:
    return (root / "mlartifacts").resolve().as_uri()


def git_state(root: Path, *paths: str) -> tuple[str, bool]:
    """(HEAD commit or 'none', whether tracked files differ from it; only those under the
    git pathspecs ``paths``, when given)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "none", True
    dirty = (
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        != ""
    )
    return commit, dirty


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.exists():
        return {}
    return (layout.load_yaml(path.read_text()) or {}).get("stages", {})


def flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from flatten(v, key + ".")
        else:
            yield key, v


def lock_tags(entry: Mapping[str, Any]) -> dict[str, str]:
    tags = {}
    for kind in ("deps", "outs"):
        for item in entry.get(kind, []) or []:
            tags[f"dvc.{kind[:-1]}.{item['path']}"] = item.get("md5", "")
    return tags


def lock_params(entry: Mapping[str, Any]) -> dict[str, str]:
    params = {}
    for _file, sections in (entry.get("params") or {}).items():
        for key, value in flatten(sections):
            params[key] = json.dumps(value) if not isinstance(value, str) else value
    return params


def _numeric(d: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in flatten(d) if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def reap(client: Any, exp_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose process (tags `otcurate.pid`,
    `otcurate.host`) is gone from this host: a run killed by SIGKILL, a full disk or a
    power cut never closes its own MLflow record. Returns the ids marked."""
    import socket

    host = socket.gethostname()
    marked = []
    try:
        running = client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=1000)
    except Exception as exc:  # noqa: BLE001 - a store we cannot search: nothing to mark
        print(f"otcurate: tracking: could not look for dead runs: {exc}", file=sys.stderr)
        return marked
    for run in running:
        tags = run.data.tags
        pid = tags.get("otcurate.pid", "")
        if not pid.isdigit() or tags.get("otcurate.host") != host or _alive(int(pid)):
            continue
        try:
            client.set_tag(run.info.run_id, "otcurate.died", "its process was gone; marked KILLED")
            client.set_terminated(run.info.run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001 - e.g. a read-only store or another's run
            print(
                f"otcurate: tracking: could not mark {run.info.run_id} KILLED: {exc}",
                file=sys.stderr,
            )
            continue
        marked.append(run.info.run_id)
    return marked


class Tracker:
    """Parent/child MLflow runs for one flow run. Every call swallows and reports tracking errors."""

    def __init__(
        self,
        root: Path,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        owner_pid: int | None = None,
    ):
        """``owner_pid``: the process whose death means the run died (`reap`); this one by
        default, the flow's when a `TrackerProcess` serves it."""
        self.root = Path(root).resolve()
        self.uri = tracking_uri(self.root)
        self.stages = layout.stages(self.root)
        self.client = None
        self.parent_id: str | None = None
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            exp_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(
                    EXPERIMENT, artifact_location=artifact_root(self.root)
                )
            )
            import socket

            dead = reap(self.client, exp_id)
            if dead:
                print(
                    f"otcurate: tracking: {len(dead)} earlier run(s) whose process died were "
                    "marked KILLED in MLflow",
                    file=sys.stderr,
                )
            commit, dirty = git_state(self.root)
            self.git = {"git.commit": commit, "git.dirty": str(dirty).lower()}
            self.owner = {
                "otcurate.pid": str(owner_pid or os.getpid()),
                "otcurate.host": socket.gethostname(),
            }
            run = self.client.create_run(
                exp_id,
                run_name=run_name,
                tags={**self.git, **self.owner, **(tags or {}), "otcurate.kind": "pipeline"},
            )
            self.parent_id = run.info.run_id
            self.exp_id = exp_id
        except Exception as exc:  # noqa: BLE001
            self._warn("could not start the MLflow parent run", exc)
            self.client = None

    @staticmethod
    def _warn(what: str, exc: BaseException) -> None:
        print(
            f"otcurate: tracking: {what}: {exc} (results are kept; only the MLflow record is missing)",
            file=sys.stderr,
        )

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def start_stage(self, name: str) -> str | None:
        if self.client is None:
            return None
        try:
            run = self.client.create_run(
                self.exp_id,
                run_name=name,
                tags={
                    "mlflow.parentRunId": self.parent_id,
                    "dvc.stage": name,
                    **self.git,
                    **self.owner,
                },
            )
            return run.info.run_id
        except Exception as exc:  # noqa: BLE001
            self._warn(f"could not start the run of stage {name}", exc)
            return None

    def end_stage(
        self,
        run_id: str | None,
        name: str,
        outcome: str,
        seconds: float,
        lock: dict[str, Any] | None = None,
    ) -> None:
        """Record a finished stage (``lock``: dvc.lock's stages, when the caller has read it)."""
        if self.client is None or run_id is None:
            return
        try:
            from mlflow.entities import Metric, Param, RunTag

            entry = (read_lock(self.root) if lock is None else lock).get(name, {})
            tags = {"dvc.outcome": outcome, **lock_tags(entry)}
            params = lock_params(entry)
            metrics = {"stage_seconds": seconds}
            paths = self.stages[name].paths
            results = self.root / paths.get("results", "")  # embed has no results folder
            if "results" in paths and (results / "metrics.json").exists():
                metrics.update(_numeric(json.loads((results / "metrics.json").read_text())))
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                params=[Param(k, v[:6000]) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            if outcome != "failed" and "results" in paths:
                for sub in ("plots", "report.md", "metrics.json"):
                    p = results / sub
                    if p.is_dir():
                        self.client.log_artifacts(run_id, str(p), artifact_path=sub)
                    elif p.exists():
                        self.client.log_artifact(run_id, str(p))
            if name == MODEL_STAGE and outcome == "ran":
                self._log_model(run_id, self.root / paths["out"])
            self.client.set_terminated(run_id, "FAILED" if outcome == "failed" else "FINISHED")
        except Exception as exc:  # noqa: BLE001
            self._warn(f"could not record stage {name}", exc)

    def _log_model(self, run_id: str, folder: Path) -> None:
        """Log the fine-tuned open_clip folder once (when it was produced) and register a version."""
        if not folder.exists():
            return
        self.client.log_artifacts(run_id, str(folder), artifact_path="model")
        try:
            self.client.get_registered_model(REGISTERED_MODEL)
        except Exception:  # noqa: BLE001 - not registered yet
            self.client.create_registered_model(
                REGISTERED_MODEL,
                description="open_clip checkpoints fine-tuned by otcurate (open_clip_config.json + model.safetensors).",
            )
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        self.client.create_model_version(REGISTERED_MODEL, source, run_id=run_id)

    def finish(self, status: str, summary: Mapping[str, Any] | None = None) -> None:
        if self.client is None or self.parent_id is None:
            return
        try:
            if summary:
                from mlflow.entities import RunTag

                self.client.log_batch(
                    self.parent_id,
                    tags=[RunTag(f"outcome.{k}", str(v)) for k, v in summary.items()],
                )
            from otcurate_pipeline.manifests import ALL_MANIFESTS

            for rel in ("dvc.lock", "params.yaml", *map(str, ALL_MANIFESTS)):
                if (self.root / rel).exists():  # the pipeline's state as this run left it
                    self.client.log_artifact(
                        self.parent_id, str(self.root / rel), artifact_path="lineage"
                    )
            self.client.set_terminated(self.parent_id, status)
        except Exception as exc:  # noqa: BLE001
            self._warn("could not close the parent run", exc)


# A Tracker in another process. Importing MLflow and opening its store take ~5 s here,
# which a flow run paid before its first stage: `uptodate.Recorder` starts a process that
# does both while DVC decides whether anything changed; when something did, the flow's
# records are written by that process through `TrackerProcess` instead of by a Tracker of
# its own. One JSON line per call and one per answer, in order; same records, same
# owner (the flow's pid, so that `reap` marks the run KILLED if the flow dies).

_CALLS = ("start_stage", "end_stage", "finish")
_SERVED: list = []  # the process handed over for the next flow run (`served_by`)


def serve(root: Path, first: Mapping[str, Any], requests, replies) -> None:
    """The tracking process's loop: ``first`` opens the parent run ({"open": {run_name,
    tags, owner_pid}}), then each line of ``requests`` ({"call": name, "args": [...]}) is
    answered on ``replies`` ({"result": ...}) until `finish` is answered or the flow goes
    away (end of input: its runs stay RUNNING for `reap`)."""
    opened = first["open"]
    tracker = Tracker(
        root, opened.get("run_name"), opened.get("tags"), owner_pid=opened.get("owner_pid")
    )

    def answer(result: Any) -> None:
        replies.write(json.dumps({"result": result}) + "\n")
        replies.flush()

    answer({"parent_id": tracker.parent_id, "live": tracker.client is not None})
    for line in requests:
        request = json.loads(line)
        if request["call"] not in _CALLS:
            answer(None)
            continue
        answer(getattr(tracker, request["call"])(*request["args"]))
        if request["call"] == "finish":
            return


class TrackerProcess:
    """`Tracker`'s interface, its calls made by a tracking process (``proc``: stdin and stdout
    pipes, text; see `serve`). Like Tracker, it never raises: a process that fails, dies or
    stops answering is reported once, and the rest of the run goes unrecorded."""

    TIMEOUT = 600.0  # seconds for one answer: a model version's artifacts are copied in one

    def __init__(
        self,
        proc: subprocess.Popen,
        root: Path,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ):
        self.proc = proc
        self.root = Path(root).resolve()
        self.uri = tracking_uri(self.root)
        opened = self._ask(
            {"open": {"run_name": run_name, "tags": dict(tags or {}), "owner_pid": os.getpid()}},
            None,  # not answered: `open_tracker` falls back to a Tracker here
        )
        self.answered = isinstance(opened, dict)
        self.parent_id = opened.get("parent_id") if self.answered else None
        if self.answered and not opened.get("live"):
            self._close()  # the process reported why (a Tracker without a client)

    def _ask(self, request: Mapping[str, Any], what: str | None) -> Any:
        """The answer to ``request``; None, said once (``what``), if none comes."""
        import select

        if self.proc is None:
            return None
        try:
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                line = ""  # it has gone: say how, below
            else:
                ready, _, _ = select.select([self.proc.stdout], [], [], self.TIMEOUT)
                line = self.proc.stdout.readline() if ready else ""
            if not line:
                try:
                    gone = f"exited {self.proc.wait(timeout=5)}"
                except subprocess.TimeoutExpired:
                    gone = f"gave no answer in {self.TIMEOUT:.0f} s"
                raise RuntimeError(f"the tracking process {gone}")
            return json.loads(line)["result"]
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            if what is not None:
                Tracker._warn(what, exc)
            self._close()
            return None

    def _close(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def start_stage(self, name: str) -> str | None:
        return self._ask({"call": "start_stage", "args": [name]}, f"could not start {name}")

    def end_stage(
        self,
        run_id: str | None,
        name: str,
        outcome: str,
        seconds: float,
        lock: dict[str, Any] | None = None,
    ) -> None:
        if run_id is not None:
            args = [run_id, name, outcome, seconds, lock]
            self._ask({"call": "end_stage", "args": args}, f"could not record stage {name}")

    def finish(self, status: str, summary: Mapping[str, Any] | None = None) -> None:
        args = [status, dict(summary or {})]
        self._ask({"call": "finish", "args": args}, "could not close the parent run")
        self._close()


@contextlib.contextmanager
def served_by(proc: subprocess.Popen) -> Iterator[None]:
    """Hand ``proc`` (a tracking process that has not been sent anything) to the next
    `open_tracker` in this process; killed afterwards if nothing took it (it has written
    nothing: it opens only a store that exists, which reads)."""
    _SERVED.append(proc)
    try:
        yield
    finally:
        if proc in _SERVED:
            _SERVED.remove(proc)
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def open_tracker(
    root: Path, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> Tracker | TrackerProcess:
    """The flow run's tracker: the handed-over tracking process's if there is one alive,
    else a Tracker in this process."""
    while _SERVED:
        proc = _SERVED.pop()
        if proc.poll() is None:
            tracker = TrackerProcess(proc, root, run_name, tags)
            if tracker.answered:
                return tracker
        proc.wait()
    return Tracker(root, run_name, tags)
