"""The `otcurate` command: run the pipeline, see what would rerun, trace lineage, compare runs,
serve the UIs, schedule nightly runs, score new pairs."""

from __future__ import annotations

import json
import os
import re
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

from otcurate_pipeline import artifacts, layout
from otcurate_pipeline.params import SECTIONS, ParamsError, load_all, parse_yaml

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
    allow_rewrite: Annotated[
        bool,
        typer.Option(
            "--allow-rewrite",
            help="Accept a local source whose known files were removed or rewritten "
            "(sources are append-only otherwise).",
        ),
    ] = False,
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
    from otcurate_pipeline.flow import StageFailed, pipeline
    from otcurate_pipeline.manifests import SourceChanged

    t0 = time.perf_counter()
    try:
        results = pipeline(str(root), run_name=name, allow_rewrite=allow_rewrite)
    except SourceChanged as exc:
        err.print(f"[red]error:[/] ingest source: {exc}")
        raise typer.Exit(2) from None
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
    evaluated = root / layout.stages(root)["evaluate"].paths["results"]
    if (evaluated / "report.md").exists():
        _print_comparison(evaluated)


def _print_comparison(evaluated: Path) -> None:
    m = json.loads((evaluated / "metrics.json").read_text())
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
    console.print(f"report: {evaluated / 'report.md'}")


def _source_news(root: Path) -> str:
    """What the sources have that their manifests (data/sources*.json) do not list yet:
    new or rewritten ingest files, changed clean sources (read only)."""
    from otcurate_pipeline import manifests

    try:
        params = parse_yaml((root / "params.yaml").read_text()) or {}
        old, new, cache = manifests.scan(root, params.get("ingest") or {})
        clean = manifests.build_clean(root, params, cache)
    except Exception as exc:  # noqa: BLE001 - status must still show DVC's view
        return f"(could not scan the sources: {exc})"
    lines = []
    if new != old:
        added, broken = manifests.compare(old, new)
        parts = []
        if added:
            parts.append(f"{len(added)} new file(s), e.g. {added[0]}")
        if broken:
            parts.append(
                f"{len(broken)} removed or rewritten, e.g. {broken[0]} (needs --allow-rewrite)"
            )
        what = "; ".join(parts) or "a different source"
        lines.append(
            f"ingest source changed since {manifests.MANIFEST}: {what}. "
            "`otcurate run` reruns from ingest."
        )
    for stage, rel in manifests.CLEAN_MANIFESTS.items():
        if manifests.stale(root, rel, clean[rel]):
            lines.append(
                f"{stage}'s clean source changed since {rel}. `otcurate run` reruns {stage}."
            )
    return "\n".join(lines)


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
    pending = _source_news(root)
    if pending:
        console.print(pending)
    if not data and not pending:
        console.print("Everything is up to date: `otcurate run` would skip every stage.")
        return
    if not data:
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


def _store(root: Path):
    """(pipeline runs, stage runs) from the MLflow store; empty when there is none yet."""
    from otcurate_pipeline.lineage import fetch
    from otcurate_pipeline.tracking import EXPERIMENT, tracking_uri

    if not os.environ.get("MLFLOW_TRACKING_URI") and not (root / "mlflow.db").exists():
        return [], []
    try:
        from mlflow.tracking import MlflowClient

        return fetch(MlflowClient(tracking_uri=tracking_uri(root)), EXPERIMENT)
    except Exception as exc:  # noqa: BLE001
        err.print(f"(MLflow store not readable: {exc})")
        return [], []


_RUN_ID = re.compile(r"[0-9a-f]{32}")
_VERSION = re.compile(r"(?:models:/)?([^/\s]+)/(\d+)")


def _resolve_chain(root: Path, target: str) -> dict:
    """A lineage chain for an output path (dvc.lock now), an MLflow run id (pipeline or stage
    run) or a registered model version (`NAME/VERSION` or `models:/NAME/VERSION`)."""
    from otcurate_pipeline import lineage as lin
    from otcurate_pipeline.tracking import lock_params, read_lock, tracking_uri

    pipelines, stages = _store(root)
    if _RUN_ID.fullmatch(target):
        for p in pipelines:
            if p.run_id == target:
                return lin.chain_of_pipeline(stages, p)
        for st in stages:
            if st.run_id == target:
                return lin.chain_from_runs(stages, st)
        raise typer.BadParameter(
            f"{target} looks like an MLflow run id but no otcurate run has it in {tracking_uri(root)}."
        )
    version = _VERSION.fullmatch(target)
    if version and not (root / target).exists():
        from mlflow.tracking import MlflowClient

        name, number = version.groups()
        try:
            mv = MlflowClient(tracking_uri=tracking_uri(root)).get_model_version(name, number)
        except Exception as exc:  # noqa: BLE001
            raise typer.BadParameter(
                f"no registered model version {name}/{number}: {exc}"
            ) from None
        for st in stages:
            if st.run_id == mv.run_id:
                return lin.chain_from_runs(stages, st)
        raise typer.BadParameter(
            f"model version {name}/{number} comes from run {mv.run_id}, which is not an otcurate stage run."
        )
    try:
        return lin.chain_from_lock(read_lock(root), target, stages, lock_params)
    except KeyError as exc:
        raise typer.BadParameter(
            f"{exc.args[0]}. Or pass an MLflow run id or a registered model version (otcurate-clip/1)."
        ) from None


