"""End to end in a scratch git + DVC copy of the repo, with tiny params:
run -> no-op rerun -> param change reruns downstream only -> a failing stage keeps
the last good outputs -> MLflow runs and tags -> lineage; and SIGKILL mid-stage
followed by a rerun gives byte-identical outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from otcurate_support import BIN, make_scratch, outs_md5, scratch_env, sh, start_stopped

from otcurate_pipeline import services, stageworker
from otcurate_pipeline.tracking import read_lock

STAGES = ["ingest", "pretrain", "embed", "detect", "coreset", "distill", "finetune", "evaluate"]
pytestmark = pytest.mark.e2e


def outcomes(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"│ (\w+)\s+│ (ran|skipped|restored)\s+│", stdout))


def test_first_run_runs_every_stage_and_prints_the_comparison(scratch):
    root, first, _ = scratch
    assert outcomes(first.stdout) == {s: "ran" for s in STAGES}
    assert "base vs fine-tuned" in first.stdout and "zs_acc" in first.stdout
    assert (root / "results" / "evaluate" / "report.md").exists()
    # on the run's own temporary Prefect server (no PREFECT_API_URL): up before the flow,
    # no UI link to it, and stopped only after Prefect's workers sent their logs and events
    log = first.stdout + first.stderr
    server = re.search(r"temporary API server on (http://127\.0\.0\.1:\d+)", log)
    assert server and "Beginning flow run" in log and "View at" not in log
    assert "Error logging to API" not in log and "connection attempts failed" not in log
    assert not services.reachable(f"{server[1]}/api/health")  # stopped with the run
    assert (root / ".otcurate" / "logs" / "prefect-temporary.log").exists()
    # and its own stage worker (no OTCURATE_STAGE_WORKER): ingest starts while it boots, the
    # stages after ingest fork from it; its lines go to its log, and it stops with the run
    worker = (root / stageworker.LOG).read_text()
    forked = set(re.findall(r"stage worker: stages\.(\w+) in .*, exit 0,", worker))
    assert set(STAGES[1:]) <= forked, worker
    assert "stage worker:" not in log
    served = re.findall(r"serving on (\S+) \(pid (\d+)\)", worker)
    assert len(served) == 1, worker  # one for the run: the flow took otcurate run's
    served = served[0]
    assert not Path(served[0]).exists() and not Path(served[0]).parent.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(int(served[1]), 0)


def test_second_run_is_a_no_op(scratch):
    root, _, md5 = scratch
    again = sh(root, str(BIN / "otcurate"), "run")
    assert outcomes(again.stdout) == {s: "skipped" for s in STAGES}
    # answered from `dvc status` in-process: no Prefect flow, no stage process (#18)
    assert "nothing changed, no stage ran" in again.stdout
    assert "match dvc.lock" in again.stdout  # each stage says why it was skipped
    db = sqlite3.connect(root / "mlflow.db")
    noop = db.execute(
        "select run_uuid from tags where key = 'otcurate.noop' and value = 'true'"
    ).fetchall()
    assert len(noop) >= 1
    kids = db.execute(
        "select count(*) from tags where key = 'mlflow.parentRunId' and value = ?", noop[-1]
    ).fetchone()[0]
    assert kids == len(STAGES)  # still one child run per stage, outcome skipped
    assert outs_md5(root) == md5
    assert "up to date" in sh(root, str(BIN / "otcurate"), "status").stdout
    assert "Data and pipelines are up to date" in sh(root, str(BIN / "dvc"), "repro").stdout


def test_param_change_reruns_only_downstream(scratch):
    root, _, md5 = scratch
    status = sh(root, str(BIN / "otcurate"), "status")
    # with a running Prefect server and no stage worker in the environment, as a user's
    # run after `otcurate ui`: DVC says 2 stages may run, so the run starts a stage worker
    changed = sh(
        root, str(BIN / "otcurate"), "run", "--set", "finetune.lr=3e-4", stage_worker=False
    )  # YAML 1.2 number, as DVC reads it
    assert outcomes(changed.stdout) == {
        **{s: "skipped" for s in STAGES[:6]},
        "finetune": "ran",
        "evaluate": "ran",
    }
    # the six upstream stages were answered by the run's `dvc status`: no `dvc repro` for them
    assert changed.stdout.count("didn't change (dvc status), skipping") == 6
    assert "[finetune] Running stage 'finetune'" in changed.stdout
    assert yaml.safe_load((root / "params.yaml").read_text())["finetune"]["lr"] == 0.0003
    new = outs_md5(root)
    assert all(
        new[p] == md5[p]
        for p in md5
        if not p.startswith(("models/finetune", "results/finetune", "results/evaluate"))
    )
    assert new["models/finetune"] != md5["models/finetune"]
    assert status.returncode == 0
    # nothing to wait for meanwhile: finetune starts at once (as its own process if the
    # worker is still booting), evaluate waits for the worker and forks from it
    worker = (root / stageworker.LOG).read_text()
    assert len(re.findall(r"serving on", worker)) == 1, worker
    assert re.search(r"stage worker: stages\.evaluate in .*, exit 0,", worker), worker


def _judges(folder: Path, shade: int = 0) -> None:
    """A clean retrieval set: an imagefolder of 8 swatches with one caption each."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    lines = ["file_name,caption"]
    for i in range(8):
        Image.new("RGB", (32, 32), ((i * 31 + shade) % 256, 40 * (i % 4), 200 - 20 * i)).save(
            folder / f"{i}.png"
        )
        lines.append(f"{i}.png,a swatch of colour {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")


