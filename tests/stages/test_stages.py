"""Each stage on tiny data: its files and schema, byte-identical reruns, and clear
errors on bad input that leave the previous good output untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from otcurate_support import ROOT, STAGE_PATHS, TinyRun, write_params
from PIL import Image

from otcurate.data.records import SCHEMA
from otcurate_pipeline.artifacts import read_soft_labels


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_ingest_outputs(tiny):
    d = Path(tiny.p("data/ingest"))
    splits = {
        s: pq.read_table([f for f in sorted(d.glob(f"{s}-*.parquet"))][0])
        for s in ("train", "val", "test")
    }
    for s, t in splits.items():
        assert t.schema.equals(SCHEMA), s
    train = pq.ParquetDataset(sorted(d.glob("train-*.parquet"))).read()
    assert len(list(d.glob("train-*.parquet"))) >= 2  # shard_size 128 < train size: several shards
    uids = train["uid"].to_pylist()
    assert uids == sorted(uids)
    m = json.loads(Path(tiny.p("results/ingest/metrics.json")).read_text())
    assert m["pairs"] == 400 and m["train_pairs"] + m["val_pairs"] + m["test_pairs"] == 400
    assert m["train_pairs"] == train.num_rows
    # planted noise: train only, ground truth recorded exactly
    for s in ("val", "test"):
        t = pq.ParquetDataset(sorted(d.glob(f"{s}-*.parquet"))).read()
        assert not any(t["noisy"].to_pylist())
        assert t["caption_from"].to_pylist() == t["uid"].to_pylist()
    noisy = np.array(train["noisy"].to_pylist())
    assert abs(noisy.mean() - 0.3) < 0.05
    assert m["noise_rate_planted"] == pytest.approx(noisy.mean())
    json.loads((d / "classes.json").read_text())["class_names"]


def test_planted_noise_matches_the_clean_captions(tiny, tmp_path):
    """Re-ingest without noise: every noisy pair's caption is exactly the clean caption of caption_from."""
    params = write_params(tmp_path, {"ingest": {"noise": {"rate": 0.0}}})
    assert (
        tiny.run("ingest", params=params, out=str(tmp_path / "clean"), results=str(tmp_path / "r"))
        == 0
    )
    read = lambda f: pq.ParquetDataset(sorted(Path(f).glob("train-*.parquet"))).read().to_pylist()  # noqa: E731
    clean = {r["uid"]: r["caption"] for r in read(tmp_path / "clean")}
    noisy_rows = read(tiny.p("data/ingest"))
    assert [r["uid"] for r in noisy_rows] == sorted(clean)
    for r in noisy_rows:
        assert r["caption"] == clean[r["caption_from"]]
        assert r["noisy"] == (r["caption"] != clean[r["uid"]])
        if not r["noisy"]:
            assert r["caption_from"] == r["uid"] or clean[r["caption_from"]] == clean[r["uid"]]


def test_mixed_noise_records_its_kinds(tiny, tmp_path):
    """kind: mixed plants shuffled, near and generic captions; a generic caption comes from
    no pair (caption_from ""), the others name the pair whose clean caption they carry."""
    over = {"ingest": {"noise": {"rate": 0.45, "kind": "mixed"}}}
    params = write_params(tmp_path, over)
    out, res = tmp_path / "mixed", tmp_path / "r"
    assert tiny.run("ingest", params=params, out=str(out), results=str(res)) == 0
    (tmp_path / "c").mkdir()
    clean_params = write_params(tmp_path / "c", {"ingest": {"noise": {"rate": 0.0}}})
    clean_out = tmp_path / "clean"
    assert tiny.run("ingest", params=clean_params, out=str(clean_out), results=str(res) + "c") == 0
    read = lambda f: pq.ParquetDataset(sorted(Path(f).glob("train-*.parquet"))).read().to_pylist()  # noqa: E731
    clean = {r["uid"]: r["caption"] for r in read(clean_out)}
    rows = read(out)
    generic = [r for r in rows if r["noisy"] and r["caption_from"] == ""]
    moved = [r for r in rows if r["noisy"] and r["caption_from"] != ""]
    assert generic and moved
    for r in moved:
        assert r["caption"] == clean[r["caption_from"]] != clean[r["uid"]]
    m = json.loads((res / "metrics.json").read_text())
    assert m["noise_generic_planted"] == pytest.approx(len(generic) / len(rows))
    assert m["noise_shuffle_planted"] + m["noise_near_planted"] == pytest.approx(
        len(moved) / len(rows)
    )
    assert m["noise_rate_planted"] == pytest.approx(0.45, abs=0.03)


def test_ingest_of_the_glyphs_source(tiny, tmp_path):
    params = write_params(tmp_path, {"ingest": {"source": "glyphs", "size": 200}})
    out, res = tmp_path / "g", tmp_path / "r"
    assert tiny.run("ingest", params=params, out=str(out), results=str(res)) == 0
    train = pq.ParquetDataset(sorted(out.glob("train-*.parquet"))).read()
    assert train.num_rows > 100 and set(train["label"].to_pylist()) <= set(range(10))
    names = json.loads((out / "classes.json").read_text())["class_names"]
    assert names[7] == "seven"
    (tmp_path / "c").mkdir()
    bad = write_params(tmp_path / "c", {"ingest": {"source": "glyphs", "size": None}})
    assert tiny.run("ingest", params=bad, out=str(out), results=str(res)) == 2


def test_pretrain_checkpoint_opens_in_open_clip(tiny):
    folder = Path(tiny.p("models/pretrain"))
    assert {p.name for p in folder.iterdir()} == {"open_clip_config.json", "model.safetensors"}
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), saved[k].numpy())
    assert (Path(tiny.p("results/pretrain/plots/loss.tsv")).read_text().count("\n")) == 12 + 1


