"""Local servers: the Prefect API/UI and the MLflow UI, bound to 127.0.0.1 by default.

Each runs as its own process group so that stopping it stops its workers too; `stop`
sends SIGTERM, waits, then SIGKILL. `reachable` is a plain HTTP health probe.
`temporary_prefect` is the API server of one `otcurate run` when PREFECT_API_URL is unset.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
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


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def temporary_prefect(log: Path):
    """A Prefect API server for the block, or None when the user configured one
    (`configured_api_url`: PREFECT_API_URL in the environment or the active profile).

    Prefect's own temporary server (`prefect.server.api.server.SubprocessASGIServer`, which a
    flow starts when no API URL is set) is this same uvicorn command on `create_app` with the
    UI off; but the flow starts it only at its first API call, and first imports the whole
    server into the client (5 s here) to build the command. Started here, it boots while
    the run imports Prefect and MLflow (#18). It shares the caller's process group, as
    Prefect's does, so Ctrl-C and a kill of the group reach it; its output goes to ``log``.
    PREFECT_API_URL names it inside the block (Prefect's settings, read from the environment
    when it is imported, are refreshed if it already was); the caller waits for it to
    answer (`wait_ready`) before the flow's first call."""
    if configured_api_url():
        yield None
        return
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    spec = importlib.util.find_spec("prefect")  # Prefect's --app-dir, without importing it
    app_dir = str(Path(next(iter(spec.submodule_search_locations))).parent)
    argv = [
        sys.executable, "-m", "uvicorn", "--app-dir", app_dir,
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    with open(log, "wb") as fh:  # this run's server only
        proc = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    before = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    try:
        base = f"http://127.0.0.1:{port}"
        service = Service("prefect (temporary)", base, f"{base}/api/health", proc, log)
        # the API only: no "View at <UI link>" for a server that serves no UI
        os.environ.update(PREFECT_API_URL=f"{base}/api", PREFECT_UI_URL="")
        _refresh_prefect_settings()
        yield service
    finally:
        if proc.poll() is None:  # else its log and event workers retry a stopped server at exit
            drain_prefect()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _refresh_prefect_settings()
        if proc.poll() is None:
            proc.terminate()
            try:  # a server still migrating a fresh database finishes that first
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def configured_api_url() -> str | None:
    """The Prefect API the user configured: PREFECT_API_URL in the environment, else in the
    active profile of $PREFECT_HOME/profiles.toml (PREFECT_PROFILE, else its `active`), read
    without importing Prefect. (Prefect's prefect.toml and .env files are not read.)"""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    url = profiles.get("profiles", {}).get(name, {}).get("PREFECT_API_URL")
    return str(url) if url else None


def drain_prefect(timeout: float = 10.0) -> None:
    """Send what Prefect's log and event workers still hold, as `prefect_test_harness` does
    before it stops its server; nothing when Prefect was not imported."""
    if "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def _refresh_prefect_settings() -> None:
    """Prefect's global settings again from the environment, when Prefect is imported."""
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


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
