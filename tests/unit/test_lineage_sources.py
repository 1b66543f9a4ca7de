"""Lineage from MLflow-style stage records (matched by md5), run diffs, the Mermaid view, and
the source manifest that lets DVC see new files."""

from __future__ import annotations

import json

import pytest

from otcurate_pipeline import lineage as lin
from otcurate_pipeline import manifests


def run(run_id, stage, t, outs, deps=None, outcome="ran", parent="p1", params=None, metrics=None):
    return lin.StageRun(
        run_id=run_id,
        stage=stage,
        parent_run_id=parent,
        outcome=outcome,
        git_commit="c" * 40,
        git_dirty="false",
        start_time=t,
        outs=outs,
        deps=deps or {},
        params=params or {},
        metrics=metrics or {},
    )


def history():
    """Two pipeline runs: p1 ingests v1 and trains m1; p2 skips ingest, retrains with a new lr
    (m2); then p3 ingests v2 (new data) and trains m3; a failed run also claims m3's md5."""
    return [
        run("i1", "ingest", 1, {"data/ingest": "v1"}, {"data/sources.json": "s1"}),
        run(
            "f1",
            "finetune",
            2,
            {"models/finetune": "m1"},
            {"data/ingest": "v1", "stages/finetune.py": "c"},
            params={"finetune.lr": "1e-4"},
        ),
        run(
            "i2",
            "ingest",
            3,
            {"data/ingest": "v1"},
            {"data/sources.json": "s1"},
            outcome="skipped",
            parent="p2",
        ),
        run(
            "f2",
            "finetune",
            4,
            {"models/finetune": "m2"},
            {"data/ingest": "v1"},
            parent="p2",
            params={"finetune.lr": "3e-4"},
        ),
        run("i3", "ingest", 5, {"data/ingest": "v2"}, {"data/sources.json": "s2"}, parent="p3"),
        run("f3", "finetune", 6, {"models/finetune": "m3"}, {"data/ingest": "v2"}, parent="p3"),
        run("x", "ingest", 7, {"data/ingest": "v2"}, outcome="failed", parent="p4"),
    ]


def test_upstream_is_found_by_md5_preferring_the_run_that_produced_it():
    stages = history()
    chain = lin.chain_from_runs(stages, stages[3])  # f2: its data came from i1, not the skip i2
    assert chain["run_id"] == "f2" and [u["run_id"] for u in chain["upstream"]] == ["i1"]
    chain3 = lin.chain_from_runs(stages, stages[5])
    assert [u["run_id"] for u in chain3["upstream"]] == ["i3"]  # the failed run never counts
    assert chain3["upstream"][0]["deps"] == {"data/sources.json": "s2"}


def test_a_later_run_is_never_an_ancestor():
    stages = history()
    late = run("i9", "ingest", 99, {"data/ingest": "v1"})
    chain = lin.chain_from_runs([*stages, late], stages[1])
    assert [u["run_id"] for u in chain["upstream"]] == ["i1"]


def test_pipeline_chain_starts_from_its_sinks_and_mermaid_draws_every_edge():
    stages = history()
    p = lin.PipelineRun("p3", "nightly", "FINISHED", "c" * 40, 5)
    p.stages = {s.stage: s for s in stages if s.parent_run_id == "p3"}
    chain = lin.chain_of_pipeline(stages, p)
    assert [u["run_id"] for u in chain["upstream"]] == ["f3"]
    text = lin.mermaid(chain)
    assert text.startswith("flowchart LR")
    assert text.count("-->") == 2 and "finetune (ran)" in text and "models/finetune m3" in text


def test_diff_names_params_metrics_and_changed_inputs():
    stages = history()
    a = lin.PipelineRun("p1", None, "FINISHED", "a" * 40, 1)
    b = lin.PipelineRun("p3", None, "FINISHED", "b" * 40, 5)
    a.stages = {s.stage: s for s in stages if s.parent_run_id == "p1"}
    b.stages = {s.stage: s for s in stages if s.parent_run_id == "p3"}
    a.stages["finetune"].metrics = {"final_loss": 1.0, "stage_seconds": 3.0}
    b.stages["finetune"].metrics = {"final_loss": 0.5, "stage_seconds": 9.0}
    d = lin.diff_runs(a, b)
    assert d["params"] == {"finetune.lr": ["1e-4", None]}
    assert d["metrics"] == {"finetune.final_loss": [1.0, 0.5]}  # stage_seconds left out
    assert d["inputs_changed"]["ingest"] == {"data/sources.json": ["s1", "s2"]}
    assert d["inputs_changed"]["finetune"]["data/ingest"] == ["v1", "v2"]
    assert d["inputs_changed"]["finetune"]["stages/finetune.py"] == ["c", None]
    assert d["outcomes"] == {"finetune": ["ran", "ran"], "ingest": ["ran", "ran"]}
    same = lin.diff_runs(a, a)
    assert same["params"] == same["metrics"] == same["inputs_changed"] == {}