def test_embed_is_normalised_and_aligned(tiny):
    from otcurate.data.shards import read_embeddings, read_split

    for split in ("train", "val", "test"):
        uids, img, txt = read_embeddings(tiny.p("data/embed"), split)
        assert uids == read_split(tiny.p("data/ingest"), split, ["uid"])["uid"].to_pylist()
        np.testing.assert_allclose(img.norm(dim=1).numpy(), 1.0, atol=1e-5)
        np.testing.assert_allclose(txt.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_detect_coreset_distill_finetune_evaluate_outputs(tiny):
    scores = pq.read_table(tiny.p("data/detect/scores.parquet"))
    assert scores.column_names == ["uid", "score", "noisy"]
    assert sum(scores["noisy"].to_pylist()) == round(0.3 * scores.num_rows)
    dm = json.loads(Path(tiny.p("results/detect/metrics.json")).read_text())
    assert {"auroc", "precision", "recall", "f1", "est_noise_rate", "true_noise_rate"} <= set(dm)
    sub = pq.read_table(tiny.p("data/coreset/subset.parquet"))
    assert sub.column_names == ["uid", "weight", "score"]
    assert sub.num_rows == round(0.4 * scores.num_rows)
    flagged = {
        u for u, f in zip(scores["uid"].to_pylist(), scores["noisy"].to_pylist(), strict=True) if f
    }
    assert not flagged & set(sub["uid"].to_pylist())
    dist = pq.read_table(sorted(Path(tiny.p("data/distill")).glob("train-*.parquet"))[0])
    assert dist.schema.equals(SCHEMA)
    assert max(np.bincount(dist["label"].to_pylist())) <= 2
    ft = Path(tiny.p("models/finetune"))
    assert (ft / "model.safetensors").exists()
    assert (
        tree_digest(ft)["model.safetensors"]
        != tree_digest(Path(tiny.p("models/pretrain")))["model.safetensors"]
    )
    em = json.loads(Path(tiny.p("results/evaluate/metrics.json")).read_text())
    for k in ("base_zs_acc", "finetune_zs_acc", "base_i2t_r1", "finetune_t2i_r10", "detect_auroc"):
        assert 0.0 <= em[k] <= 1.0
    report = Path(tiny.p("results/evaluate/report.md")).read_text()
    assert "| zs_acc |" in report
    for png in ("comparison.png", "scores.png"):
        with Image.open(tiny.p(f"results/evaluate/plots/{png}")) as im:
            assert im.width > 100 and im.height > 100


@pytest.mark.parametrize("stage", list(STAGE_PATHS))
def test_rerun_is_byte_identical(tiny, stage, tmp_path):
    """Same inputs, seed and threads: the same bytes (so DVC never reruns downstream for nothing)."""
    paths = dict(STAGE_PATHS[stage])
    outs = {k: v for k, v in paths.items() if k in ("out", "results")}
    redirected = {**paths, **{k: str(tmp_path / k) for k in outs}}
    assert tiny.run(stage, **redirected) == 0
    for k, rel in outs.items():
        assert tree_digest(tmp_path / k) == tree_digest(Path(tiny.p(rel))), (
            f"{stage} {k} differs on rerun"
        )


def _bad_params(tmp_path, overrides):
    return write_params(tmp_path, overrides)


@pytest.mark.parametrize(
    ("stage", "overrides", "expected"),
    [
        (
            "pretrain",
            {"pretrain": {"stepz": 3}},
            "pretrain.stepz: unknown key. Did you mean 'steps'?",
        ),
        (
            "pretrain",
            {"pretrain": {"steps": "ten"}},
            "pretrain.steps: expected an integer, got 'ten'",
        ),
        (
            "detect",
            {"detect": {"fraction": 0.2, "threshold": 0.1}},
            "set exactly one of detect.fraction and detect.threshold",
        ),
        (
            "coreset",
            {"coreset": {"fraction": None, "size": 100000}},
            "the coreset budget is 100000 pairs but only",
        ),
        (
            "detect",
            {"detect": {"method": "magic"}},
            "detect.method: unknown method 'magic'. Known: clip_score, gmm_loss, infoot, ncu_batch, ot",
        ),
        ("ingest", {"ingest": {"source": "digits", "size": 5000}}, "exceeds the 1797 images"),
    ],
)
def test_bad_params_fail_clearly_and_keep_outputs(
    tiny, tmp_path, capsys, stage, overrides, expected
):
    paths = STAGE_PATHS[stage]
    before = {k: tree_digest(Path(tiny.p(v))) for k, v in paths.items() if k in ("out", "results")}
    code = tiny.run(stage, params=_bad_params(tmp_path, overrides), **paths)
    assert code == 2
    assert expected in capsys.readouterr().err
    after = {k: tree_digest(Path(tiny.p(v))) for k, v in paths.items() if k in ("out", "results")}
    assert after == before


def _imagefolder(root: Path, corrupt: bool = False, empty_caption: bool = False) -> Path:
    root.mkdir(parents=True)
    rows = ["file_name,caption,label"]
    for i in range(40):
        Image.new("RGB", (16, 16), (i * 5, 255 - i * 5, 100)).save(root / f"img{i:02d}.png")
        rows.append(f"img{i:02d}.png,a colour swatch number {i},{i % 2}")
    if corrupt:
        (root / "img07.png").write_bytes(b"\x89PNG not really an image")
    if empty_caption:
        rows[1 + 11] = "img11.png, ,1"
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize(
    ("corrupt", "empty", "reason"),
    [(True, False, "undecodable image"), (False, True, "empty caption")],
)
def test_bad_records_skip_or_fail(tmp_path, capsys, corrupt, empty, reason):

    run = TinyRun(tmp_path)
    folder = _imagefolder(tmp_path / "src", corrupt=corrupt, empty_caption=empty)
    hf = {
        "path": "imagefolder",
        "data_dir": str(folder),
        "label_column": "label",
        "class_names": ["even", "odd"],
    }
    skip = write_params(
        tmp_path,
        {
            "ingest": {
                "source": "hf",
                "size": None,
                "on_bad_record": "skip",
                "hf": hf,
                "val_fraction": 0.2,
                "test_fraction": 0.2,
            }
        },
    )
    assert run.run("ingest", params=skip, out="data/ingest", results="results/ingest") == 0
    rejects = [
        json.loads(line)
        for line in Path(run.p("data/ingest/rejects.jsonl")).read_text().splitlines()
    ]
    assert len(rejects) == 1 and reason in rejects[0]["reason"]
    m = json.loads(Path(run.p("results/ingest/metrics.json")).read_text())
    assert m["rejected"] == 1 and m["pairs"] == 39
    before = tree_digest(Path(run.p("data/ingest")))

    fail = tmp_path / "fail"
    fail.mkdir()
    y = yaml.safe_load(skip.read_text())
    y["ingest"]["on_bad_record"] = "fail"
    (fail / "params.yaml").write_text(yaml.safe_dump(y))
    assert (
        run.run("ingest", params=fail / "params.yaml", out="data/ingest", results="results/ingest")
        == 2
    )
    err = capsys.readouterr().err
    assert (
        f"bad record {rejects[0]['index']}" in err
        and reason in err
        and "on_bad_record: skip" in err
    )
    assert tree_digest(Path(run.p("data/ingest"))) == before


def test_missing_upstream_output_is_a_clear_error(tmp_path, capsys):

    run = TinyRun(tmp_path)
    assert run.run("embed", data="nowhere", model="models/pretrain", out="data/embed") == 2
    assert "run the upstream stages first" in capsys.readouterr().err
    assert not (tmp_path / "data" / "embed").exists()


def test_a_stage_process_exits_with_its_code_and_its_whole_output(tiny):
    """`python -m stages.<name>` ends without the interpreter's teardown (exit_process): the
    exit code and every line it wrote still arrive, success or failure."""
    ok = subprocess.run(
        [sys.executable, "-m", "stages.detect", *tiny.argv("detect", out="data/detect-again")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.rstrip().splitlines()[-1].startswith("detect (")  # its last line
    assert (Path(tiny.p("data/detect-again")) / "scores.parquet").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "stages.embed", *tiny.argv("embed", data="nowhere", out="x")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "run the upstream stages first" in bad.stderr


def test_outputs_that_disagree_name_the_stage_to_rerun(tiny, tmp_path, capsys):
    """coreset reads detect's scores through their owner (otcurate_pipeline.artifacts): scores
    of other pairs than the embeddings are refused, naming both folders and the fix."""
    from otcurate.io import atomic_dir
    from otcurate_pipeline import artifacts

    scores = artifacts.read_scores(tiny.p("data/detect"))
    with atomic_dir(tmp_path / "detect") as out:  # the same pairs, one of them missing
        artifacts.write_scores(out, scores.uids[1:], scores.score[1:], scores.noisy[1:])
    paths = {
        **STAGE_PATHS["coreset"],
        "detect": str(tmp_path / "detect"),
        "out": str(tmp_path / "cs"),
        "results": str(tmp_path / "r"),
    }
    assert tiny.run("coreset", **paths) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'detect'} does not match {tiny.p('data/embed')}" in err
    assert "rerun detect (dvc repro detect)" in err
    assert not (tmp_path / "cs").exists()


def test_labels_of_other_pairs_than_the_embeddings_are_refused(tiny):
    from otcurate_pipeline import artifacts
    from stages.coreset import _labels

    uids, _, _ = artifacts.read_embeddings(tiny.p("data/embed"), "val")
    assert len(_labels(tiny.p("data/ingest"), "val", uids)) == len(uids)
    with pytest.raises(artifacts.Mismatch) as exc:
        _labels(tiny.p("data/ingest"), "val", uids[::-1])
    assert str(exc.value) == (
        f"{tiny.p('data/ingest')} does not match the val embeddings (different uids); "
        "rerun embed (dvc repro embed)."
    )


def test_crashed_write_leaves_previous_output(tiny, tmp_path):
    """A stage killed while writing leaves only a temporary sibling, which the next write sweeps away."""
    out = tmp_path / "ingest"
    shutil.copytree(tiny.p("data/ingest"), out)
    before = tree_digest(out)
    stale = tmp_path / "ingest.tmp-deadbeef"
    stale.mkdir()
    (stale / "train-00000.parquet").write_bytes(b"half written")
    assert tree_digest(out) == before
    assert tiny.run("ingest", out=str(out), results=str(tmp_path / "r")) == 0
    assert not stale.exists()
    assert tree_digest(out) == before


@pytest.mark.parametrize(
    "method, extra",
    [("ot", {}), ("ot", {"trim": "mixture"}), ("ncu_batch", {}), ("gmm_loss", {}), ("infoot", {})],
)
def test_detect_methods_run_through_the_stage(tiny, tmp_path, method, extra):
    opts = {"passes": 2, "batch_size": 64, **extra}
    over = {"method": method, method: opts, "raise_fraction": False}
    params = write_params(tmp_path, {"detect": over})
    paths = {
        **STAGE_PATHS["detect"],
        "out": str(tmp_path / "out"),
        "results": str(tmp_path / "res"),
    }
    assert tiny.run("detect", params=params, **paths) == 0
    m = json.loads((tmp_path / "res" / "metrics.json").read_text())
    # quality is tested on planted embeddings (unit tests); a 12-step model barely separates pairs
    assert 0.0 <= m["auroc"] <= 1.0 and m["flagged"] == round(0.3 * m["pairs"])
    assert 0 < m["logit_scale"] <= 100  # the pretrained model's temperature
    # detect.ot.trim: how many pairs the cosine's mixture set aside (none if not bimodal)
    assert ("trimmed" in m) == bool(extra) and 0 <= m.get("trimmed", 0) < m["pairs"]
    meta = json.loads((tmp_path / "out" / "detector.json").read_text())
    assert meta["method"] == method and np.isfinite(meta["cutoff"])
    assert (tmp_path / "out" / "detector.safetensors").exists() == (method == "infoot")


@pytest.mark.parametrize(
    ("method", "source"),
    [
        ("ncu", "detect"),
        ("ncu", "batch"),
        ("filter", "detect"),
        ("filter", "rounds"),
        ("gradient_ascent", "detect"),
    ],
)
def test_finetune_methods_run_through_the_stage(tiny, tmp_path, method, source):
    """On a coreset that keeps the flagged pairs, so each method sees noisy rows ("rounds":
    filter rescoring them with the model being fine-tuned, by detect's own detector as
    data/detect saved it)."""
    ft = {"method": method, "steps": 5}
    if method == "ncu":
        ft["ncu"] = {"nc_source": source}
    if source == "rounds":
        ft["filter"] = {"rounds": 2, "rescore": "detect"}
    params = write_params(
        tmp_path, {"coreset": {"exclude_flagged": False, "fraction": 1.0}, "finetune": ft}
    )
    cs = {
        **STAGE_PATHS["coreset"],
        "out": str(tmp_path / "coreset"),
        "results": str(tmp_path / "cres"),
    }
    assert tiny.run("coreset", params=params, **cs) == 0
    ft = {
        **STAGE_PATHS["finetune"],
        "coreset": str(tmp_path / "coreset"),
        "out": str(tmp_path / "model"),
        "results": str(tmp_path / "res"),
    }
    assert tiny.run("finetune", params=params, **ft) == 0
    m = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert m["flagged_pairs"] == round(0.3 * m["coreset_pairs"]) > 0
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert len((tmp_path / "res" / "plots" / "loss.tsv").read_text().splitlines()) == 1 + 5
    # the second round's flags came from the rescoring
    assert ("filter_flags_changed_round_2" in m) == (source == "rounds")


@pytest.mark.parametrize("grouped", [True, False])
def test_goracs_through_the_stage(tiny, tmp_path, grouped):
    params = write_params(
        tmp_path,
        {
            "coreset": {
                "method": "goracs",
                "fraction": 0.2,
                "goracs": {"grouped": grouped, "groups": 3},
            }
        },
    )
    paths = {**STAGE_PATHS["coreset"], "out": str(tmp_path / "cs"), "results": str(tmp_path / "r")}
    assert tiny.run("coreset", params=params, **paths) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    sub = pq.read_table(tmp_path / "cs" / "subset.parquet")
    det = pq.read_table(tiny.p("data/detect/scores.parquet"))
    flagged = set(det.filter(det["noisy"])["uid"].to_pylist())
    assert sub.num_rows == m["size"] == round(0.2 * m["train_pairs"])
    assert not flagged & set(sub["uid"].to_pylist())  # exclude_flagged holds for goracs too
    assert m["objective_refined"] <= m["objective_greedy"]
    assert sum(m["size_per_group"].values()) == m["size"]
    assert (m["groups"] > 1) == grouped  # shapes has labels: one group per shape in val
    assert m["target_pairs"] > 0 and "seconds" not in m  # no wall time in tracked outputs


def test_kcenter_through_the_stage(tiny, tmp_path):
    params = write_params(tmp_path, {"coreset": {"method": "kcenter", "fraction": 0.2}})
    paths = {**STAGE_PATHS["coreset"], "out": str(tmp_path / "cs"), "results": str(tmp_path / "r")}
    assert tiny.run("coreset", params=params, **paths) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["size"] == round(0.2 * m["train_pairs"]) and m["radius"] > 0


def test_goracs_without_val_embeddings_says_so(tiny, tmp_path, capsys):
    """ingest refuses an empty val split; an embed folder without val shards gets the fix too."""
    import shutil

    shutil.copytree(tiny.p("data/embed"), tmp_path / "embed")
    for f in (tmp_path / "embed").glob("val-*"):
        f.unlink()
    params = write_params(tmp_path, {"coreset": {"method": "goracs"}})
    cs = {
        **STAGE_PATHS["coreset"],
        "embed": str(tmp_path / "embed"),
        "out": str(tmp_path / "cs"),
        "results": str(tmp_path / "rc"),
    }
    assert tiny.run("coreset", params=params, **cs) == 2
    assert "the val split is empty; raise ingest.val_fraction" in capsys.readouterr().err
    assert not (tmp_path / "cs").exists()


@pytest.mark.parametrize("labelled", [True, False])
def test_wmdd_through_the_stage_feeds_finetune(tiny, tmp_path, labelled):
    """Synthetic pairs in the ingest format; without classes.json, k-means clusters stand in."""
    import shutil

    from otcurate.data.records import SCHEMA, check_record
    from otcurate.data.shards import read_split

    params = write_params(
        tmp_path,
        {
            "distill": {
                "method": "wmdd",
                "ipc": 2,
                "clusters": 3,
                "wmdd": {"steps": 5, "stat_samples": 16},
                "relabel": {"views": 3},
            },
            "finetune": {"steps": 2},
        },
    )
    data = tiny.p("data/ingest")
    if not labelled:
        shutil.copytree(data, tmp_path / "ingest")
        (tmp_path / "ingest" / "classes.json").unlink()
        data = str(tmp_path / "ingest")
    paths = {
        **STAGE_PATHS["distill"],
        "data": data,
        "out": str(tmp_path / "d"),
        "results": str(tmp_path / "r"),
    }
    assert tiny.run("distill", params=params, **paths) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    syn = read_split(tmp_path / "d", "train")
    assert syn.schema.equals(SCHEMA)
    assert syn.num_rows == m["pairs"] == 2 * m["classes"] and m["classes"] == (7 if labelled else 3)
    assert all(u.startswith("wmdd-") for u in syn["uid"].to_pylist())
    assert all(
        check_record(b, c) is None
        for b, c in zip(syn["image"].to_pylist(), syn["caption"].to_pylist(), strict=True)
    )
    train_captions = set(read_split(data, "train", columns=["caption"])["caption"].to_pylist())
    if labelled:
        assert min(syn["label"].to_pylist()) >= 0
        assert not set(syn["caption"].to_pylist()) & train_captions  # from the class templates
    else:
        assert set(syn["label"].to_pylist()) == {-1}
        assert set(syn["caption"].to_pylist()) <= train_captions  # nearest real captions
    assert (tmp_path / "r" / "plots" / "synthetic.png").stat().st_size > 0
    assert len((tmp_path / "r" / "plots" / "loss.tsv").read_text().splitlines()) == 1 + 5
    assert 0.0 <= m["synthetic_zs_acc"] <= 1.0 and m["barycenter_w2"] >= 0
    # relabel: the base's soft labels, 3 views per image, over every class's prompts
    soft = read_soft_labels(tmp_path / "d", syn["uid"].to_pylist())
    assert (
        soft.logits.shape
        == (syn.num_rows, 3, m["classes"])
        == (*soft.views.shape[:2], 7 if labelled else 3)
    )
    assert len(soft.prompts) == m["classes"] and m["relabel_views"] == 3
    assert ("relabel_teacher_view_acc" in m) == labelled
    ft = {
        **STAGE_PATHS["finetune"],
        "data": data,
        "distill": str(tmp_path / "d"),
        "out": str(tmp_path / "model"),
        "results": str(tmp_path / "rf"),
    }
    assert tiny.run("finetune", params=params, **ft) == 0
    fm = json.loads((tmp_path / "rf" / "metrics.json").read_text())
    assert fm["distilled_pairs"] == m["pairs"] and fm["distilled_as"] == "soft_labels"
    assert fm["pairs"] == fm["coreset_pairs"]  # the set is learned through its soft labels only


def _distill_then_finetune(tiny, tmp_path, params) -> dict:
    """distill into tmp_path/d, then finetune on it into tmp_path/model; finetune's metrics."""
    paths = {**STAGE_PATHS["distill"], "out": str(tmp_path / "d"), "results": str(tmp_path / "r")}
    assert tiny.run("distill", params=params, **paths) == 0
    ft = {
        **STAGE_PATHS["finetune"],
        "distill": str(tmp_path / "d"),
        "out": str(tmp_path / "model"),
        "results": str(tmp_path / "rf"),
    }
    assert tiny.run("finetune", params=params, **ft) == 0
    return json.loads((tmp_path / "rf" / "metrics.json").read_text())


def test_distilled_set_without_relabel_is_hard_pairs(tiny, tmp_path):
    """distill.relabel.views 0: no soft labels written; finetune reads the set as pairs."""
    params = write_params(
        tmp_path, {"distill": {"ipc": 2, "relabel": {"views": 0}}, "finetune": {"steps": 2}}
    )
    fm = _distill_then_finetune(tiny, tmp_path, params)
    assert read_soft_labels(tmp_path / "d", None) is None
    assert (
        fm["distilled_as"] == "pairs" and fm["pairs"] == fm["coreset_pairs"] + fm["distilled_pairs"]
    )


def test_detect_auto_flagging_through_the_stage(tiny, tmp_path):
    params = write_params(tmp_path, {"detect": {"fraction": None, "auto": True}})
    paths = {
        **STAGE_PATHS["detect"],
        "out": str(tmp_path / "out"),
        "results": str(tmp_path / "res"),
    }
    assert tiny.run("detect", params=params, **paths) == 0
    m = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert 0 <= m["flagged"] < m["pairs"] and m["est_noise_rate"] == pytest.approx(
        m["flagged"] / m["pairs"]
    )


def test_detect_raise_fraction_flags_the_bimodal_estimate_when_higher(tiny, tmp_path):
    params = write_params(tmp_path, {"detect": {"fraction": 0.05, "raise_fraction": True}})
    paths = {**STAGE_PATHS["detect"], "out": str(tmp_path / "out"), "results": str(tmp_path / "r")}
    assert tiny.run("detect", params=params, **paths) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    share = max(0.05, m["mixture_noise_rate"]) if m["bimodal"] else 0.05
    assert m["flagged"] == round(share * m["pairs"])


def test_finetune_under_torchrun_matches_one_process(tiny, tmp_path):
    """finetune.nproc: 2 relaunches the stage under torchrun (gloo); the first process writes."""
    from safetensors.torch import load_file

    params = write_params(tmp_path, {"finetune": {"nproc": 2}})
    ft = {
        **STAGE_PATHS["finetune"],
        "out": str(tmp_path / "model"),
        "results": str(tmp_path / "res"),
    }
    assert tiny.run("finetune", params=params, **ft) == 0
    one = load_file(tiny.p("models/finetune/model.safetensors"))
    two = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert one.keys() == two.keys()
    assert max((one[k].float() - two[k].float()).abs().max().item() for k in one) < 1e-3
    m1 = json.loads(Path(tiny.p("results/finetune/metrics.json")).read_text())
    m2 = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m2["final_loss"] == pytest.approx(m1["final_loss"], rel=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "params.yaml", "res"]


def test_embed_on_a_local_dask_cluster_matches_in_process(tiny, tmp_path):
    """embed.dask: local:2 (two worker processes on 127.0.0.1): the same files, byte for byte."""
    params = write_params(tmp_path, {"embed": {"dask": "local:2"}})
    out = tmp_path / "embed"
    assert tiny.run("embed", params=params, **{**STAGE_PATHS["embed"], "out": str(out)}) == 0
    ref = tree_digest(Path(tiny.p("data/embed")))
    assert len(ref) >= 6 and tree_digest(out) == ref


def test_embed_rejects_a_bad_dask_address(tiny, tmp_path, capsys):
    params = write_params(tmp_path, {"embed": {"dask": "localhost"}})
    out = tmp_path / "embed"
    assert tiny.run("embed", params=params, **{**STAGE_PATHS["embed"], "out": str(out)}) == 2
    assert "tcp://127.0.0.1:8786" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("method", ["clip_score", "infoot"])
def test_score_command_flags_new_pairs_with_the_fitted_detector(
    tiny, tmp_path, monkeypatch, method
):
    """`otcurate score new.csv`: images + captions CSV (one image missing), scored by the
    detector detect saved; the report's flags are the library's on the same embeddings."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from otcurate import detect as det
    from otcurate import models
    from otcurate_pipeline.cli import app

    over = {"method": method} | (
        {method: {"passes": 1, "batch_size": 64}} if method != "clip_score" else {}
    )
    params = write_params(tmp_path, {"detect": over})
    shutil.copy(ROOT / "dvc.yaml", tmp_path)  # score's default paths are dvc.yaml's
    detect_out = tmp_path / "data" / "detect"
    paths = {**STAGE_PATHS["detect"], "out": str(detect_out), "results": str(tmp_path / "res")}
    assert tiny.run("detect", params=params, **paths) == 0
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "pretrain").symlink_to(tiny.p("models/pretrain"))
    test = pq.ParquetDataset(sorted(Path(tiny.p("data/ingest")).glob("test-*.parquet"))).read()
    new = tmp_path / "incoming"
    new.mkdir()
    captions = test["caption"].to_pylist()
    shuffled = captions[len(captions) // 2 :] + captions[: len(captions) // 2]  # half mismatched
    rows = ["file_name,text"]
    for i, (img, cap) in enumerate(zip(test["image"].to_pylist(), shuffled, strict=True)):
        (new / f"{i}.png").write_bytes(img)
        rows.append(f'{i}.png,"{cap}"')
    rows.append('missing.png,"a red circle"')
    (new / "pairs.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "score",
            str(new / "pairs.csv"),
            "--caption-column",
            "text",
            "--image-column",
            "file_name",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "results" / "score" / "pairs"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == test.num_rows and summary["rejected"] == 1
    assert summary["scorer"] == (
        "infoot conditional projection" if method == "infoot" else "method's own rule"
    )
    got = pq.read_table(out / "scores.parquet")
    assert got["index"].to_pylist() == list(range(test.num_rows))
    detect_schema = pq.read_schema(detect_out / "scores.parquet")
    assert pa.schema(list(got.schema)[:3]) == detect_schema  # detect's columns, then extras
    # the same detector on the same embeddings, computed here
    clip = models.load(tiny.p("models/pretrain"))
    img, txt = models.encode(
        clip, *models.pairs_to_tensors(test["image"].to_pylist(), shuffled, clip)
    )
    meta = json.loads((detect_out / "detector.json").read_text())
    st = detect_out / "detector.safetensors"
    ref = det.score_new(
        det.detector_from_state(meta, load_file(str(st)) if st.exists() else {}), img, txt
    )
    np.testing.assert_allclose(got["score"].to_numpy(), ref.scores, rtol=1e-5, atol=1e-7)
    assert got["noisy"].to_pylist() == ref.noisy.tolist()
    assert summary["flagged"] == int(ref.noisy.sum()) > 0
    assert (
        f"{summary['flagged']} of {test.num_rows} pairs flagged" in (out / "report.md").read_text()
    )


def test_score_command_without_a_fitted_detector_says_what_to_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from otcurate_pipeline.cli import app

    write_params(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "new.csv").write_text("image,caption\na.png,a red square\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["score", "new.csv"])
    assert result.exit_code == 2 and "run the pipeline first" in result.output


def test_embed_with_loader_workers_matches_in_process(tiny, tmp_path):
    """embed.workers: 2 decodes in two DataLoader processes: the same files, byte for byte."""
    # only the workers differ from the fixture: a different batch_size may change the float32
    # bytes on some CPUs (it is a param dep of embed for that reason)
    params = write_params(tmp_path, {"embed": {"workers": 2}})
    out = tmp_path / "embed"
    assert tiny.run("embed", params=params, **{**STAGE_PATHS["embed"], "out": str(out)}) == 0
    assert tree_digest(out) == tree_digest(Path(tiny.p("data/embed")))


def test_embed_bf16_autocast_is_close_to_fp32(tiny, tmp_path):
    from otcurate.data.shards import read_embeddings

    params = write_params(tmp_path, {"embed": {"precision": "bf16"}})
    out = tmp_path / "embed"
    assert tiny.run("embed", params=params, **{**STAGE_PATHS["embed"], "out": str(out)}) == 0
    u16, i16, t16 = read_embeddings(out, "train")
    u32, i32, t32 = read_embeddings(tiny.p("data/embed"), "train")
    assert u16 == u32 and i16.dtype == i32.dtype
    assert not np.array_equal(i16.numpy(), i32.numpy())  # bf16 did run
    cos = (i16 * i32).sum(1)
    assert cos.min() > 0.98, cos.min()
    np.testing.assert_allclose(i16.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_evaluate_sets_classification_and_multi_caption_retrieval(tiny, tmp_path):
    """evaluate.sets: a built-in classification set drawn with another seed, and a parquet
    retrieval set with two captions per image (a list column)."""
    from otcurate import evaluate as ev
    from otcurate import models

    test = pq.ParquetDataset(sorted(Path(tiny.p("data/ingest")).glob("test-*.parquet"))).read()
    images = test["image"].to_pylist()[:30]
    caps = [[c, f"a picture: {c}"] for c in test["caption"].to_pylist()[:30]]
    pq.write_table(pa_table({"img": images, "captions": caps}), tmp_path / "coco.parquet")
    sets = [
        {"name": "unseen", "task": "classification", "source": "shapes", "size": 60, "seed": 7},
        {
            "name": "coco",
            "task": "retrieval",
            "source": "hf",
            "size": None,
            "hf": {
                "path": "parquet",
                "data_files": [str(tmp_path / "coco.parquet")],
                "image_column": "img",
                "caption_column": "captions",
            },
        },
    ]
    params = write_params(tmp_path, {"evaluate": {"sets": sets}})
    paths = {**STAGE_PATHS["evaluate"], "results": str(tmp_path / "res")}
    assert tiny.run("evaluate", params=params, **paths) == 0
    m = json.loads((tmp_path / "res" / "metrics.json").read_text())
    for model in ("base", "finetune"):
        assert 0 <= m[f"{model}_unseen_zs_acc"] <= m[f"{model}_unseen_zs_acc_top5"] <= 1
        for k in ("i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10"):
            assert 0 <= m[f"{model}_coco_{k}"] <= 1
    # the same numbers from the library, computed here for the base model
    clip = models.load(tiny.p("models/pretrain"))
    img, _ = models.encode(clip, models.pairs_to_tensors(images, [""] * 30, clip)[0])
    txt = models.encode_texts(clip, [c for pair in caps for c in pair])
    want = ev.retrieval_recall_grouped(img, txt, torch.arange(30).repeat_interleave(2))
    assert m["base_coco_i2t_r5"] == pytest.approx(want["i2t_r5"])
    assert m["base_coco_t2i_r1"] == pytest.approx(want["t2i_r1"])
    report = (tmp_path / "res" / "report.md").read_text()
    assert "## coco (retrieval; 30 images, 60 captions)" in report
    from otcurate.data import builtin

    n_classes = len(builtin.shapes_classes().class_names)
    assert f"## unseen (classification; 60 images, {n_classes} classes)" in report


def pa_table(cols):
    import pyarrow as pa

    return pa.table(cols)


def test_coreset_target_from_a_named_clean_source(tiny, tmp_path):
    """A target holding only circles (same classes as ingest): goracs spends the whole budget
    on train pairs labelled circle."""
    import pyarrow as pa

    from otcurate.data import builtin

    recs = [r for r in builtin.shapes(7, 400) if r.label == 0][:40]
    pq.write_table(
        pa.table(
            {
                "image": [r.image for r in recs],
                "caption": [r.caption for r in recs],
                "label": [r.label for r in recs],
            }
        ),
        tmp_path / "circles.parquet",
    )
    target = {
        "source": "hf",
        "size": None,
        "hf": {
            "path": "parquet",
            "data_files": [str(tmp_path / "circles.parquet")],
            "label_column": "label",
            "class_names": builtin.shapes_classes().class_names,
        },
    }
    params = write_params(
        tmp_path, {"coreset": {"method": "goracs", "fraction": 0.05, "target": target}}
    )
    paths = {**STAGE_PATHS["coreset"], "out": str(tmp_path / "cs"), "results": str(tmp_path / "r")}
    assert tiny.run("coreset", params=params, **paths) == 0
    chosen = pq.read_table(tmp_path / "cs" / "subset.parquet")["uid"].to_pylist()
    train = pq.ParquetDataset(sorted(Path(tiny.p("data/ingest")).glob("train-*.parquet"))).read()
    label = dict(zip(train["uid"].to_pylist(), train["label"].to_pylist(), strict=True))
    assert chosen and {label[u] for u in chosen} == {0}


def test_wise_ft_chosen_on_val_feeds_evaluate_s_forgetting_report(tiny, tmp_path):
    """finetune.wise.choose: alpha picked on the val split, the mix written as the model and
    the weights as trained beside it; evaluate reports base, as trained and the mix on a
    clean classification set the fine-tuning data does not cover (glyphs)."""
    from safetensors.torch import load_file

    from otcurate import models, wise

    params = write_params(
        tmp_path,
        {
            "finetune": {"steps": 3, "wise": {"choose": True, "alphas": [0.0, 0.5, 1.0]}},
            "evaluate": {
                "sets": [
                    {"name": "glyphs", "task": "classification", "source": "glyphs", "size": 40}
                ]
            },
        },
    )
    ft = {
        **STAGE_PATHS["finetune"],
        "out": str(tmp_path / "model"),
        "results": str(tmp_path / "fr"),
    }
    assert tiny.run("finetune", params=params, **ft) == 0
    m = json.loads((tmp_path / "fr" / "metrics.json").read_text())
    scores = {a: m[f"wise_val_score_{a:g}"] for a in (0.0, 0.5, 1.0)}
    assert m["wise_alpha"] == max(scores, key=lambda a: (scores[a], -a))
    # the written model is the mix of the base and the weights as trained, at that alpha
    trained = load_file(str(tmp_path / "model" / models.UNMIXED_FILE))
    base = load_file(tiny.p("models/pretrain/model.safetensors"))
    mixed = load_file(str(tmp_path / "model" / "model.safetensors"))
    want = wise.interpolate(base, trained, m["wise_alpha"])
    for k in mixed:
        torch.testing.assert_close(mixed[k], want[k])

    ev = {
        **STAGE_PATHS["evaluate"],
        "finetuned": str(tmp_path / "model"),
        "results": str(tmp_path / "er"),
    }
    assert tiny.run("evaluate", params=params, **ev) == 0
    e = json.loads((tmp_path / "er" / "metrics.json").read_text())
    for model in ("base", "finetune", "unmixed"):
        assert 0 <= e[f"{model}_glyphs_zs_acc"] <= 1
    assert e["forgetting_unmixed_glyphs"] == pytest.approx(
        e["base_glyphs_zs_acc"] - e["unmixed_glyphs_zs_acc"]
    )
    report = (tmp_path / "er" / "report.md").read_text()
    assert "## Forgetting (zero-shot top-1 on the clean sets)" in report
    assert "| set | base | fine-tuned as trained | WiSE-FT | change |" in report


def test_export_clip_benchmark_writes_the_webdataset_layout_it_reads(tiny, tmp_path):
    """The layout of clip_benchmark.datasets.builder.build_wds_dataset: shards + nshards.txt
    under test/, dataset_type.txt, classnames.txt and "{c}" templates; the samples are the
    test split's images with their labels, and a retrieval image carries all its captions."""
    import shutil
    import tarfile

    from otcurate.data.shards import read_classes, read_split
    from otcurate_pipeline.export import export_clip_benchmark

    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "data" / "ingest").symlink_to(tiny.p("data/ingest"))
    sets = [{"name": "glyphs", "task": "classification", "source": "glyphs", "size": 30}]
    write_params(root, {"evaluate": {"sets": sets}})
    done = {e.name: e for e in export_clip_benchmark(root, root / "cb")}
    assert set(done) == {"test_zeroshot", "test_retrieval", "glyphs"}

    def samples(name):
        folder = root / "cb" / name
        assert (folder / "test" / "nshards.txt").read_text().strip() == "1"
        with tarfile.open(folder / "test" / "0.tar") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    test = read_split(tiny.p("data/ingest"), "test", columns=["image", "caption", "label"])
    info = read_classes(tiny.p("data/ingest"))
    zs = samples("test_zeroshot")
    labels = [int(zs[k]) for k in sorted(zs) if k.endswith(".cls")]
    assert labels == test["label"].to_pylist()
    assert [zs[k] for k in sorted(zs) if k.endswith(".png")] == test["image"].to_pylist()
    folder = root / "cb" / "test_zeroshot"
    assert (folder / "dataset_type.txt").read_text() == "classification\n"
    assert (folder / "classnames.txt").read_text().splitlines() == info.class_names
    templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == [t.replace("{}", "{c}") for t in info.templates]
    rt = samples("test_retrieval")
    texts = [rt[k].decode().splitlines() for k in sorted(rt) if k.endswith(".txt")]
    assert (
        sum(map(len, texts))
        == test.num_rows
        == done["test_retrieval"].images + sum(len(t) - 1 for t in texts)
    )
    assert (root / "cb" / "test_retrieval" / "dataset_type.txt").read_text() == "retrieval\n"
    assert done["glyphs"].images == 30 and len(samples("glyphs")) == 60


def test_check_distilled_keeps_the_better_on_val_and_says_so(tiny, tmp_path, capsys):
    """finetune.check_distilled: the same fine-tune without the distilled set; the model
    written is whichever scores higher on val, and the metrics carry both scores."""
    from otcurate import models

    params = write_params(
        tmp_path,
        {
            "distill": {"ipc": 2, "relabel": {"views": 2}},
            # a set weighted far above the pairs and a high lr: likely to hurt, either is fine
            "finetune": {
                "steps": 3,
                "lr": 0.01,
                "check_distilled": True,
                "soft_labels": {"weight": 50.0},
            },
        },
    )
    m = _distill_then_finetune(tiny, tmp_path, params)
    assert m["distilled_kept"] == (m["val_score_with_distilled"] >= m["val_score_coreset_alone"])
    err = capsys.readouterr().err
    assert ("lowered the val score" in err) == (not m["distilled_kept"])
    # The model written scores what the kept run scored on val.
    from otcurate.data.shards import read_classes, read_split
    from otcurate.evaluate import split_metrics

    val = read_split(tiny.p("data/ingest"), "val", columns=["image", "caption", "label"])
    got = split_metrics(
        models.load(tmp_path / "model"), val, read_classes(tiny.p("data/ingest")), [1], 512
    )
    kept = m["val_score_with_distilled"] if m["distilled_kept"] else m["val_score_coreset_alone"]
    assert got["zs_acc"] == pytest.approx(kept, abs=1e-6)
