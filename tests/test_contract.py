"""dvc.yaml holds the layout, and holds it whole: stages = entry points = params sections; every
file a stage runs is one of its deps; every path its cmd names is a dep or an out."""

from __future__ import annotations

from pathlib import Path

import pytest
from otcurate_support import LAYOUT, ROOT, closure

from otcurate_pipeline.params import parse_yaml

ENTRY_POINTS = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("_"))


def covered(file: Path, deps: tuple[str, ...]) -> bool:
    return any(file == ROOT / d or file.is_relative_to(ROOT / d) for d in deps)


def test_stages_entry_points_and_params_sections_are_one_list():
    sections = [s for s in parse_yaml((ROOT / "params.yaml").read_text()) if s != "base"]
    assert list(LAYOUT) == sections  # same names, same order
    assert sorted(LAYOUT) == ENTRY_POINTS


@pytest.mark.parametrize("stage", list(LAYOUT))
def test_every_file_a_stage_runs_is_a_dep(stage):
    s = LAYOUT[stage]
    entry = ROOT / "stages" / f"{stage}.py"
    assert covered(entry, s.deps)
    missing = sorted(str(f.relative_to(ROOT)) for f in closure(entry) if not covered(f, s.deps))
    assert not missing, (
        f"dvc.yaml stage {stage!r} runs these files but does not list them: {missing}"
    )


@pytest.mark.parametrize("stage", list(LAYOUT))
def test_every_code_file_a_stage_lists_is_one_it_runs(stage):
    """No stale code deps: a listed .py file the stage no longer imports would rerun it for
    nothing (folders, such as src/otcurate/data, are listed whole on purpose)."""
    s = LAYOUT[stage]
    runs = closure(ROOT / "stages" / f"{stage}.py")
    listed = [d for d in s.deps if d.startswith(("src/", "stages/")) and d.endswith(".py")]
    assert [d for d in listed if ROOT / d not in runs] == []


@pytest.mark.parametrize("stage", list(LAYOUT))
def test_every_path_a_cmd_names_is_a_dep_or_an_out(stage):
    s = LAYOUT[stage]
    assert set(s.paths.values()) <= set(s.deps) | set(s.outs)
    assert set(s.outs) <= set(s.paths.values())  # and every out is handed to the stage
    assert all(p == "base" or p.split(".")[0] == stage for p in s.params)


@pytest.mark.parametrize("stage", list(LAYOUT))
def test_code_deps_exist(stage):
    code = [d for d in LAYOUT[stage].deps if d.startswith(("src/", "stages/"))]
    assert [d for d in code if not (ROOT / d).exists()] == []


def test_the_source_manifests_are_the_deps_dvc_yaml_lists():
    from otcurate_pipeline import manifests

    assert LAYOUT["ingest"].paths["sources"] == str(manifests.MANIFEST)
    for stage, rel in manifests.CLEAN_MANIFESTS.items():
        assert str(rel) in LAYOUT[stage].deps, stage
