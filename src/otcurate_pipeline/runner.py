"""Run stage entry points in-process in a folder laid out like dvc.yaml: what the tests and the
benchmarks use to drive the real stages without DVC.

Each stage gets the paths dvc.yaml gives it, under the workspace's root; a call may rename
some of them (a benchmark's variants: `out="data/detect-ot"`). Params are a whole params.yaml
mapping, written into the workspace; a call may override some keys, written to a file of
their own. Stages are imported as `stages.<name>`, so run from the repository root (as
`python -m bench.quality`) or with it on the path (pytest's `pythonpath`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from otcurate_pipeline import layout


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, argv: list[str]):
        self.stage, self.code = stage, code
        super().__init__(f"stage {stage} exited {code} (argv: {' '.join(argv)})")


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, mapping by mapping (neither is changed)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = (
            merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
        )
    return out


class Workspace:
    def __init__(self, root: str | Path, params: Mapping[str, Any], repo: str | Path = "."):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stages = layout.stages(repo)
        self.params = dict(params)
        self.params_file = self.write_params()

    def p(self, rel: str | Path) -> str:
        """A path of the workspace (absolute paths are kept)."""
        return str(self.root / rel)

    def write_params(self, over: Mapping[str, Any] | None = None) -> Path:
        """params.yaml, or with `over` merged in a params-<hash>.yaml beside it."""
        params = merge(self.params, over or {})
        name = "params.yaml"
        if over:
            digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
            name = f"params-{digest}.yaml"
        path = self.root / name
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    def argv(self, stage: str, params: Path | None = None, **paths: str) -> list[str]:
        """`--params <file>` and the stage's dvc.yaml paths under root, `paths` renaming some."""
        return [
            "--params",
            str(params or self.params_file),
            *self.stages[stage].argv(self.root, **paths),
        ]

    def run(
        self,
        stage: str,
        over: Mapping[str, Any] | None = None,
        *,
        params: Path | None = None,
        **paths: str,
    ) -> int:
        """`stages.<stage>.main(...)`'s exit code; `over` overrides params, or `params` names
        a params file."""
        return self._main(stage, self.argv(stage, self._params(over, params), **paths))

    def check(self, stage: str, over: Mapping[str, Any] | None = None, **paths: str) -> float:
        """`run`, raising StageFailed unless the stage exits 0; returns its seconds."""
        t0 = time.perf_counter()
        argv = self.argv(stage, self._params(over, None), **paths)
        code = self._main(stage, argv)
        if code != 0:
            raise StageFailed(stage, code, argv)
        return time.perf_counter() - t0

    def _params(self, over: Mapping[str, Any] | None, params: Path | None) -> Path | None:
        return self.write_params(over) if over else params

    def _main(self, stage: str, argv: list[str]) -> int:
        return importlib.import_module(self.stages[stage].module).main(argv)

    def metrics(self, rel: str) -> dict[str, Any]:
        """A results folder's metrics.json."""
        return json.loads((self.root / rel / "metrics.json").read_text())
