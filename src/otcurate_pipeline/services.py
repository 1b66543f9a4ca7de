"""Local servers: the Prefect API/UI and the MLflow UI, bound to 127.0.0.1 by default.

Each runs as its own process group so that stopping it stops its workers too; `stop`
sends SIGTERM, waits, then SIGKILL. `reachable` is a plain HTTP health probe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Service:
    name: str
    url: str  # what a browser opens
    health: str  # what `reachable` probes
    proc: subprocess.Popen
    log: Path


def reachable(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - local URL
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: stop() reaches its workers
        )


def start_prefect(host: str, port: int, log: Path, env: dict[str, str] | None = None) -> Service:
    """`prefect server start` (API + UI); analytics off."""
    proc = _spawn(
        "prefect",
        [
            _bin("prefect"),
            "server",
            "start",
            "--host",
            host,
            "--port",
            str(port),
            "--analytics-off",
        ],
        log,
        {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})},
    )
    base = f"http://{host}:{port}"
    return Service("prefect", base, f"{base}/api/health", proc, log)


def start_mlflow(
    host: str, port: int, backend_uri: str, log: Path, env: dict[str, str] | None = None
) -> Service:
    """`mlflow server` on the project's store (runs keep their own artifact locations)."""
    proc = _spawn(
        "mlflow",
        [
            _bin("mlflow"),
            "server",
            "--host",
            host,
            "--port",
            str(port),
            "--backend-store-uri",
            backend_uri,
            "--workers",
            "1",
        ],
        log,
        env,
    )
    base = f"http://{host}:{port}"
    return Service("mlflow", base, f"{base}/health", proc, log)


def wait_ready(services: list[Service], timeout: float) -> None:
    """Until every service answers its health probe; RuntimeError (with the log's tail) if
    one exits or the time runs out."""
    t0 = time.monotonic()
    pending = list(services)
    while pending:
        for s in list(pending):
            if s.proc.poll() is not None:
                raise RuntimeError(
                    f"{s.name} exited with {s.proc.returncode} while starting:\n{tail(s.log)}"
                )
            if reachable(s.health):
                pending.remove(s)
        if pending and time.monotonic() - t0 > timeout:
            names = ", ".join(s.name for s in pending)
            raise RuntimeError(
                f"{names} did not answer within {timeout:.0f} s:\n"
                + "\n".join(tail(s.log) for s in pending)
            )
        if pending:
            time.sleep(0.5)


def stop(services: list[Service], grace: float = 20.0) -> None:
    """SIGTERM each process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for s in services:
        if s.proc.poll() is None:
            try:
                os.killpg(s.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    t0 = time.monotonic()
    for s in services:
        try:
            s.proc.wait(timeout=max(0.1, grace - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            pass
    for s in services:
        try:  # the group may outlive its leader (uvicorn/gunicorn workers)
            os.killpg(s.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if s.proc.poll() is None:
            s.proc.wait(timeout=10)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
