"""Lineage and run comparison from the records the pipeline leaves behind.

Two sources, one node shape:
- `dvc.lock` (the current state): which stage produced a path, from which deps and params;
- the MLflow store (the history): every stage run of every pipeline run, tagged with the
  md5 of each dep and out (`dvc.dep.<path>`, `dvc.out.<path>`), its params, git commit
  and outcome. A stage run's upstream is found by md5: the latest earlier run of any stage
  whose out had the md5 this run's dep had. That answers "where did this model come from?"
  after dvc.lock has moved on.

A node is a dict: stage, outs {path: md5}, deps {path: md5}, params, outcome, git_commit,
run_id, parent_run_id, start_time (ms), cmd (lock only), upstream [nodes].
The functions here take records and return records; `fetch_*` read the store.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CODE_PREFIXES = ("stages/", "src/", "flows/")  # deps that are code, not data


@dataclass
class StageRun:
    """One stage's child run in MLflow."""

    run_id: str
    stage: str
    parent_run_id: str | None
    outcome: str | None
    git_commit: str | None
    git_dirty: str | None
    start_time: int
    outs: dict[str, str] = field(default_factory=dict)
    deps: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PipelineRun:
    """A flow run's parent run in MLflow, with its stages."""

    run_id: str
    name: str | None
    status: str | None
    git_commit: str | None
    start_time: int
    stages: dict[str, StageRun] = field(default_factory=dict)


def stage_run_from_mlflow(run: Any) -> StageRun:
    tags = run.data.tags
    return StageRun(
        run_id=run.info.run_id,
        stage=tags["dvc.stage"],
        parent_run_id=tags.get("mlflow.parentRunId"),
        outcome=tags.get("dvc.outcome"),
        git_commit=tags.get("git.commit"),
        git_dirty=tags.get("git.dirty"),
        start_time=int(run.info.start_time or 0),
        outs={k[len("dvc.out.") :]: v for k, v in tags.items() if k.startswith("dvc.out.")},
        deps={k[len("dvc.dep.") :]: v for k, v in tags.items() if k.startswith("dvc.dep.")},
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
    )


