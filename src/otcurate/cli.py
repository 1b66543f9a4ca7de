"""The `otcurate` command: run the pipeline, see what would rerun, trace lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

# No phoning home (there may be no network; it also raced sqlite on a first start).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The serverless (ephemeral) Prefect API migrates a fresh sqlite database on its first start;
# on 2 busy cores that took longer than Prefect's default 20 s wait, so wait longer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from otcurate.params import SECTIONS, ParamsError, load_all, parse_yaml

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Make a noisily pre-trained CLIP robust with optimal transport, reproducibly.",
)
console = Console()
err = Console(stderr=True)


def find_root(start: Path | None = None) -> Path:
    """The project root: the nearest folder upwards holding dvc.yaml."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists():
            return d
    err.print(
        "[red]error:[/] no dvc.yaml here or in any parent folder; run otcurate inside the project."
    )
    raise typer.Exit(2)


def _parse_value(text: str):
    try:
        return parse_yaml(text)
    except Exception:  # noqa: BLE001 - not YAML: keep the text
        return text


def apply_overrides(root: Path, overrides: list[str]) -> list[str]:
    """Write `section.key=value` overrides into params.yaml (comments kept), after validating the result."""
    from ruamel.yaml import YAML

    path = root / "params.yaml"
    ry = YAML()
    ry.preserve_quotes = True
    doc = ry.load(path.read_text())
    plain = parse_yaml(path.read_text()) or {}
    changed = []
    for item in overrides:
        if "=" not in item:
            raise ParamsError(
                f"--set {item!r}: expected section.key=value, e.g. --set finetune.lr=5e-5"
            )
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in SECTIONS:
            raise ParamsError(
                f"--set {item!r}: the key must start with a section ({', '.join(SECTIONS)})."
            )
        value = _parse_value(text)
        node, pnode = doc, plain
        for part in parts[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
                pnode[part] = {}
            node, pnode = node[part], pnode[part]
        if node.get(parts[-1]) != value:
            changed.append(f"{key}={value!r}")
        node[parts[-1]] = value
        pnode[parts[-1]] = value
    load_all(plain)  # strict: unknown keys, wrong types, bad combinations stop here
    if changed:
        from io import StringIO

        buf = StringIO()
        ry.dump(doc, buf)
        load_all(parse_yaml(buf.getvalue()))  # what is written must read back valid, too
        tmp = path.with_name(path.name + ".tmp-set")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, path)
    return changed


def _validate_params(root: Path) -> None:
    load_all(parse_yaml((root / "params.yaml").read_text()) or {})


@app.command()
def run(
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", help="Override a param in params.yaml: section.key=value (repeatable)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the MLflow parent run.")] = None,
) -> None:
    """Run the pipeline (a Prefect flow over the DVC stages); only what changed reruns."""
    root = find_root()
    try:
        if set_:
            changed = apply_overrides(root, set_)
            if changed:
                console.print(f"params.yaml updated: {', '.join(changed)}")
        _validate_params(root)
    except ParamsError as exc:
        err.print(f"[red]error:[/] params.yaml: {exc}")
        raise typer.Exit(2) from None
    sys.path.insert(0, str(root))
    from flows.pipeline import StageFailed, pipeline

    t0 = time.perf_counter()
    try:
        results = pipeline(str(root), run_name=name)
    except StageFailed as exc:
        err.print(
            f"\n[red]stage '{exc.stage}' failed[/] (exit {exc.code}); its last good outputs were restored.\n{exc.tail}"
        )
        raise typer.Exit(1) from None
    table = Table(title=f"pipeline run ({time.perf_counter() - t0:.1f} s)")
    table.add_column("stage")
    table.add_column("outcome")
    table.add_column("seconds", justify="right")
    style = {"ran": "green", "restored": "cyan", "skipped": "dim"}
    for r in results:
        table.add_row(
            r["stage"], f"[{style.get(r['outcome'], '')}]{r['outcome']}[/]", f"{r['seconds']:.1f}"
        )
    console.print(table)
    report = root / "results" / "evaluate" / "report.md"
    if report.exists():
        _print_comparison(root)


def _print_comparison(root: Path) -> None:
    m = json.loads((root / "results" / "evaluate" / "metrics.json").read_text())
    keys = [
        k
        for k in ("zs_acc", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10")
        if f"base_{k}" in m
    ]
    t = Table(title="base vs fine-tuned (clean test split)")
    for c in ("metric", "base", "fine-tuned", "change"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for k in keys:
        b, f = m[f"base_{k}"], m[f"finetune_{k}"]
        t.add_row(k, f"{b:.4f}", f"{f:.4f}", f"[{'green' if f >= b else 'red'}]{f - b:+.4f}[/]")
    console.print(t)
    det = {k[len("detect_") :]: v for k, v in m.items() if k.startswith("detect_")}
    if det:
        console.print("detection: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(det.items())))
    console.print(f"report: {root / 'results' / 'evaluate' / 'report.md'}")


@app.command()
def status() -> None:
    """What would rerun, and why (DVC's view of changed deps, params and outputs)."""
    root = find_root()
    bindir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bindir / "dvc"), "status", "--json"], cwd=root, capture_output=True, text=True
    )
    if proc.returncode != 0:
        err.print(proc.stderr)
        raise typer.Exit(proc.returncode)
    data = json.loads(proc.stdout or "{}")
    if not data:
        console.print("Everything is up to date: `otcurate run` would skip every stage.")
        return
    t = Table(title="stages that would rerun")
    t.add_column("stage")
    t.add_column("why")
    for stage, changes in data.items():
        reasons = []
        for c in changes:
            if isinstance(c, str):
                reasons.append(c)
                continue
            for kind, items in c.items():
                if isinstance(items, dict):
                    for path, what in items.items():
                        if isinstance(what, dict):
                            what = ", ".join(f"{k} {v}" for k, v in what.items())
                        reasons.append(f"{kind}: {path} ({what})")
                else:
                    reasons.append(f"{kind}: {items}")
        t.add_row(stage.split(":")[-1], "\n".join(reasons))
    console.print(t)