def test_a_changed_clean_eval_set_reruns_only_evaluate(scratch):
    root, _, _ = scratch
    otc = str(BIN / "otcurate")
    _judges(root / "judges")
    spec = (
        "evaluate.sets=[{name: judges, task: retrieval, source: hf, size: null, "
        "hf: {path: imagefolder, data_dir: judges, caption_column: caption}}]"
    )
    first = sh(root, otc, "run", "--set", spec)
    assert outcomes(first.stdout) == {**{s: "skipped" for s in STAGES[:7]}, "evaluate": "ran"}
    listed = json.loads((root / "data" / "sources.evaluate.json").read_text())["sets"][0]
    assert listed["name"] == "judges" and len(listed["files"]) == 9  # 8 images + metadata.csv
    metrics = json.loads((root / "results" / "evaluate" / "metrics.json").read_text())
    assert "finetune_judges_i2t_r1" in metrics
    assert outcomes(sh(root, otc, "run").stdout) == {s: "skipped" for s in STAGES}

    _judges(root / "judges", shade=100)  # the benchmark's images corrected in place
    status = sh(root, otc, "status").stdout
    assert "evaluate's clean source changed since data/sources.evaluate.json" in status
    again = sh(root, otc, "run")
    assert outcomes(again.stdout) == {**{s: "skipped" for s in STAGES[:7]}, "evaluate": "ran"}
    relisted = json.loads((root / "data" / "sources.evaluate.json").read_text())["sets"][0]
    assert relisted["files"] != listed["files"]
    stages_lock = read_lock(root)
    assert any(d["path"] == "data/sources.evaluate.json" for d in stages_lock["evaluate"]["deps"])

    back = sh(root, otc, "run", "--set", "evaluate.sets=[]")
    # the same deps as the first run's evaluate: DVC's run-cache brings its outputs back
    assert outcomes(back.stdout) == {**{s: "skipped" for s in STAGES[:7]}, "evaluate": "restored"}
    assert json.loads((root / "data" / "sources.evaluate.json").read_text()) == {"sets": []}


