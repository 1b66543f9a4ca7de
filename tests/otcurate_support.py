"""Test support shared by the test packages: tiny params,
and `TinyRun`, which runs stage mains in a folder laid out like dvc.yaml.

A plain module, not a conftest: `from conftest import ...` resolves to whichever conftest.py
pytest imported last (tests/unit has its own), so helpers must live under a unique name."""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from otcurate_pipeline import layout
from otcurate_pipeline.runner import Workspace, merge
from otcurate_pipeline.stageworker import ENV as STAGE_WORKER
from otcurate_pipeline.tracking import read_lock

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: otcurate, dvc, prefect
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

TINY = {
    "base": {"seed": 0, "device": "cpu", "threads": 2},
    "ingest": {
        "source": "shapes",
        "size": 400,
        "val_fraction": 0.15,
        "test_fraction": 0.15,
        "shard_size": 128,
        "noise": {"rate": 0.3},
    },
    "pretrain": {"steps": 12, "batch_size": 32, "warmup": 2},
    "embed": {"batch_size": 64},
    "detect": {"fraction": 0.3},
    "coreset": {"fraction": 0.4},
    "distill": {"ipc": 2},
    "finetune": {"steps": 4, "batch_size": 32, "warmup": 1},
    "evaluate": {"batch_size": 64},
}


def tiny_params(overrides: dict | None = None) -> dict:
    """The repo's params.yaml, then TINY, then `overrides`."""
    from otcurate_pipeline.params import parse_yaml

    return merge(merge(parse_yaml((ROOT / "params.yaml").read_text()), TINY), overrides or {})


def write_params(folder: Path, overrides: dict | None = None) -> Path:
    """`folder`/params.yaml holding `tiny_params(overrides)`."""
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(overrides), sort_keys=False))
    return path


class TinyRun(Workspace):
    """The pipeline's runner (otcurate_pipeline.runner) on TINY params, in `root`."""

    def __init__(self, root: Path):
        super().__init__(root, tiny_params(), repo=ROOT)


LAYOUT = layout.stages(ROOT)  # dvc.yaml's stages, their paths, deps and outs
STAGE_PATHS = {name: dict(stage.paths) for name, stage in LAYOUT.items()}


class SharedPrefect:
    """One `prefect server start` for the session's flow runs (tests/pipeline/conftest.py
    starts it): each `otcurate run` against it skips the temporary server a run without
    PREFECT_API_URL starts for itself (7-13 s here). `scratch_env` points runs at it once
    it answers; the first `otcurate run` of the suite (the `scratch` fixture) keeps the
    temporary-server path covered."""

    service = None  # otcurate_pipeline.services.Service, while started

    @classmethod
    def start(cls, tmp: Path) -> None:
        from otcurate_pipeline import services

        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        cls.service = services.start_prefect(
            "127.0.0.1",
            services.free_port(),
            tmp / "prefect-server.log",
            env | {"PREFECT_HOME": str(tmp)},
        )

    @classmethod
    def api_url(cls) -> str | None:
        """The server's API address, waiting until it answers; None when none was started."""
        if cls.service is None:
            return None
        from otcurate_pipeline import services

        services.wait_ready([cls.service], timeout=300)
        return f"{cls.service.url}/api"

    @classmethod
    def stop(cls) -> None:
        from otcurate_pipeline import services

        if cls.service is not None:
            services.stop([cls.service])
            cls.service = None