def _when(ms) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@app.command()
def lineage(
    target: Annotated[
        str,
        typer.Argument(
            help="An output path (models/finetune), an MLflow run id (pipeline or stage run), "
            "or a registered model version (otcurate-clip/3)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    as_mermaid: Annotated[
        bool, typer.Option("--mermaid", help="Print a Mermaid flowchart of the chain.")
    ] = False,
) -> None:
    """Which data, params, code and runs produced TARGET: the chain back to the ingest source.

    A path is traced through dvc.lock as it is now; a run id or model version through the
    MLflow history (each upstream run found by the md5 of the data it left)."""
    from otcurate_pipeline.lineage import CODE_PREFIXES, mermaid, node_key

    root = find_root()
    try:
        chain = _resolve_chain(root, target)
    except typer.BadParameter as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        console.print_json(json.dumps(chain))
        return
    if as_mermaid:
        print(mermaid(chain), end="")
        return
    from otcurate_pipeline.tracking import git_state

    commit, dirty = git_state(root)
    tree = Tree(f"[bold]{target}[/]  (now: git {commit[:10]}{' dirty' if dirty else ''})")
    shown: set = set()

    def add(node: dict, branch: Tree) -> None:
        key = node_key(node)
        if key in shown:  # a DAG, not a tree: each stage run is printed once
            branch.add(f"[cyan]{node['stage']}[/] (shown above)")
            return
        shown.add(key)
        head = f"[bold cyan]{node['stage']}[/]"
        if node.get("cmd"):
            head += f": {node['cmd']}"
        b = branch.add(head)
        if node.get("run_id"):
            b.add(
                f"{node.get('outcome')} · {_when(node.get('start_time'))} · git "
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
    console.print(tree)


def _pipeline_run(pipelines: list, ref: str):
    """A pipeline run by id, id prefix, run name, or -1/-2 (the latest, the one before)."""
    if re.fullmatch(r"-\d+", ref):
        i = int(ref)
        if -i > len(pipelines):
            raise typer.BadParameter(f"{ref}: only {len(pipelines)} pipeline runs are recorded.")
        return pipelines[i]
    hits = [p for p in pipelines if p.run_id.startswith(ref) or p.name == ref]
    if len(hits) != 1:
        what = "no pipeline run" if not hits else f"{len(hits)} pipeline runs"
        raise typer.BadParameter(
            f"{ref}: {what} match (give a run id, a unique prefix, a run name, or -1 for the latest)."
        )
    return hits[0]


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


@app.command()
def diff(
    run_a: Annotated[str, typer.Argument(help="A pipeline run: id, prefix, name, or -2.")] = "-2",
    run_b: Annotated[str, typer.Argument(help="Another one (default: the latest, -1).")] = "-1",
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Params and metrics that differ between two pipeline runs, and which stages' inputs changed."""
    from otcurate_pipeline.lineage import diff_runs

    root = find_root()
    pipelines, _ = _store(root)
    try:
        a, b = _pipeline_run(pipelines, run_a), _pipeline_run(pipelines, run_b)
    except typer.BadParameter as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    d = diff_runs(a, b)
    if as_json:
        console.print_json(json.dumps(d))
        return
    console.print(
        f"A {a.run_id} ({a.name}, {_when(a.start_time)}, git {str(a.git_commit)[:10]})\n"
        f"B {b.run_id} ({b.name}, {_when(b.start_time)}, git {str(b.git_commit)[:10]})"
    )
    for title, rows in (("params", d["params"]), ("metrics", d["metrics"])):
        if not rows:
            console.print(f"no {title} differ")
            continue
        t = Table(title=f"{title} that differ")
        for c in ("key", "A", "B"):
            t.add_column(c, justify="left" if c == "key" else "right")
        for k, (va, vb) in rows.items():
            t.add_row(k, _fmt(va), _fmt(vb))
        console.print(t)
    if d["inputs_changed"]:
        t = Table(title="stages whose inputs changed")
        for c in ("stage", "input", "A md5", "B md5"):
            t.add_column(c)
        for stage, paths in d["inputs_changed"].items():
            for p, (ma, mb) in paths.items():
                t.add_row(stage, p, str(ma), str(mb))
        console.print(t)
    else:
        console.print("no stage's inputs changed")
    console.print(
        "outcomes: " + ", ".join(f"{s} {oa}->{ob}" for s, (oa, ob) in d["outcomes"].items())
    )


@app.command()
def schedule(
    cron: Annotated[str, typer.Option(help='When to run, as cron: "0 3 * * *" is 03:00 daily.')],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    lineage: Annotated[
        str,
        typer.Option(
            help="How each run's dvc.lock is kept: 'branch' commits it to --branch, 'mlflow' "
            "keeps only the copy on the run's MLflow record."
        ),
    ] = "branch",
    branch: Annotated[
        str, typer.Option(help="Git branch for --lineage branch.")
    ] = "otcurate/lineage",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
) -> None:
    """Serve the nightly flow as a Prefect deployment on a schedule (Ctrl-C stops serving).

    Each scheduled run refreshes the source manifest, runs `dvc status`, does nothing when
    nothing changed, else reruns what changed and records dvc.lock. Needs a Prefect server:
    PREFECT_API_URL must point at one (`otcurate ui` starts one)."""
    from otcurate_pipeline.services import reachable

    root = find_root()
    if lineage not in ("branch", "mlflow"):
        err.print(f"[red]error:[/] --lineage must be 'branch' or 'mlflow'; got {lineage!r}.")
        raise typer.Exit(2)
    try:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron, timezone=timezone)
    except Exception as exc:  # noqa: BLE001 - pydantic's message names the field
        err.print(f"[red]error:[/] --cron {cron!r} / --timezone {timezone!r}: {exc}")
        raise typer.Exit(2) from None
    api = os.environ.get("PREFECT_API_URL", "")
    if not api or not reachable(api.rstrip("/") + "/health"):
        where = f"at PREFECT_API_URL={api}" if api else "(PREFECT_API_URL is not set)"
        err.print(
            f"[red]error:[/] no Prefect server is reachable {where}. A schedule needs a "
            "server that keeps it: start one with `otcurate ui` (or `prefect server start`) "
            "and `export PREFECT_API_URL=http://127.0.0.1:4200/api`, then rerun."
        )
        raise typer.Exit(2)
    try:
        _validate_params(root)
    except ParamsError as exc:
        err.print(f"[red]error:[/] params.yaml: {exc}")
        raise typer.Exit(2) from None
    os.chdir(root)
    from otcurate_pipeline.flow import nightly

    console.print(
        f"serving deployment otcurate-nightly/{name} on {api}: cron {cron!r} ({timezone}), "
        f"lineage {lineage}{f' -> {branch}' if lineage == 'branch' else ''}. Ctrl-C stops."
    )
    from prefect.client.schemas.schedules import CronSchedule

    nightly.serve(
        name=name,
        schedules=[CronSchedule(cron=cron, timezone=timezone)],
        parameters={"root": str(root), "lineage": lineage, "branch": branch},
        print_starting_message=True,
    )


@app.command()
def ui(
    prefect_port: Annotated[
        int, typer.Option(help="Port of the Prefect server (API + UI).")
    ] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    host: Annotated[
        str, typer.Option(help="Address to bind; the default keeps both off the network.")
    ] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for both to answer.")] = 180.0,
) -> None:
    """Start the Prefect server and the MLflow UI on this project's store; Ctrl-C stops both."""
    import signal

    from otcurate_pipeline import services
    from otcurate_pipeline.tracking import tracking_uri

    root = find_root()
    logs = root / ".otcurate" / "logs"
    running = [
        services.start_prefect(host, prefect_port, logs / "prefect-server.log"),
        services.start_mlflow(host, mlflow_port, tracking_uri(root), logs / "mlflow-ui.log"),
    ]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops cleanly, too
    try:
        console.print(f"starting the Prefect server and the MLflow UI (logs in {logs}) ...")
        services.wait_ready(running, timeout)
        console.print(f"Prefect UI: {running[0].url}   (API {running[0].url}/api)")
        console.print(f"MLflow UI:  {running[1].url}   (store {tracking_uri(root)})")
        console.print(
            f"To run flows against this server: export PREFECT_API_URL={running[0].url}/api"
        )
        console.print("Ctrl-C stops both.", highlight=False)
        while all(s.proc.poll() is None for s in running):
            time.sleep(0.5)
        dead = next(s for s in running if s.proc.poll() is not None)
        err.print(
            f"[red]{dead.name} exited ({dead.proc.returncode}):[/]\n{services.tail(dead.log)}"
        )
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping ...")
    except RuntimeError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        services.stop(running)
    console.print("stopped.")


@app.command()
def score(
    source: Annotated[
        Path,
        typer.Argument(
            help="New pairs: a .csv/.parquet/.json(l)/.tar file, or a folder of them (or an imagefolder)."
        ),
    ],
    image_column: Annotated[
        str | None, typer.Option(help="Image column (default: params.yaml ingest.hf.image_column).")
    ] = None,
    caption_column: Annotated[
        str | None,
        typer.Option(help="Caption column (default: params.yaml ingest.hf.caption_column)."),
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="The model detect scored with (default: dvc.yaml's).")
    ] = None,
    detector: Annotated[
        Path | None, typer.Option(help="detect's output folder (default: dvc.yaml's).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: results/score/<source name>).")
    ] = None,
    top: Annotated[int, typer.Option(help="Suspected pairs to list.")] = 10,
) -> None:
    """Score new pairs with the fitted detector (no refit) and report the suspected noisy ones."""
    root = find_root()
    import numpy as np
    import torch

    from otcurate import detect as det
    from otcurate import models
    from otcurate.data.hf import SourceError, load_pairs, local_source
    from otcurate.io import atomic_dir, write_json, write_text
    from otcurate.runtime import make_reproducible, resolve_device

    params = load_all(parse_yaml((root / "params.yaml").read_text()) or {})
    hf = params["ingest"].hf
    wired = layout.stages(root)["detect"].paths
    model, detector = root / (model or wired["model"]), root / (detector or wired["out"])
    try:
        fitted = det.detector_from_state(*artifacts.read_detector(detector))
    except FileNotFoundError:
        err.print(
            f"[red]error:[/] no fitted detector at {detector / artifacts.DETECTOR}; run the "
            "pipeline first (otcurate run)."
        )
        raise typer.Exit(2) from None
    try:
        pairs, _, n = load_pairs(
            **local_source(source),
            image_column=image_column or hf.image_column,
            caption_column=caption_column or hf.caption_column,
        )
        rows = list(pairs)
    except SourceError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    good = [r for r in rows if r.reject is None]
    rejected = [r for r in rows if r.reject is not None]
    if len(good) < 2:
        err.print(
            f"[red]error:[/] {source}: {len(good)} usable pairs ({len(rejected)} rejected); need at least 2."
        )
        raise typer.Exit(2)
    device = resolve_device(params["base"].device)
    make_reproducible(params["base"].seed, params["base"].threads, device)
    clip = models.load(model, device=device)
    image, text = models.encode(
        clip, *models.pairs_to_tensors([r.image for r in good], [r.caption for r in good], clip)
    )
    with torch.no_grad():
        found = det.score_new(fitted, image, text)
    name = source.resolve().name.split(".")[0]
    out = root / (out or Path("results/score") / name)
    order = np.argsort(found.scores, kind="stable")
    import pyarrow as pa

    extra = {
        "index": pa.array([r.index for r in good], pa.int64()),
        "caption": pa.array([str(r.caption) for r in good], pa.string()),
    }
    summary = {
        "source": str(source),
        "method": fitted.method,
        "scorer": "infoot conditional projection"
        if fitted.fit is not None
        else "method's own rule",
        "cutoff": fitted.cutoff,
        "pairs": len(good),
        "rejected": len(rejected),
        "flagged": int(found.noisy.sum()),
        "flagged_fraction": float(found.noisy.mean()),
    }
    shown = Table(title=f"{summary['flagged']} of {len(good)} pairs suspected noisy")
    for col in ("index", "score", "caption"):
        shown.add_column(col, justify="right" if col != "caption" else "left")
    lines = ["| index | score | caption |", "|---:|---:|---|"]
    for i in order[: min(top, int(found.noisy.sum()))]:
        r = good[i]
        shown.add_row(str(r.index), f"{found.scores[i]:.4f}", str(r.caption)[:80])
        lines.append(f"| {r.index} | {found.scores[i]:.4f} | {str(r.caption)[:80]} |")
    with atomic_dir(out) as o:
        artifacts.write_scores(o, [r.uid for r in good], found.scores, found.noisy, extra)
        write_json(o / "summary.json", summary)
        write_text(
            o / "report.md",
            f"# Suspected noisy pairs in {source}\n\n"
            f"detect.method {fitted.method} ({summary['scorer']}), cutoff {fitted.cutoff:.4f}: "
            f"{summary['flagged']} of {len(good)} pairs flagged ({len(rejected)} unreadable)."
            "\n\n" + "\n".join(lines) + "\n",
        )
    console.print(shown)
    console.print(
        f"{fitted.method} ({summary['scorer']}), cutoff {fitted.cutoff:.4f}: "
        f"{summary['flagged']}/{len(good)} flagged, {len(rejected)} unreadable -> {out}"
    )


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
