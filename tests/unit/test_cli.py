import shutil
from pathlib import Path

import pytest

from otcurate_pipeline.params import ParamsError, apply_overrides, load, parse_yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_set_writes_typed_values_and_keeps_comments(project):
    changed = apply_overrides(
        project / "params.yaml",
        ["finetune.lr=5e-5", "coreset.fraction=null", "coreset.size=300", "ingest.noise.rate=0.5"],
    )
    assert len(changed) == 4
    text = (project / "params.yaml").read_text()
    assert "# One section per stage" in text and "# auto | cpu | cuda" in text
    raw = parse_yaml(text)
    assert load(raw, "finetune").lr == 5e-5
    assert load(raw, "coreset").size == 300 and load(raw, "coreset").fraction is None
    assert raw["ingest"]["noise"]["rate"] == 0.5


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("finetune.lrr=1", "unknown key. Did you mean 'lr'?"),
        ("finetune.lr=fast", "expected a number"),
        ("finetun.lr=1", "must start with a section"),
        ("finetune.lr", "expected section.key=value"),
        ("detect.threshold=0.1", "set exactly one of detect.fraction and detect.threshold"),
    ],
)
def test_bad_overrides_change_nothing(project, item, message):
    before = (project / "params.yaml").read_text()
    with pytest.raises(
        ParamsError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace(".", r"\.")
        .replace("?", r"\?"),
    ):
        apply_overrides(project / "params.yaml", [item])
    assert (project / "params.yaml").read_text() == before


def test_setting_the_same_value_rewrites_nothing(project):
    before = (project / "params.yaml").read_bytes()
    assert apply_overrides(project / "params.yaml", ["finetune.lr=0.0001"]) == []
    assert (project / "params.yaml").read_bytes() == before


def test_set_keeps_every_other_byte_and_nulls_stay_null(project):
    before = (project / "params.yaml").read_text().splitlines()
    assert any(line.split("#")[0].rstrip().endswith(": null") for line in before)
    apply_overrides(project / "params.yaml", ["finetune.lr=5e-5"])
    after = (project / "params.yaml").read_text().splitlines()
    assert len(after) == len(before)
    changed = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1 and "lr:" in changed[0][0] and "5e-05" in changed[0][1]


def test_yaml_syntax_error_names_file_line_and_column(project):
    from otcurate_pipeline.params import validate_file

    path = project / "params.yaml"
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  seed:"))
    lines[at] = "  seed: [0, 1"
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    for call in (lambda: validate_file(path), lambda: apply_overrides(path, ["finetune.lr=1"])):
        with pytest.raises(ParamsError, match=rf"{path} is not valid YAML at line \d+, column \d+"):
            call()
    assert path.read_bytes() == before


def test_run_refuses_while_another_holds_the_repo_and_changes_nothing(project):
    import os
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from otcurate_pipeline.cli import app
    from otcurate_pipeline.runlock import holder

    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    hold = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from otcurate_pipeline.runlock import run_lock\n"
            "with run_lock(Path(sys.argv[1]), 'otcurate run'):\n"
            "    print('held', flush=True); time.sleep(60)",
            str(project),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hold.stdout.readline().strip() == "held"
        before = (project / "params.yaml").read_bytes()
        t0 = time.perf_counter()
        cwd = os.getcwd()
        os.chdir(project)
        try:
            res = CliRunner().invoke(app, ["run", "--set", "finetune.lr=0.0005"])
        finally:
            os.chdir(cwd)
        assert res.exit_code == 3, res.output
        assert (
            f"pid {hold.pid} (otcurate run)" in res.output and "Nothing was changed" in res.output
        )
        assert time.perf_counter() - t0 < 10  # refused at once, before any work
        assert (project / "params.yaml").read_bytes() == before
        assert holder(project)["pid"] == hold.pid
    finally:
        hold.kill()
        hold.wait()
    # the kernel released the dead holder's lock: the next run takes it at once
    from otcurate_pipeline.runlock import run_lock

    with run_lock(project, "test"):
        assert holder(project)["pid"] == os.getpid()


def test_unknown_arch_and_missing_gpu_stop_before_any_work(project):
    from otcurate_pipeline.params import check_device

    before = (project / "params.yaml").read_bytes()
    with pytest.raises(
        ParamsError, match=r"pretrain.arch is 'ViT-NOPE', which is not an open_clip"
    ):
        apply_overrides(project / "params.yaml", ["pretrain.arch=ViT-NOPE"])
    assert (project / "params.yaml").read_bytes() == before
    apply_overrides(project / "params.yaml", ["pretrain.arch=ViT-B-32"])  # a real one passes
    import torch

    if torch.cuda.is_available():
        check_device("cuda")
    else:
        with pytest.raises(ParamsError, match="base.device is 'cuda' but no CUDA device"):
            check_device("cuda")
    check_device("auto")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty; give a file with one image-text pair per row"),
        (b"image,caption\n", "holds no rows for split 'train' (a file with a header only"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 50, "cannot read"),
        ("image,caption\na.png,caf\u00e9 cr\u00e8me\n".encode("latin-1"), "it is not UTF-8 text"),
    ],
    ids=["empty", "header-only", "garbage", "latin-1"],
)
def test_score_names_the_source_file_and_the_problem_before_any_work(project, content, message):
    from otcurate_pipeline.scoring import ScoreError, score_source

    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    source = project / "new.csv"
    source.write_bytes(content)
    with pytest.raises(ScoreError) as info:
        score_source(project, source)
    text = str(info.value)
    assert message in text and "Traceback" not in text
    assert "ingest.hf" not in text  # a score context names no ingest setting
    if message in ("cannot read", "it is not UTF-8 text"):
        assert str(source) in text