class SharedStageWorker:
    """One stage worker for the session's pipeline runs (otcurate_pipeline.stageworker):
    their stage processes fork from a process that imported torch and open_clip once,
    instead of paying 6-9 s of imports each (#18), or booting a worker of each run's own.
    `scratch_env` hands it to every run but the suite's first `otcurate run` (the `scratch`
    fixture), which starts its own worker as a user's run does; the process-group kills
    (`start_stopped`) run their stages as plain processes (OTCURATE_STAGE_WORKER=0)."""

    proc: subprocess.Popen | None = None
    path: Path | None = None

    @classmethod
    def start(cls, tmp: Path) -> None:
        cls.path = tmp / "stages.sock"
        with open(tmp / "stage-worker.log", "ab") as log:  # the worker keeps its own copy
            cls.proc = subprocess.Popen(
                [str(BIN / "python"), "-m", "otcurate_pipeline.stageworker", str(cls.path)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @classmethod
    def socket(cls) -> str | None:
        """The worker's socket, once it listens; None when none was started."""
        if cls.proc is None or cls.path is None:
            return None
        deadline = time.monotonic() + 120
        while not cls.path.exists():
            assert cls.proc.poll() is None, f"the stage worker exited {cls.proc.returncode}"
            assert time.monotonic() < deadline, "the stage worker did not listen in 120 s"
            time.sleep(0.1)
        return str(cls.path)

    @classmethod
    def stop(cls) -> None:
        if cls.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cls.proc.pid, signal.SIGTERM)
            cls.proc.wait(timeout=30)
            cls.proc = None


def scratch_env(
    tmp: Path, shared_prefect: bool = True, stage_worker: bool = True
) -> dict[str, str]:
    """The environment of a command in a scratch repo under `tmp`: its own Prefect home, no
    MLFLOW_/PREFECT_ settings of the caller's, and, when the session's services are up,
    PREFECT_API_URL at its server if `shared_prefect` (`SharedPrefect`) and its stage worker
    if `stage_worker` (`SharedStageWorker`; else a run starts a worker of its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.pop(STAGE_WORKER, None)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(tmp / "prefect-home"),
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
    )
    api = SharedPrefect.api_url() if shared_prefect else None
    if api:
        env["PREFECT_API_URL"] = api
    worker = SharedStageWorker.socket() if stage_worker else None
    if worker:
        env[STAGE_WORKER] = worker
    return env


def make_scratch(dest: Path) -> Path:
    """A fresh clone-like copy of the working tree (files git tracks or would track), tiny params, one commit."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for f in filter(None, files):
        src = ROOT / f
        if src.exists():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    write_params(dest)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "scratch"], cwd=dest, check=True)
    return dest


def write_tar(path: Path, members) -> None:
    """A tar file (a webdataset shard) of (name, bytes) members, in the given order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def outs_md5(root: Path) -> dict[str, str]:
    """Every output's md5 in `root`/dvc.lock."""
    return {o["path"]: o["md5"] for e in read_lock(root).values() for o in e["outs"]}


def start_stopped(argv: list[str], root: Path, env: dict, point: str, ready: Path):
    """Start `argv` in its own process group with the crash point `point` armed and wait
    until a process of it stands there (otcurate.faults); returns (the Popen, the stopped
    pid). The caller kills the group."""
    from otcurate import faults

    # the stage in the process group the caller kills: its own process, no worker's fork
    # (`otcurate run` reads 0 as that; a stage's own client only knows a socket or nothing)
    env = {**env, faults.STOP_AT: point, faults.STOP_READY: str(ready)}
    env.pop(STAGE_WORKER, None)
    if Path(argv[0]).name == "otcurate":
        env[STAGE_WORKER] = "0"
    proc = subprocess.Popen(
        argv,
        cwd=root,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    try:
        while not ready.exists():  # the process writes it when it reaches the point
            assert proc.poll() is None, f"{argv[0]} exited {proc.returncode} before {point}"
            assert time.monotonic() < deadline, f"{point} not reached in 600 s"
            time.sleep(0.1)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc, int(ready.read_text())


def sh(
    root: Path,
    *args: str,
    check: bool = True,
    shared_prefect: bool = True,
    stage_worker: bool = True,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(args),
        cwd=root,
        env=scratch_env(root.parent, shared_prefect, stage_worker),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


# Imports, read from the source (nothing is imported): for the contract and layer tests.


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