def fetch(client: Any, experiment: str) -> tuple[list[PipelineRun], list[StageRun]]:
    """Every pipeline run and every stage run of ``experiment`` (oldest first)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [], []

    def search(flt: str) -> list[Any]:
        found, token = [], None
        while True:
            page = client.search_runs([exp.experiment_id], flt, max_results=1000, page_token=token)
            found += list(page)
            token = page.token
            if not token:
                return found

    stages = sorted(
        (stage_run_from_mlflow(r) for r in search("tags.`dvc.stage` != ''")),
        key=lambda s: (s.start_time, s.run_id),
    )
    pipelines = []
    for r in search("tags.`otcurate.kind` = 'pipeline'"):
        p = PipelineRun(
            run_id=r.info.run_id,
            name=r.info.run_name,
            status=r.info.status,
            git_commit=r.data.tags.get("git.commit"),
            start_time=int(r.info.start_time or 0),
        )
        p.stages = {s.stage: s for s in stages if s.parent_run_id == p.run_id}
        pipelines.append(p)
    pipelines.sort(key=lambda p: (p.start_time, p.run_id))
    return pipelines, stages


def _node(s: StageRun) -> dict[str, Any]:
    return {
        "stage": s.stage,
        "outs": dict(s.outs),
        "deps": dict(s.deps),
        "params": dict(s.params),
        "outcome": s.outcome,
        "git_commit": s.git_commit,
        "git_dirty": s.git_dirty,
        "run_id": s.run_id,
        "parent_run_id": s.parent_run_id,
        "start_time": s.start_time,
        "upstream": [],
    }


def producer_of(stages: Iterable[StageRun], path: str, md5: str, before: int) -> StageRun | None:
    """The stage run, started no later than ``before``, that left ``path`` at ``md5``: the
    latest that ran (or was restored from DVC's run cache), else the latest that skipped
    with it already in place (a failed run produced nothing)."""
    found = [
        s
        for s in stages
        if s.start_time <= before and s.outcome != "failed" and s.outs.get(path) == md5
    ]
    if not found:
        return None
    return max(found, key=lambda s: (s.outcome in ("ran", "restored"), s.start_time, s.run_id))


def chain_from_runs(stages: list[StageRun], start: StageRun) -> dict[str, Any]:
    """The lineage of one stage run: upstream runs matched by dep md5, recursively. A stage
    reached twice is the same node object (a DAG; JSON repeats it)."""
    seen: dict[str, dict[str, Any]] = {}

    def visit(s: StageRun) -> dict[str, Any]:
        if s.run_id in seen:
            return seen[s.run_id]
        node = seen[s.run_id] = _node(s)
        ups: dict[str, StageRun] = {}
        for path, md5 in sorted(s.deps.items()):
            if path.startswith(CODE_PREFIXES):
                continue
            up = producer_of(stages, path, md5, s.start_time)
            if up is not None and up.run_id != s.run_id:
                ups[up.run_id] = up
        node["upstream"] = [visit(u) for u in sorted(ups.values(), key=lambda u: u.stage)]
        return node

    return visit(start)


def chain_from_lock(
    lock: Mapping[str, Any], target: str, stages: list[StageRun], params_of
) -> dict[str, Any]:
    """The lineage of ``target`` (an output path) as dvc.lock records it now; each node also
    names the latest MLflow run that left exactly those outs. ``params_of(entry)`` flattens
    a lock entry's params. Raises KeyError naming the known outputs when ``target`` is none."""
    target = os.path.normpath(target)
    producers = {
        os.path.normpath(o["path"]): name for name, e in lock.items() for o in e.get("outs", [])
    }
    if target not in producers:
        known = ", ".join(sorted(producers)) or "none (run the pipeline first)"
        raise KeyError(f"{target} is not an output of any stage in dvc.lock; outputs: {known}")
    seen: dict[str, dict[str, Any]] = {}

    def visit(name: str) -> dict[str, Any]:
        if name in seen:
            return seen[name]
        e = lock[name]
        outs = {o["path"]: o.get("md5") for o in e.get("outs", [])}
        runs = [s for s in stages if s.stage == name and s.outcome != "failed" and s.outs == outs]
        last = runs[-1] if runs else None
        node = seen[name] = {
            "stage": name,
            "cmd": e.get("cmd"),
            "outs": outs,
            "deps": {d["path"]: d.get("md5") for d in e.get("deps", [])},
            "params": params_of(e),
            "outcome": last.outcome if last else None,
            "git_commit": last.git_commit if last else None,
            "git_dirty": last.git_dirty if last else None,
            "run_id": last.run_id if last else None,
            "parent_run_id": last.parent_run_id if last else None,
            "start_time": last.start_time if last else None,
            "mlflow_runs": [
                {
                    "run_id": r.run_id,
                    "parent_run_id": r.parent_run_id,
                    "outcome": r.outcome,
                    "git_commit": r.git_commit,
                    "start_time": r.start_time,
                }
                for r in runs
            ],
            "upstream": [],
        }
        ups = sorted(
            {
                producers[os.path.normpath(d["path"])]
                for d in e.get("deps", [])
                if os.path.normpath(d["path"]) in producers
            }
        )
        node["upstream"] = [visit(u) for u in ups]
        return node

    return visit(producers[target])


def chain_of_pipeline(stages: list[StageRun], pipeline: PipelineRun) -> dict[str, Any]:
    """A pipeline run's lineage: its sink stages (whose outs no other stage of the run
    reads), each with its chain, under one node for the run."""
    runs = list(pipeline.stages.values())
    read = {(p, m) for s in runs for p, m in s.deps.items()}
    sinks = [s for s in runs if not any((p, m) in read for p, m in s.outs.items())]
    return {
        "stage": "pipeline",
        "outs": {},
        "deps": {},
        "params": {},
        "outcome": pipeline.status,
        "git_commit": pipeline.git_commit,
        "git_dirty": None,
        "run_id": pipeline.run_id,
        "parent_run_id": None,
        "start_time": pipeline.start_time,
        "upstream": [chain_from_runs(stages, s) for s in sorted(sinks, key=lambda s: s.stage)],
    }


def node_key(n: Mapping[str, Any]) -> tuple:
    """What identifies a node: one stage run leaving these outs (JSON repeats shared nodes)."""
    return (n["stage"], n.get("run_id"), tuple(sorted(n["outs"].items())))


def walk(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every node once, depth first from ``node``."""
    out, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if node_key(n) in seen:
            continue
        seen.add(node_key(n))
        out.append(n)
        stack.extend(reversed(n["upstream"]))
    return out


def mermaid(node: Mapping[str, Any]) -> str:
    """A Mermaid flowchart of the chain: one box per stage run (stage, outcome, out md5s,
    run id), arrows from producer to consumer."""
    ids: dict[tuple, str] = {}
    lines = ["flowchart LR"]

    for n in walk(node):
        ids[node_key(n)] = f"n{len(ids)}"
        label = [n["stage"] + (f" ({n['outcome']})" if n.get("outcome") else "")]
        label += [f"{p} {str(m)[:8]}" for p, m in sorted(n["outs"].items())]
        if n.get("run_id"):
            label.append(f"run {n['run_id'][:8]}")
        text = "<br/>".join(x.replace('"', "'") for x in label)
        lines.append(f'  {ids[node_key(n)]}["{text}"]')
    for n in walk(node):
        for up in n["upstream"]:
            lines.append(f"  {ids[node_key(up)]} --> {ids[node_key(n)]}")
    return "\n".join(lines) + "\n"


def diff_runs(a: PipelineRun, b: PipelineRun) -> dict[str, Any]:
    """What differs between two pipeline runs: params (key: [a, b]), metrics
    (stage.metric: [a, b], stage_seconds left out), the stages whose data inputs changed
    (stage: {path: [md5 a, md5 b]}), and each stage's outcome in both."""

    def params(p: PipelineRun) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in p.stages.values():
            out.update(s.params)
        return out

    def metrics(p: PipelineRun) -> dict[str, float]:
        return {
            f"{s.stage}.{k}": v
            for s in p.stages.values()
            for k, v in s.metrics.items()
            if k != "stage_seconds"
        }

    pa, pb, ma, mb = params(a), params(b), metrics(a), metrics(b)
    inputs: dict[str, dict[str, list[str | None]]] = {}
    for name in sorted(set(a.stages) | set(b.stages)):
        da = a.stages[name].deps if name in a.stages else {}
        db = b.stages[name].deps if name in b.stages else {}
        changed = {
            p: [da.get(p), db.get(p)]
            for p in sorted(set(da) | set(db))
            if da.get(p) != db.get(p) and not p.startswith(CODE_PREFIXES)
        }
        code = sorted(
            p for p in set(da) | set(db) if p.startswith(CODE_PREFIXES) and da.get(p) != db.get(p)
        )
        if changed or code:
            inputs[name] = {**changed, **{p: [da.get(p), db.get(p)] for p in code}}
    return {
        "a": a.run_id,
        "b": b.run_id,
        "params": {
            k: [pa.get(k), pb.get(k)] for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)
        },
        "metrics": {
            k: [ma.get(k), mb.get(k)] for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)
        },
        "inputs_changed": inputs,
        "outcomes": {
            name: [
                a.stages[name].outcome if name in a.stages else None,
                b.stages[name].outcome if name in b.stages else None,
            ]
            for name in sorted(set(a.stages) | set(b.stages))
        },
        "git_commit": [a.git_commit, b.git_commit],
    }