def _hf(folder="incoming"):
    return {"source": "hf", "hf": {"path": "imagefolder", "data_dir": folder}}


def test_manifest_sees_new_files_and_nothing_else(tmp_path):
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "a.png").write_bytes(b"one")
    first = manifests.sync(tmp_path, {"ingest": _hf()})
    text = (tmp_path / manifests.MANIFEST).read_text()
    assert first["changed"] and first["files"] == 1
    again = manifests.sync(tmp_path, {"ingest": _hf()})
    assert not again["changed"] and (tmp_path / manifests.MANIFEST).read_text() == text
    (tmp_path / "incoming" / "b.png").write_bytes(b"two")
    third = manifests.sync(tmp_path, {"ingest": _hf()})
    assert third["changed"] and third["added"] == ["incoming/b.png"]
    listed = json.loads((tmp_path / manifests.MANIFEST).read_text())["files"]
    assert [e["path"] for e in listed] == ["incoming/a.png", "incoming/b.png"]
    assert listed[1]["size"] == 3 and len(listed[1]["sha256"]) == 64


def test_manifest_refuses_a_rewritten_file_unless_allowed(tmp_path):
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "a.png").write_bytes(b"one")
    manifests.sync(tmp_path, {"ingest": _hf()})
    before = (tmp_path / manifests.MANIFEST).read_text()
    (tmp_path / "incoming" / "a.png").write_bytes(b"ONE!")
    with pytest.raises(
        manifests.SourceChanged, match="append-only.*incoming/a.png.*--allow-rewrite"
    ):
        manifests.sync(tmp_path, {"ingest": _hf()})
    assert (tmp_path / manifests.MANIFEST).read_text() == before  # nothing written on refusal
    assert manifests.sync(tmp_path, {"ingest": _hf()}, allow_rewrite=True)["rewritten"] == [
        "incoming/a.png"
    ]


def test_builtin_sources_have_a_static_manifest(tmp_path):
    assert manifests.build(tmp_path, {"source": "shapes", "size": 10}) == {"source": "shapes"}


def test_clean_sources_have_manifests_of_their_own_and_may_be_rewritten(tmp_path):
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "a.png").write_bytes(b"one")
    params = {
        "ingest": {"source": "shapes"},
        "coreset": {"target": {"source": "shapes", "size": 100}},
        "evaluate": {
            "sets": [
                {"name": "j", "source": "hf", "hf": {"path": "imagefolder", "data_dir": "judge"}}
            ]
        },
    }
    first = manifests.sync(tmp_path, params)
    assert first["clean_changed"] == ["coreset", "evaluate"] and first["changed"]
    ev = tmp_path / manifests.CLEAN_MANIFESTS["evaluate"]
    cs = tmp_path / manifests.CLEAN_MANIFESTS["coreset"]
    assert json.loads(cs.read_text()) == {"target": {"source": "shapes"}}
    [listed] = json.loads(ev.read_text())["sets"]
    assert listed["name"] == "j" and [e["path"] for e in listed["files"]] == ["judge/a.png"]
    assert manifests.sync(tmp_path, params)["clean_changed"] == []
    (tmp_path / "judge" / "a.png").write_bytes(b"ONE!")  # not append-only: no refusal
    again = manifests.sync(tmp_path, params)
    assert again["clean_changed"] == ["evaluate"] and not again["changed"]
    assert json.loads(ev.read_text())["sets"][0]["files"][0]["size"] == 4
    cache = json.loads((tmp_path / manifests.CACHE).read_text())
    assert [k.split("|")[0] for k in cache] == ["judge/a.png"]  # clean files' hashes kept