def test_failing_stage_keeps_last_good_outputs_and_lineage(scratch):
    root, _, _ = scratch
    before_lock = (root / "dvc.lock").read_text()
    before = outs_md5(root)
    bad = sh(
        root,
        str(BIN / "otcurate"),
        "run",
        "--set",
        "coreset.fraction=null",
        "--set",
        "coreset.size=100000",
        check=False,
    )
    assert bad.returncode == 1
    assert "the coreset budget is 100000 pairs but only" in bad.stdout + bad.stderr
    assert "stage 'coreset' failed" in bad.stderr
    assert (root / "dvc.lock").read_text() == before_lock
    # outputs back in place, identical to the locked ones
    st = sh(root, str(BIN / "dvc"), "status", "coreset", "--json", check=False)
    data = json.loads(st.stdout or "{}")
    assert all("changed outs" not in str(v) for v in data.values()), data
    assert (root / "data" / "coreset" / "subset.parquet").exists()
    sh(
        root,
        str(BIN / "otcurate"),
        "run",
        "--set",
        "coreset.size=null",
        "--set",
        "coreset.fraction=0.4",
    )
    assert outs_md5(root) == before


def test_cli_rejects_bad_params_before_any_work(scratch):
    root, _, _ = scratch
    text = (root / "params.yaml").read_text()
    bad = sh(root, str(BIN / "otcurate"), "run", "--set", "finetune.lrr=1", check=False)
    assert bad.returncode == 2 and "finetune.lrr: unknown key. Did you mean 'lr'?" in bad.stderr
    assert (root / "params.yaml").read_text() == text


def test_mlflow_records_parent_and_child_runs_with_lineage_tags(scratch):
    root, _, _ = scratch
    db = sqlite3.connect(root / "mlflow.db")
    tags = {}
    for run_uuid, key, value in db.execute("select run_uuid, key, value from tags"):
        tags.setdefault(run_uuid, {})[key] = value
    parents = [r for r, t in tags.items() if t.get("otcurate.kind") == "pipeline"]
    children = {r: t for r, t in tags.items() if "dvc.stage" in t}
    assert len(parents) >= 4
    first = min(
        parents,
        key=lambda r: db.execute("select start_time from runs where run_uuid=?", (r,)).fetchone()[
            0
        ],
    )
    kids = [t for t in children.values() if t.get("mlflow.parentRunId") == first]
    assert sorted(t["dvc.stage"] for t in kids) == sorted(STAGES)
    for t in kids:
        assert t["dvc.outcome"] == "ran"
        assert re.fullmatch(r"[0-9a-f]{40}", t["git.commit"]) and t["git.dirty"] in (
            "true",
            "false",
        )
        assert any(k.startswith("dvc.out.") for k in t)
    ft = next(t for t in kids if t["dvc.stage"] == "finetune")
    assert "dvc.dep.data/coreset" in ft and ft["dvc.out.models/finetune"].endswith(".dir")
    params = dict(
        db.execute(
            "select key, value from params where run_uuid=(select run_uuid from tags where key='dvc.stage' and value='finetune' limit 1)"
        ).fetchall()
    )
    assert "finetune.lr" in params and "base.seed" in params
    metric_keys = {k for (k,) in db.execute("select distinct key from metrics")}
    assert {"base_zs_acc", "finetune_zs_acc", "stage_seconds", "loss", "final_loss"} <= metric_keys
    versions = db.execute(
        "select count(*) from model_versions where name='otcurate-clip'"
    ).fetchone()[0]
    ran_finetune = sum(
        1 for t in children.values() if t["dvc.stage"] == "finetune" and t["dvc.outcome"] == "ran"
    )
    assert versions == ran_finetune >= 2  # logged once per model produced, never for skipped runs


def test_lineage_reaches_the_ingest_source(scratch):
    root, _, _ = scratch
    out = sh(root, str(BIN / "otcurate"), "lineage", "models/finetune").stdout
    assert (
        out.count("ingest: python -m stages.ingest") == 1
    )  # each stage once, however many paths lead to it
    for needle in ("finetune", "pretrain", "ingest", "ingest.source=shapes", "mlflow run", "md5"):
        assert needle in out, needle
    chain = json.loads(
        sh(root, str(BIN / "otcurate"), "lineage", "models/finetune", "--json").stdout
    )
    seen, stack = set(), [chain]
    while stack:
        node = stack.pop()
        seen.add(node["stage"])
        stack.extend(node["upstream"])
    assert seen == set(STAGES) - {"evaluate"}
    assert chain["outs"]["models/finetune"] == read_lock(root)["finetune"]["outs"][0]["md5"]
    assert chain["mlflow_runs"], "the model's MLflow run is found by its md5"
    missing = sh(root, str(BIN / "otcurate"), "lineage", "models/nothing", check=False)
    assert missing.returncode == 2 and "is not an output of any stage" in missing.stderr