class LineageError(ValueError):
    """A lineage target or a run reference that no record matches; the message says why."""


def read_store(
    root: Path, warn: Callable[[str], Any] = print
) -> tuple[list[PipelineRun], list[StageRun]]:
    """(pipeline runs, stage runs) from the project's MLflow store; empty when there is none
    yet, or (with a warning) when it cannot be read."""
    from otcurate_pipeline.tracking import EXPERIMENT, reap, tracking_uri

    if not os.environ.get("MLFLOW_TRACKING_URI") and not (root / "mlflow.db").exists():
        return [], []
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri(root))
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is not None and reap(client, exp.experiment_id):
            warn("(runs whose process had died were marked KILLED)")
        return fetch(client, EXPERIMENT)
    except Exception as exc:  # noqa: BLE001
        warn(f"(MLflow store not readable: {exc})")
        return [], []


_RUN_ID = re.compile(r"[0-9a-f]{32}")
_VERSION = re.compile(r"(?:models:/)?([^/\s]+)/(\d+)")


def resolve(
    root: Path, target: str, pipelines: list[PipelineRun], stages: list[StageRun]
) -> dict[str, Any]:
    """A lineage chain for an output path (dvc.lock now), an MLflow run id (pipeline or stage
    run) or a registered model version (`NAME/VERSION` or `models:/NAME/VERSION`)."""
    from otcurate_pipeline.tracking import lock_params, read_lock, tracking_uri

    if _RUN_ID.fullmatch(target):
        for p in pipelines:
            if p.run_id == target:
                return chain_of_pipeline(stages, p)
        for st in stages:
            if st.run_id == target:
                return chain_from_runs(stages, st)
        raise LineageError(
            f"{target} looks like an MLflow run id but no otcurate run has it in {tracking_uri(root)}."
        )
    version = _VERSION.fullmatch(target)
    if version and not (root / target).exists():
        from mlflow.tracking import MlflowClient

        name, number = version.groups()
        try:
            mv = MlflowClient(tracking_uri=tracking_uri(root)).get_model_version(name, number)
        except Exception as exc:  # noqa: BLE001
            raise LineageError(f"no registered model version {name}/{number}: {exc}") from None
        for st in stages:
            if st.run_id == mv.run_id:
                return chain_from_runs(stages, st)
        raise LineageError(
            f"model version {name}/{number} comes from run {mv.run_id}, which is not an otcurate stage run."
        )
    try:
        return chain_from_lock(read_lock(root), target, stages, lock_params)
    except KeyError as exc:
        raise LineageError(
            f"{exc.args[0]}. Or pass an MLflow run id or a registered model version (otcurate-clip/1)."
        ) from None


