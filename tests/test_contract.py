"""dvc.yaml holds the wiring, and holds it whole: stages = entry points = params sections; every
file a stage runs is one of its deps; every path its cmd names is a dep or an out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from otcurate_support import ROOT, WIRING

from otcurate.params import parse_yaml

ENTRY_POINTS = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("_"))


def module_file(module: str) -> Path | None:
    """The repo file that `import module` runs, or None outside the repo (or a namespace)."""
    for base in (ROOT / "src", ROOT):
        path = base.joinpath(*module.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def module_name(file: Path) -> str:
    rel = file.relative_to(ROOT / "src" if file.is_relative_to(ROOT / "src") else ROOT)
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(file: Path) -> set[str]:
    """Every module an import statement in `file` names, lazy ones inside functions too."""
    package = (
        module_name(file) if file.name == "__init__.py" else module_name(file).rpartition(".")[0]
    )
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def closure(start: Path) -> set[Path]:
    """The repo files that running `start` imports, transitively (packages' __init__ too)."""
    seen, todo = set(), [start]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        for name in imported(file):
            parts = name.split(".")
            for k in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                found = module_file(".".join(parts[:k]))
                if found is not None:
                    todo.append(found)
    return seen


def covered(file: Path, deps: tuple[str, ...]) -> bool:
    return any(file == ROOT / d or file.is_relative_to(ROOT / d) for d in deps)


def test_stages_entry_points_and_params_sections_are_one_list():
    sections = [s for s in parse_yaml((ROOT / "params.yaml").read_text()) if s != "base"]
    assert list(WIRING) == sections  # same names, same order
    assert sorted(WIRING) == ENTRY_POINTS


@pytest.mark.parametrize("stage", list(WIRING))
def test_every_file_a_stage_runs_is_a_dep(stage):
    s = WIRING[stage]
    entry = ROOT / "stages" / f"{stage}.py"
    assert covered(entry, s.deps)
    missing = sorted(str(f.relative_to(ROOT)) for f in closure(entry) if not covered(f, s.deps))
    assert not missing, (
        f"dvc.yaml stage {stage!r} runs these files but does not list them: {missing}"
    )


@pytest.mark.parametrize("stage", list(WIRING))
def test_every_path_a_cmd_names_is_a_dep_or_an_out(stage):
    s = WIRING[stage]
    assert set(s.paths.values()) <= set(s.deps) | set(s.outs)
    assert set(s.outs) <= set(s.paths.values())  # and every out is handed to the stage
    assert all(p == "base" or p.split(".")[0] == stage for p in s.params)


@pytest.mark.parametrize("stage", list(WIRING))
def test_code_deps_exist(stage):
    code = [d for d in WIRING[stage].deps if d.startswith(("src/", "stages/"))]
    assert [d for d in code if not (ROOT / d).exists()] == []