def _pipeline_runs(root: Path) -> list[str]:
    db = sqlite3.connect(root / "mlflow.db")
    return [
        r
        for (r,) in db.execute(
            "select r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key = 'otcurate.kind' and t.value = 'pipeline' order by r.start_time"
        )
    ]


def test_lineage_of_a_run_id_and_a_model_version_walks_the_mlflow_history(scratch):
    root, _, _ = scratch
    otc = str(BIN / "otcurate")
    first = _pipeline_runs(root)[0]
    chain = json.loads(sh(root, otc, "lineage", first, "--json").stdout)
    assert chain["stage"] == "pipeline" and chain["run_id"] == first
    stages = {}
    stack = [chain]
    while stack:
        node = stack.pop()
        stages[node["stage"]] = node
        stack.extend(node["upstream"])
    assert set(stages) == {"pipeline", *STAGES}  # evaluate is the sink, ingest the source
    assert all(stages[s]["parent_run_id"] == first for s in STAGES)  # all made by that run
    # version 1 of the registered model is the first run's model, even though dvc.lock moved on
    v1 = json.loads(sh(root, otc, "lineage", "otcurate-clip/1", "--json").stdout)
    assert v1["stage"] == "finetune" and v1["run_id"] == stages["finetune"]["run_id"]
    assert v1["outs"]["models/finetune"] != read_lock(root)["finetune"]["outs"][0]["md5"]
    locked_lr = read_lock(root)["finetune"]["params"]["params.yaml"]["finetune"]["lr"]
    assert v1["params"]["finetune.lr"] != json.dumps(locked_lr)  # v1 had the first lr
    graph = sh(root, otc, "lineage", "models/finetune", "--mermaid").stdout
    assert graph.startswith("flowchart LR") and graph.count("-->") >= 6
    human = sh(root, otc, "lineage", "otcurate-clip/1").stdout
    assert "mlflow run" in human and "ingest.source=shapes" in human
    bad = sh(root, otc, "lineage", "0" * 32, check=False)
    assert bad.returncode == 2 and "no otcurate run has it" in bad.stderr


def test_diff_shows_the_param_change_and_the_stages_it_reached(scratch):
    root, _, _ = scratch
    otc = str(BIN / "otcurate")
    runs = _pipeline_runs(root)
    d = json.loads(sh(root, otc, "diff", runs[0], runs[2], "--json").stdout)  # first vs lr change
    assert d["params"]["finetune.lr"][1] == "0.0003"
    assert set(d["inputs_changed"]) == {"evaluate"}  # finetune's own inputs did not change
    assert "models/finetune" in d["inputs_changed"]["evaluate"]
    assert any(k.startswith("finetune.") for k in d["metrics"])
    assert d["outcomes"]["finetune"] == ["ran", "ran"] and d["outcomes"]["ingest"] == [
        "ran",
        "skipped",
    ]
    table = sh(root, otc, "diff", runs[0][:8], runs[2][:8]).stdout
    assert "finetune.lr" in table and "stages whose inputs changed" in table
    noop = json.loads(sh(root, otc, "diff", runs[0], runs[1], "--json").stdout)
    assert noop["params"] == {} and noop["inputs_changed"] == {}
    assert sh(root, otc, "diff", "nope", check=False).returncode == 2


def test_outputs_travel_through_a_dvc_remote(scratch, tmp_path):
    """`dvc push` to a remote (a local directory here, S3/MinIO in production), then a fresh
    clone pulls byte-identical outputs and has nothing to rerun."""
    root, _, _ = scratch
    dvc = str(BIN / "dvc")
    remote = tmp_path / "remote"
    sh(root, dvc, "remote", "add", "--local", "-f", "store", str(remote))
    sh(root, dvc, "push", "-r", "store")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    sh(root, *git, "add", "-f", "dvc.lock", "params.yaml")
    sh(root, *git, "commit", "-qm", "lock", "--allow-empty")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    sh(clone, dvc, "remote", "add", "--local", "-f", "store", str(remote))
    sh(clone, dvc, "pull", "-r", "store")
    assert outs_md5(clone) == outs_md5(root)
    for rel in ("models/finetune/model.safetensors", "results/evaluate/metrics.json"):
        assert (clone / rel).read_bytes() == (root / rel).read_bytes()
    assert json.loads(sh(clone, dvc, "status", "--json").stdout or "{}") == {}


