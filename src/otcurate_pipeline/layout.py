"""The pipeline's layout as dvc.yaml writes it: the one place stage paths are written.

Each stage's `cmd` is `python -m stages.<name> --<arg> <path> ...`; `stages(root)` reads those
path arguments back, with the stage's deps, outs and params, so tests, benchmarks and the CLI
run a stage with exactly the paths DVC gives it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

DVC_YAML = "dvc.yaml"
# libyaml's C parser where PyYAML was built with it: dvc.lock holds every output file's md5,
# a run reads it after every stage, and the pure-Python parser took 0.2 s a read (1.6 s of a
# run's 8 stages here, #18)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str):
    """`yaml.safe_load`, by the C parser when there is one."""
    return yaml.load(text, Loader=_LOADER)


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    paths: dict[str, str]  # the entry point's path arguments, e.g. {"data": "data/ingest"}
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...]  # params.yaml sections or keys, as dvc.yaml lists them

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    def argv(self, root: str | Path | None = None, **paths: str) -> list[str]:
        """The entry point's path arguments, under `root` if given; `paths` override some."""
        argv = []
        for arg, rel in {**self.paths, **paths}.items():
            path = rel if root is None or Path(rel).is_absolute() else str(Path(root) / rel)
            argv += [f"--{arg}", path]
        return argv


def _paths(name: str, cmd: str) -> dict[str, str]:
    words = shlex.split(cmd)
    if words[:3] != ["python", "-m", f"stages.{name}"] or len(words) % 2 == 0:
        raise ValueError(
            f"dvc.yaml stage {name!r}: cmd must be 'python -m stages.{name} --<arg> <path> ...', "
            f"got {cmd!r}"
        )
    args, values = words[3::2], words[4::2]
    bad = [a for a in args if not a.startswith("--")]
    if bad:
        raise ValueError(f"dvc.yaml stage {name!r}: expected --<arg> <path> pairs, got {bad}")
    return {a[2:]: v for a, v in zip(args, values, strict=True)}


def _list(entries) -> tuple[str, ...]:
    """dvc.yaml's deps/outs/params lists: plain strings or one-key mappings ({path: opts})."""
    return tuple(e if isinstance(e, str) else next(iter(e)) for e in entries or [])


def stages(root: str | Path = ".") -> dict[str, Stage]:
    """Every stage of `root`/dvc.yaml, in the order written there."""
    spec = load_yaml((Path(root) / DVC_YAML).read_text()) or {}
    return {
        name: Stage(
            name=name,
            cmd=s["cmd"],
            paths=_paths(name, s["cmd"]),
            deps=_list(s.get("deps")),
            outs=_list(s.get("outs")),
            params=_list(s.get("params")),
        )
        for name, s in (spec.get("stages") or {}).items()
    }