COMPLETE = ("FINISHED", "FAILED")  # a run that ended by itself; RUNNING / KILLED did not


def pipeline_run(pipelines: list[PipelineRun], ref: str) -> PipelineRun:
    """A pipeline run by id, id prefix, run name, or -1/-2 (the latest complete run, the one
    before: runs that were killed or are still running are not counted)."""
    if re.fullmatch(r"-\d+", ref):
        i = int(ref)
        done = [p for p in pipelines if p.status in COMPLETE]
        if -i > len(done):
            left = len(pipelines) - len(done)
            extra = f" ({left} more killed or still running)" if left else ""
            raise LineageError(
                f"{ref}: only {len(done)} complete pipeline runs are recorded{extra}."
            )
        return done[i]
    hits = [p for p in pipelines if p.run_id.startswith(ref) or p.name == ref]
    if len(hits) != 1:
        what = "no pipeline run" if not hits else f"{len(hits)} pipeline runs"
        raise LineageError(
            f"{ref}: {what} match (give a run id, a unique prefix, a run name, or -1 for the latest)."
        )
    return hits[0]


def when(ms) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def render_tree(chain: Mapping[str, Any], title: str):
    """The chain as a rich Tree: each stage run once (a DAG, not a tree), its run, outs,
    data deps and params (base.* on ingest only), then its upstream."""
    from rich.tree import Tree

    tree = Tree(title)
    shown: set = set()

    def add(node: Mapping[str, Any], branch) -> None:
        key = node_key(node)
        if key in shown:
            branch.add(f"[cyan]{node['stage']}[/] (shown above)")
            return
        shown.add(key)
        head = f"[bold cyan]{node['stage']}[/]"
        if node.get("cmd"):
            head += f": {node['cmd']}"
        b = branch.add(head)
        if node.get("run_id"):
            b.add(
                f"{node.get('outcome')} · {when(node.get('start_time'))} · git "
                f"{str(node.get('git_commit'))[:10]}{' dirty' if node.get('git_dirty') == 'true' else ''}"
                f" · mlflow run {node['run_id']}"
                + (f" (pipeline run {node['parent_run_id']})" if node.get("parent_run_id") else "")
            )
        for p, md5 in node["outs"].items():
            b.add(f"out {p}  md5 {md5}")
        for p, md5 in node["deps"].items():
            if not p.startswith(CODE_PREFIXES):
                b.add(f"dep {p}  md5 {md5}")
        params = {
            k: v
            for k, v in node["params"].items()
            if not k.startswith("base.") or node["stage"] == "ingest"
        }
        if params:
            b.add("params " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
        for up in node["upstream"]:
            add(up, b)

    add(chain, tree)
    return tree