KILLS = [  # (stage, crash point, the stage's outputs already in place when it is killed)
    ("ingest", "staging:chunk:2", set()),  # resumable shards: 2 of 4 chunks staged
    ("pretrain", "pretrain:step:3", set()),  # a training stage, mid-training
    ("pretrain", "commit:models/pretrain", set()),  # the model written whole, not yet renamed
    ("detect", "committed:data/detect", {"data/detect"}),  # several outputs: one of two in place
]


def check_out_upstream(root: Path, shared: Path, stages: list[str], reference: dict) -> bool:
    """Lock `stages` in the fresh repo `root` with the shared scratch's dvc.lock entries and
    check their outputs out of a copy of its cache, as a user's `dvc pull` would, so that
    only the stage under test runs. Only where those entries still name the reference
    outputs (the first run's); otherwise nothing is done and `dvc repro` runs them."""
    theirs = read_lock(shared)
    if not stages or any(s not in theirs for s in stages):
        return False
    entries = {s: theirs[s] for s in stages}
    if any(o["md5"] != reference.get(o["path"]) for e in entries.values() for o in e["outs"]):
        return False
    # The files only, not the run cache (cache/runs): from it dvc would restore the stage
    # under test without running it.
    cache = Path(".dvc", "cache", "files")
    shutil.copytree(shared / cache, root / cache, dirs_exist_ok=True)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": entries}))
    sh(root, str(BIN / "dvc"), "checkout", *stages)
    return True


@pytest.mark.parametrize(("stage", "point", "in_place"), KILLS, ids=[k[1] for k in KILLS])
def test_sigkill_mid_stage_then_rerun_is_byte_identical(scratch, tmp_path, stage, point, in_place):
    """`dvc repro` killed (SIGKILL, whole process group) while a stage stands at a named crash
    point (otcurate.faults), then run again: the stage is not locked, its outputs are whole or
    absent, and the rerun gives the reference bytes and leaves no temporaries. The stages
    before it come checked out from the shared first run (the suite trains them once)."""
    shared, _, reference = scratch
    root = make_scratch(tmp_path / "repo")
    before = STAGES[: STAGES.index(stage)]
    if check_out_upstream(root, shared, before, reference):
        assert set(read_lock(root)) == set(before)
        assert all((root / p).exists() for p in outs_md5(root))
    argv = [str(BIN / "dvc"), "repro", stage]
    proc, stopped = start_stopped(argv, root, scratch_env(tmp_path), point, tmp_path / "stop.pid")
    try:
        assert os.getpgid(stopped) == proc.pid  # the stage itself, in dvc's process group
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    upstream = STAGES[: STAGES.index(stage) + 1]
    locked = read_lock(root) if (root / "dvc.lock").exists() else {}
    assert stage not in locked  # it never completed
    assert set(locked) == set(upstream[:-1])  # the stages before it did, and stay locked
    outs = [p for p in reference if p.startswith(("data/", "models/", "results/"))]
    mine = {p for p in outs if p.split("/")[1] == stage}
    assert {p for p in mine if (root / p).exists()} == in_place  # whole or absent, never partial
    again = sh(root, str(BIN / "dvc"), "repro", stage)
    if point.startswith("staging:"):  # ingest kept its finished chunks and read on after them
        assert "resuming after 256 source records (2 finished shards" in again.stderr
    got = outs_md5(root)
    assert got == {p: reference[p] for p in got}
    assert set(read_lock(root)) == set(upstream)
    assert not list(root.glob("**/*.tmp-*")) and not list(root.glob("data/*.partial"))