def _lineage(root: Path, target: str) -> dict:
    """The chain of stages from `target` back to the sources, from dvc.lock (and MLflow run ids)."""
    from otcurate.tracking import lock_params, read_lock

    lock = read_lock(root)
    target = os.path.normpath(target)
    producers = {
        os.path.normpath(o["path"]): name for name, e in lock.items() for o in e.get("outs", [])
    }
    if target not in producers:
        known = ", ".join(sorted(producers)) or "none (run the pipeline first)"
        raise typer.BadParameter(
            f"{target} is not an output of any stage in dvc.lock; outputs: {known}"
        )
    runs = _mlflow_runs(root)
    seen: dict[str, dict] = {}

    def visit(name: str) -> dict:
        if name in seen:
            return seen[name]
        e = lock[name]
        node = {
            "stage": name,
            "cmd": e.get("cmd"),
            "outs": {o["path"]: o.get("md5") for o in e.get("outs", [])},
            "deps": {d["path"]: d.get("md5") for d in e.get("deps", [])},
            "params": lock_params(e),
            "mlflow_runs": runs.get(
                (name, tuple(sorted((o["path"], o.get("md5")) for o in e.get("outs", [])))), []
            ),
            "upstream": [],
        }
        seen[name] = node
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


def _mlflow_runs(root: Path) -> dict:
    """{(stage, outs): [{run_id, parent, outcome, git.commit, start}]} from the MLflow store, if any."""
    from otcurate.tracking import tracking_uri

    if not os.environ.get("MLFLOW_TRACKING_URI") and not (root / "mlflow.db").exists():
        return {}
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri(root))
        exp = client.get_experiment_by_name("otcurate")
        if exp is None:
            return {}
        out: dict = {}
        for r in client.search_runs(
            [exp.experiment_id], "tags.`dvc.stage` != ''", max_results=5000
        ):
            tags = r.data.tags
            outs = tuple(
                sorted(
                    (k[len("dvc.out.") :], v) for k, v in tags.items() if k.startswith("dvc.out.")
                )
            )
            out.setdefault((tags["dvc.stage"], outs), []).append(
                {
                    "run_id": r.info.run_id,
                    "parent_run_id": tags.get("mlflow.parentRunId"),
                    "outcome": tags.get("dvc.outcome"),
                    "git_commit": tags.get("git.commit"),
                    "start_time": r.info.start_time,
                }
            )
        return out
    except Exception as exc:  # noqa: BLE001
        err.print(f"(MLflow store not readable: {exc})")
        return {}


@app.command()
def lineage(
    path: Annotated[str, typer.Argument(help="An output path, e.g. models/finetune")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Which data, params, code and runs produced PATH: the chain back to the ingest source."""
    root = find_root()
    try:
        chain = _lineage(root, path)
    except typer.BadParameter as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        console.print_json(json.dumps(chain))
        return
    from otcurate.tracking import git_state

    commit, dirty = git_state(root)
    tree = Tree(f"[bold]{path}[/]  (git {commit[:10]}{' dirty' if dirty else ''})")

    shown: set[str] = set()

    def add(node: dict, branch: Tree) -> None:
        if node["stage"] in shown:  # a DAG, not a tree: each stage is printed once
            branch.add(f"[cyan]{node['stage']}[/] (shown above)")
            return
        shown.add(node["stage"])
        b = branch.add(f"[bold cyan]{node['stage']}[/]: {node['cmd']}")
        for p, md5 in node["outs"].items():
            b.add(f"out {p}  md5 {md5}")
        for p, md5 in node["deps"].items():
            if not p.startswith(("stages/", "src/")):
                b.add(f"dep {p}  md5 {md5}")
        params = {
            k: v
            for k, v in node["params"].items()
            if not k.startswith("base.") or node["stage"] == "ingest"
        }
        if params:
            b.add("params " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
        for r in node["mlflow_runs"][-3:]:
            b.add(
                f"mlflow run {r['run_id']} ({r['outcome']}, parent {r['parent_run_id']}, git {str(r['git_commit'])[:10]})"
            )
        for up in node["upstream"]:
            add(up, b)

    add(chain, tree)
    console.print(tree)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
