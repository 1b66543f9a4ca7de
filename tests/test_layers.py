"""The layers, read from the imports: the library (`otcurate`: arrays in, records out) never
imports the application (`otcurate_pipeline`: dvc.yaml, params.yaml, MLflow, Prefect, git), the
stage entry points or the flows, nor the services the application talks to; and neither
package has an import circle (lazy imports inside functions count too)."""

from __future__ import annotations

import networkx as nx
import pytest
from otcurate_support import ROOT, closure, imported, module_file, module_name

LIBRARY, APPLICATION = ROOT / "src" / "otcurate", ROOT / "src" / "otcurate_pipeline"
# what only the application may import: itself, the entry points, and the pipeline's services
APP_ONLY = ("otcurate_pipeline", "stages", "flows", "mlflow", "prefect", "dvc", "typer")


def files(package):
    return sorted(package.rglob("*.py"))


def test_the_library_never_imports_the_application():
    bad = {
        module_name(f): sorted(n for n in imported(f) if n.split(".")[0] in APP_ONLY)
        for f in files(LIBRARY)
    }
    assert {m: names for m, names in bad.items() if names} == {}


def graph(package) -> nx.DiGraph:
    g = nx.DiGraph()
    for f in files(package):
        g.add_node(module_name(f))
        for name in imported(f):
            target = module_file(name)
            if target and target.is_relative_to(package) and target != f:
                if target.name != "__init__.py":  # a package's __init__ is no module of its own
                    g.add_edge(module_name(f), module_name(target))
    return g


@pytest.mark.parametrize("package", [LIBRARY, APPLICATION], ids=["otcurate", "otcurate_pipeline"])
def test_no_import_circles(package):
    assert list(nx.simple_cycles(graph(package))) == []


def test_the_walk_sees_imports():  # the graph is not empty by accident
    g = graph(LIBRARY)
    assert g.has_edge("otcurate.train", "otcurate.optim")
    assert g.has_edge("otcurate.optim", "otcurate.models")
    assert g.has_edge("otcurate.io", "otcurate.faults")


def test_every_registered_method_is_imported_by_the_module_that_runs_it():
    """A registry names its functions as strings (otcurate.options stays torch-free); the
    module that dispatches on it imports each one, so a stage's dvc.yaml deps (the static
    import closure, tests/test_contract.py) cover the code its methods run."""
    from otcurate import options

    dispatchers = {
        "otcurate.detect": options.DETECT_METHODS,  # the package: score/detect and the scorers
        "otcurate.coreset": options.CORESET_METHODS,
        "otcurate.distill": options.DISTILL_METHODS,
        "otcurate.finetuning": options.FINETUNE_METHODS,
    }
    for dispatcher, registry in dispatchers.items():
        reach = closure(module_file(dispatcher))
        for name, method in registry.items():
            module = method.target.partition(":")[0]
            assert module_file(module) in reach, (dispatcher, name, method.target)
            assert callable(method.fn), name
            assert method.fn.__module__ == module, name


def test_no_scorer_or_selector_swallows_unknown_keywords():
    """Options come as one record per method; a misspelt option cannot vanish into **_."""
    import inspect

    from otcurate import coreset, detect, distill

    for registry in (detect.METHODS, coreset.METHODS, distill.METHODS):
        for name, method in registry.items():
            kinds = {p.kind for p in inspect.signature(method.fn).parameters.values()}
            assert inspect.Parameter.VAR_KEYWORD not in kinds, name


def test_nothing_imports_through_sys_path_and_bench_uses_no_private_names():
    """Every package is importable as installed (src/) or from the repo root (stages, flows,
    bench: `python -m`); the benchmarks use the library's and the runner's public names."""
    import re
    import subprocess

    listed = subprocess.run(  # the project's files, not what git ignores (bench/work's venvs)
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    dirs = ("src", "stages", "flows", "tests", "bench")
    code = [ROOT / f for f in listed if f.split("/")[0] in dirs and (ROOT / f).is_file()]
    hack = re.compile(r"sys\.path\.(?:insert|append)\(")
    assert [str(f.relative_to(ROOT)) for f in code if hack.search(f.read_text())] == []
    private = re.compile(r"\b(?:cs|det|dist|ev|ncu|models|stages\.\w+)\._[a-z]\w*")
    imported = re.compile(r"^\s*from (?:otcurate|stages)\S* import [^\n]*\b_[a-z]\w*", re.M)
    for f in (ROOT / "bench").glob("*.py"):
        assert private.findall(f.read_text()) == [], f.name
        assert imported.findall(f.read_text()) == [], f.name


def test_checking_params_and_starting_a_stage_import_no_torch():
    """params.yaml is checked, and every stage module imported, without torch, open_clip or
    POT: they load when the stage's work needs them (#18: a stage starts in under 2 s)."""
    import subprocess
    import sys

    code = (
        "import sys, importlib; from pathlib import Path\n"
        "from otcurate_pipeline.params import validate_file\n"
        "validate_file(Path('params.yaml'))\n"
        "for s in ('ingest', 'pretrain', 'embed', 'detect', 'coreset', 'distill', 'finetune', "
        "'evaluate'): importlib.import_module('stages.' + s)\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'ot', 'sklearn') if m in sys.modules)\n"
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
