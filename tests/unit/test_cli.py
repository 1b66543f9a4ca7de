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
