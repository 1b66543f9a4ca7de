"""The `otcurate` command: run the pipeline, see what would rerun, trace lineage, compare runs,
serve the UIs, schedule nightly runs, score new pairs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

# No phoning home (there may be no network; it also raced sqlite on a first start).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The serverless (ephemeral) Prefect API migrates a fresh sqlite database on its first start;
# on 2 busy cores that took longer than Prefect's default 20 s wait, so wait longer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
from rich.console import Console
from rich.table import Table

from otcurate_pipeline import layout, stageworker
from otcurate_pipeline.params import (
    PARAMS_FILE,
    ParamsError,
    apply_overrides,
    check_device,
    validate_file,
)

if TYPE_CHECKING:
    from otcurate_pipeline.uptodate import State

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
    wait: Annotated[
        bool,
        typer.Option("--wait", help="If another run holds this repository, wait for it."),
    ] = False,
) -> None:
    """Run the pipeline (a Prefect flow over the DVC stages); only what changed reruns.

    One run at a time per repository: a second one refuses at once, naming the first
    (or, with --wait, waits for it) and changes nothing."""
    import signal

    from otcurate_pipeline.runlock import RunLocked, run_lock

    # `kill`, a CI cancel or `timeout` stop the run as Ctrl-C does: the cleanup runs (the
    # temporary Prefect server stopped, the lock released)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = find_root()
    try:
        with run_lock(
            root,
            "otcurate run",
            wait=wait,
            on_wait=lambda busy: err.print(f"waiting: {busy.args[0].split('. ')[0]} ..."),
        ):
            _run_locked(root, set_, name, allow_rewrite)
    except RunLocked as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(3) from None
    global _ENDED_RUN
    _ENDED_RUN = True


def _bad_params(exc: ParamsError) -> NoReturn:
    err.print(f"[red]error:[/] params.yaml: {exc}")
    raise typer.Exit(2) from None


def _flow_run(
    root: Path, name: str | None, allow_rewrite: bool, state: State | None, server
) -> list[dict]:
    """The Prefect flow over the stages (``state``: DVC's, or None when it could not be
    asked), on ``server`` (services.temporary_prefect's, booting since before this import)
    or PREFECT_API_URL's; a failed stage exits 1 saying what was kept."""
    from otcurate_pipeline import services
    from otcurate_pipeline.flow import StageFailed, pipeline

    if server is not None:
        try:
            timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        except ValueError:
            timeout = 180.0
        try:
            services.wait_ready([server], timeout)
        except RuntimeError as exc:
            err.print(
                f"[red]error:[/] the run's temporary Prefect server did not start: {exc}\n"
                "Point the run at a running server instead: `otcurate ui` starts one, then "
                "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and rerun."
            )
            raise typer.Exit(1) from None
    plan = {"order": state.order, "untouched": state.untouched()} if state else {}
    try:
        return pipeline(
            str(root), run_name=name, allow_rewrite=allow_rewrite, prepared=True, **plan
        )
    except StageFailed as exc:
        done = exc.recovery.message if exc.recovery else "its outputs were not checked."
        err.print(f"\n[red]stage '{exc.stage}' failed[/] (exit {exc.code}).\n{exc.tail}")
        err.print(f"[{'green' if exc.recovery and exc.recovery.restored else 'yellow'}]{done}[/]")
        raise typer.Exit(1) from None


def _run_locked(root: Path, set_: list[str] | None, name: str | None, allow_rewrite: bool) -> None:
    changed = []
    try:
        if set_:
            changed = apply_overrides(root / PARAMS_FILE, set_)
            if changed:
                console.print(f"params.yaml updated: {', '.join(changed)}")
        params = validate_file(root / PARAMS_FILE)
    except ParamsError as exc:
        _bad_params(exc)
    from otcurate_pipeline.manifests import SourceChanged
    from otcurate_pipeline.services import temporary_prefect
    from otcurate_pipeline.uptodate import WHY_SKIPPED, noop_run

    log = root / ".otcurate" / "logs" / "prefect-temporary.log"
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            # Without PREFECT_API_URL the run starts its own server; it boots while the run
            # goes on: from here when a no-op is unlikely (--set changed a param, or nothing
            # ran yet; if it is one, the server stops unused), else once DVC finds work.
            first = not (root / "dvc.lock").exists()
            early = bool(changed) or first
            api = stack.enter_context(temporary_prefect(log)) if early else None
            # the run's stage worker (stageworker.for_run) boots beside the server: now for
            # a first run (every stage), else once DVC says how many stages may run
            if first:
                every = len(layout.stages(root))
                stack.enter_context(stageworker.for_run(every, root, overlaps=api is not None))
            # nothing changed: no flow; else the recorder tracks the flow run
            results, state = noop_run(root, name, allow_rewrite, stack)
            noop = results is not None
            if not noop:
                if not early:
                    api = stack.enter_context(temporary_prefect(log))
                if not first:  # (DVC could not answer: any may run)
                    may_run = (
                        len(state.order) - len(state.untouched())
                        if state
                        else len(layout.stages(root))
                    )
                    booting = api is not None
                    stack.enter_context(stageworker.for_run(may_run, root, overlaps=booting))
                if api is not None:
                    console.print(
                        f"Prefect: this run's temporary API server on {api.url} (log {log}; "
                        "set PREFECT_API_URL to use a running server)",
                        highlight=False,
                    )
                try:
                    check_device(params["base"].device)  # (imports torch for cuda: only now)
                except ParamsError as exc:
                    _bad_params(exc)
                results = _flow_run(root, name, allow_rewrite, state, api)
    except SourceChanged as exc:
        err.print(f"[red]error:[/] ingest source: {exc}")
        raise typer.Exit(2) from None
    title = f"pipeline run ({time.perf_counter() - t0:.1f} s)"
    table = Table(title=title + (": nothing changed, no stage ran" if noop else ""))
    table.add_column("stage")
    table.add_column("outcome")
    table.add_column("seconds", justify="right")
    table.add_column("why")
    style = {"ran": "green", "restored": "cyan", "skipped": "dim"}
    why = {
        "skipped": WHY_SKIPPED,
        "restored": "its outputs for these inputs were in DVC's run-cache",
    }
    for r in results:
        table.add_row(
            r["stage"],
            f"[{style.get(r['outcome'], '')}]{r['outcome']}[/]",
            f"{r['seconds']:.1f}",
            why.get(r["outcome"], ""),
        )
    console.print(table)
    evaluated = root / layout.stages(root)["evaluate"].paths["results"]
    if (evaluated / "report.md").exists():
        sets = [s.name for s in params["evaluate"].sets]
        _print_comparison(evaluated, sets)


HEADLINE = ("zs_acc", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10")


def _comparison_table(m: dict, title: str, prefix: str = "") -> Table | None:
    keys = [k for k in HEADLINE if f"base_{prefix}{k}" in m]
    if not keys:
        return None
    mixed = f"unmixed_{prefix}{keys[0]}" in m  # WiSE-FT: the weights as trained, too
    console.print(f"[bold]{title}[/]")  # above the table: a title inside it wraps
    t = Table()
    cols = ("metric", "base", *(["as trained"] if mixed else []), "fine-tuned", "change")
    for c in cols:
        t.add_column(c, justify="left" if c == "metric" else "right")
    for k in keys:
        b, f = m[f"base_{prefix}{k}"], m[f"finetune_{prefix}{k}"]
        raw = [f"{m[f'unmixed_{prefix}{k}']:.4f}"] if mixed else []
        change = f"[{'green' if f >= b else 'red'}]{f - b:+.4f}[/]"
        t.add_row(k, f"{b:.4f}", *raw, f"{f:.4f}", change)
    return t


def _print_comparison(evaluated: Path, set_names: list[str] | None = None) -> None:
    """The closing tables: the clean evaluate.sets first, then the test split, labelled
    clean only when ingest knows it is (a built-in source)."""
    m = json.loads((evaluated / "metrics.json").read_text())
    for name in set_names or []:
        t = _comparison_table(m, f"base vs fine-tuned: {name} (clean, evaluate.sets)", f"{name}_")
        if t is not None:
            console.print(t)
    clean = m.get("test_split_clean") == 1.0  # ingest knows the source is clean
    title = "test split (clean)" if clean else "held-out test split (may contain noise)"
    t = _comparison_table(m, f"base vs fine-tuned: {title}")
    if t is not None:
        console.print(t)
    if not clean and not set_names:
        console.print(
            "[yellow]Nothing clean judged this model:[/] the test split comes from the same "
            "noisy data. Add a clean set under evaluate.sets (README: Bring your own data, 2)."
        )
    if any(k.startswith("unmixed_") for k in m):
        console.print("fine-tuned = WiSE-FT mix of base and the model as trained")
    det = {k[len("detect_") :]: v for k, v in m.items() if k.startswith("detect_")}
    if det:
        console.print("detection: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(det.items())))
    console.print(f"report: {evaluated / 'report.md'}")


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
    from otcurate_pipeline.manifests import pending_news

    pending = pending_news(root)
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
    from otcurate_pipeline import lineage as lin

    root = find_root()
    try:
        chain = lin.resolve(root, target, *lin.read_store(root, warn=err.print))
    except lin.LineageError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        console.print_json(json.dumps(chain))
        return
    if as_mermaid:
        print(lin.mermaid(chain), end="")
        return
    from otcurate_pipeline.tracking import git_state

    commit, dirty = git_state(root)
    now = f"(now: git {commit[:10]}{' dirty' if dirty else ''})"
    console.print(lin.render_tree(chain, f"[bold]{target}[/]  {now}"))


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
    from otcurate_pipeline import lineage as lin

    pipelines, _ = lin.read_store(find_root(), warn=err.print)
    try:
        a, b = lin.pipeline_run(pipelines, run_a), lin.pipeline_run(pipelines, run_b)
    except lin.LineageError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    d = lin.diff_runs(a, b)
    if as_json:
        console.print_json(json.dumps(d))
        return
    for tag, r in (("A", a), ("B", b)):
        state = "" if r.status == "FINISHED" else f", [yellow]{r.status}[/]"
        console.print(
            f"{tag} {r.run_id} ({r.name}, {lin.when(r.start_time)}, git {str(r.git_commit)[:10]}{state})"
        )
    skipped = [p for p in pipelines if p.status not in lin.COMPLETE]
    if skipped and (run_a.startswith("-") or run_b.startswith("-")):
        console.print(f"(not counted for -1/-2: {len(skipped)} run(s) killed or still running)")
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
        validate_file(root / PARAMS_FILE)
    except ParamsError as exc:
        _bad_params(exc)
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
    # and Ctrl-C even where SIGINT came ignored (a shell's background job without job control)
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
    from otcurate_pipeline.scoring import ScoreError, score_source

    try:
        report = score_source(
            find_root(),
            source,
            image_column=image_column,
            caption_column=caption_column,
            model=model,
            detector=detector,
            out=out,
            top=top,
        )
    except ScoreError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    s = report.summary
    shown = Table(title=f"{s['flagged']} of {s['pairs']} pairs suspected noisy")
    for col in ("index", "score", "caption"):
        shown.add_column(col, justify="right" if col != "caption" else "left")
    for index, value, caption in report.suspected:
        shown.add_row(str(index), f"{value:.4f}", caption)
    console.print(shown)
    console.print(report.line())


@app.command("export-clip-benchmark")
def export_clip_benchmark(
    out: Annotated[Path, typer.Argument(help="Folder to write the datasets into.")] = Path(
        "results/clip_benchmark"
    ),
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only", help="Export only these (test_zeroshot, test_retrieval, a set's name)."
        ),
    ] = None,
) -> None:
    """Write the test split and each evaluate.sets entry in CLIP_benchmark's webdataset
    layout, and print the clip_benchmark command that scores the fine-tuned model on each."""
    from otcurate.data.hf import SourceError
    from otcurate_pipeline.export import clip_benchmark_command
    from otcurate_pipeline.export import export_clip_benchmark as export

    root = find_root()
    try:
        done = export(root, (root / out) if not out.is_absolute() else out, only or ())
    except (ParamsError, SourceError, OSError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    model = layout.stages(root)["evaluate"].paths["finetuned"]
    for e in done:
        (e.folder.parent / "results").mkdir(exist_ok=True)  # clip_benchmark's --output folder
        console.print(f"{e.name}: {e.images} images, {e.task} -> {e.folder}")
    console.print("\nScore the fine-tuned model with clip_benchmark (pip install clip_benchmark):")
    for e in done:
        print(clip_benchmark_command(e, model, e.folder.parent / "results"))


_ENDED_RUN = False  # set by `run` when it finished: main() may end the process at once


def main() -> None:  # pragma: no cover
    """The console script. After a finished `otcurate run` (everything recorded, the lock
    released), the process ends without the interpreter's teardown of Prefect, MLflow and
    DVC (1.7 s after a flow here), once Prefect's workers have sent what they hold."""
    try:
        app()
    except SystemExit as exc:
        if not _ENDED_RUN:
            raise
        import logging

        from otcurate_pipeline.services import drain_prefect

        with contextlib.suppress(Exception):  # the run is done: its exit code stands
            drain_prefect()
            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # e.g. `otcurate run | head`
                stream.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
