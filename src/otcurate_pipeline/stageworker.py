"""A stage worker: one process that imports torch and open_clip once, then forks a stage
process per request, so that `python -m stages.<name>` skips the 6-9 s those imports cost
each stage process here (#18).

    python -m otcurate_pipeline.stageworker /tmp/stages.sock    # serve until SIGTERM

A stage whose environment has ``OTCURATE_STAGE_WORKER=<socket path>`` hands its module name,
arguments, working directory, environment, ``sys.path`` and standard streams to the worker
(`stages._common.main_process`: a stage imports nothing of this module, so the
worker is no code dependency of any stage). The worker forks a supervisor, which forks the stage: the
stage module runs as `python -m` runs it (``runpy``, ``__main__``), with none of otcurate's
modules imported before it, so the code it runs is the code in its working directory. The
stage's exit status comes back to the waiting client, which ends with it (a stage killed by
a signal kills the client by the same signal). SIGINT, SIGTERM and SIGHUP sent to the
client are passed on to the stage; a client that dies (SIGKILL included) takes the stage
with it: the supervisor sees its socket close and kills the stage.

What differs from a fresh interpreter: the stage leads its own process group, not its
client's (signals reach what it starts through that group; a test that kills a process
group and asserts on it runs stages without the worker), and
module state set at import time by the preloaded libraries was set under the worker's
environment. The worker never initialises CUDA, so a stage may.

A pipeline run starts one for itself (`for_run`: `otcurate run` beside its Prefect server,
the flow otherwise) when two or more of its stages may run and ``OTCURATE_STAGE_WORKER`` is
unset; ``=0`` runs every stage as its own process, and a socket path hands the stages to a
worker already running. Its worker leaves with the run: stopped at the run's end, and
ended by the close of its standard input (a pipe from the run) should the run be killed;
either way it removes its socket and the socket's folder. A stage still running then ends
with its client, as ever. One run's worker per process (`for_run` inside another's block
gets that one). Ctrl-Z stops the run but not a forked stage, which is not in the
terminal's process group (the client passes on SIGINT, SIGTERM and SIGHUP only).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

ENV = "OTCURATE_STAGE_WORKER"  # the client: stages._common.main_process (same protocol)
OFF = ("0", "off", "false", "no")  # ENV values that mean: every stage in its own process
WITH_PARENT = "--with-parent"  # serve until standard input closes (`for_run`)
LOG = Path(".otcurate") / "logs" / "stage-worker.log"  # a run's own worker's, in the repo
# what every stage process imports and pays for, none of it otcurate's own
PRELOAD = (
    "torch",
    "open_clip",
    "numpy",
    "pyarrow.parquet",
    "safetensors.torch",
    "PIL.Image",
    "ot",
    "mlflow.tracking",
)
# the request: a 4-byte length and the stage's streams (SCM_RIGHTS), then that many bytes of
# JSON; the answers: "pid <n>\n" when the stage is forked, "exit <code>\n" when it ends
OWN = ("stages", "otcurate", "otcurate_pipeline")  # imported fresh by each stage, from its cwd
_HEADER = struct.Struct("!I")


def preload(modules: tuple[str, ...] = PRELOAD) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # a stage that needs it fails as it would without us
            print(f"stage worker: not preloaded: {name} ({exc})", file=sys.stderr, flush=True)


def serve(path: str, modules: tuple[str, ...] = PRELOAD, with_parent: bool = False) -> NoReturn:
    """Listen on the unix socket `path` and fork a supervised stage per connection;
    ``with_parent`` (`RunWorker`): exit once standard input reaches its end (the parent
    closed it, or died) or at SIGTERM, removing `path` and its folder. The stages running
    then end with their clients, as ever."""
    preload(modules)
    sys.stdout.flush()
    sys.stderr.flush()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    part = f"{path}.part"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(part)
    srv.bind(part)
    srv.listen(64)
    os.rename(part, path)  # the socket appears when it accepts
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the supervisors
    signal.signal(signal.SIGTERM, lambda *_: _leave(path, with_parent))
    print(f"stage worker: serving on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    watched = [sys.stdin.fileno()] if with_parent else []
    while True:
        ready, _, _ = select.select([srv, *watched], [], [])
        if watched and watched[0] in ready and not os.read(watched[0], 4096):
            _leave(path, with_parent)
        if srv not in ready:
            continue
        conn, _ = srv.accept()
        if os.fork() == 0:
            srv.close()
            _supervise(conn)
        conn.close()


def _leave(path: str, own_folder: bool) -> NoReturn:
    """Exit; with ``own_folder`` (a run's worker), remove the socket and its folder first."""
    if own_folder:
        _remove_socket(path)
    os._exit(0)


def _remove_socket(path: str) -> None:
    """Remove a run's worker's socket and the folder made for it, whatever is left of them."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def _kill_tree(pid: int) -> None:
    """SIGKILL the stage's process group and every process below it: what it started in
    sessions of their own (torchrun's workers) too."""
    try:
        import psutil

        below = psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - gone already, or no psutil: its group at least
        below = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for proc in below:
        with contextlib.suppress(Exception):
            proc.kill()


def _supervise(conn: socket.socket) -> NoReturn:
    """Read one request, fork the stage, report its pid and then its exit status."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        (size,) = _HEADER.unpack_from(msg)
        data = msg[_HEADER.size :]
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                os._exit(1)
            data += chunk
        req = json.loads(data)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _stage(req, fds)
        with contextlib.suppress(OSError):  # as the stage does: no window without its group
            os.setpgid(pid, pid)
        for fd in fds:
            os.close(fd)
        t0 = time.monotonic()
        ended = False
        try:
            conn.sendall(f"pid {pid}\n".encode())
            pidfd = os.pidfd_open(pid)
            while not ended:
                ready, _, _ = select.select([conn, pidfd], [], [])
                if pidfd in ready:
                    ended = True
                elif not _alive(conn):
                    break
        finally:
            if not ended:  # the client is gone: so is its stage, with what it started
                _kill_tree(pid)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(
            f"stage worker: {req['module']} in {req['cwd']}: pid {pid}, exit {code}, "
            f"{time.monotonic() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(OSError):  # a client gone has nobody to tell
            conn.sendall(f"exit {code}\n".encode())
    finally:
        os._exit(0)


def _alive(conn: socket.socket) -> bool:
    """False once the client has closed its end (or it was reset)."""
    try:
        return bool(conn.recv(64))
    except OSError:
        return False


def _stream(fd: int, encoding: str, errors: str, line: bool, through: bool):
    raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
    buffered = io.BufferedReader(raw) if fd == 0 else raw if through else io.BufferedWriter(raw)
    return io.TextIOWrapper(
        buffered, encoding=encoding, errors=errors, line_buffering=line, write_through=through
    )


def _die_with_parent() -> None:
    """SIGKILL this process when its supervisor dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _stage(req: dict, fds: list[int]) -> NoReturn:
    """In the forked stage: become the client's process image, then run its module."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: the supervisor and the client signal it whole
        _die_with_parent()
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ.pop(ENV, None)  # the stage runs here, and what it starts runs plainly
        through = bool(os.environ.get("PYTHONUNBUFFERED"))
        enc = req["encodings"]
        sys.stdin = _stream(0, enc[0], "strict", False, False)
        sys.stdout = _stream(1, enc[1], "strict", os.isatty(1), through)
        sys.stderr = _stream(2, enc[2], "backslashreplace", True, through)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        sys.path[:] = req["path"]
        for name in [m for m in sys.modules if m.split(".")[0] in OWN]:
            del sys.modules[name]
        importlib.invalidate_caches()
        sys.argv = [req["module"], *req["argv"]]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:  # as the interpreter: the traceback, then death by SIGINT
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - report as the interpreter would, then exit 1
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def supported() -> bool:
    """Whether this system can run a worker: fork, unix sockets with descriptor passing,
    and pidfds that work (Linux >= 5.3, and not refused by a container's seccomp policy)."""
    if not (hasattr(os, "fork") and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


class RunWorker:
    """A worker that a run started for itself (`for_run`), in ``root`` (its log: `LOG`
    there, this run's only); `env` is what a stage process's environment gets."""

    def __init__(
        self, root: Path, modules: tuple[str, ...] = (), boot: float = 120.0, overlaps: bool = False
    ):
        self.overlaps = overlaps  # it boots while the run waits for its Prefect server
        self.log = root / LOG
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.folder = tempfile.mkdtemp(prefix="otcurate-stages-")  # short: AF_UNIX paths
        self.path = os.path.join(self.folder, "stages.sock")
        try:
            with open(self.log, "wb") as err:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", __name__, WITH_PARENT, self.path, *modules],
                    cwd=root,
                    stdin=subprocess.PIPE,  # held by this process only: the worker's lifeline
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,  # Ctrl-C reaches the stage through its client
                )
        except BaseException:
            os.rmdir(self.folder)
            raise
        self.ready_by = time.monotonic() + boot  # one deadline for the whole run
        self.said = False

    def env(self, wait: bool) -> dict[str, str]:
        """{ENV: the socket} once the worker listens (``wait``: until it does, up to the
        run's boot deadline), else {ENV: "0"}: the stage runs in its own process. A worker
        that died or never listened is said once."""
        while True:
            if self.proc.poll() is not None:
                self._say(f"exited {self.proc.returncode}")
                return {ENV: OFF[0]}
            if os.path.exists(self.path):
                return {ENV: self.path}
            if not wait or time.monotonic() >= self.ready_by:
                if wait:
                    self._say("did not listen in time")
                return {ENV: OFF[0]}
            time.sleep(0.05)

    def _say(self, what: str) -> None:
        if not self.said:
            print(
                f"stage worker: {what} (log {self.log}); the stages run in their own processes",
                file=sys.stderr,
                flush=True,
            )
            self.said = True

    def close(self) -> None:
        """Stop the worker (only it: a stage still running ends with its client), which
        removes its socket and folder; remove them here should it not have."""
        if self.proc.poll() is None:
            self.proc.terminate()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _remove_socket(self.path)


_ACTIVE: list[RunWorker] = []  # the one `for_run` started in this process, while it lives


@contextlib.contextmanager
def for_run(
    stages: int, root: Path, modules: tuple[str, ...] = (), overlaps: bool = False
) -> Iterator[RunWorker | None]:
    """A worker for a run in ``root`` in which ``stages`` stage processes may start
    (preloading ``modules``, or PRELOAD); None where the environment names one (or says
    ``OTCURATE_STAGE_WORKER=0``), where no stage may start, where only one may and the
    worker would not boot while the run waits anyway (``overlaps``: for its temporary
    Prefect server; otherwise its own imports cost what it saves), where the system has
    none, or where it cannot start (said: the stages then run as their own processes).
    Inside another `for_run`'s block (`otcurate run` starts one beside its Prefect server,
    then the flow asks), that block's worker, which that block stops."""
    if _ACTIVE:
        yield _ACTIVE[0]
        return
    if ENV in os.environ or stages < (1 if overlaps else 2) or not supported():
        yield None
        return
    try:
        worker = RunWorker(root, modules, overlaps=overlaps)
    except OSError as exc:
        print(
            f"stage worker: not started ({exc}); the stages run in their own processes",
            file=sys.stderr,
            flush=True,
        )
        yield None
        return
    try:
        _ACTIVE.append(worker)
        yield worker
    finally:
        _ACTIVE.clear()
        worker.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    with_parent = args[:1] == [WITH_PARENT]
    args = args[1:] if with_parent else args
    if not args:
        sys.exit(
            f"usage: python -m otcurate_pipeline.stageworker [{WITH_PARENT}] SOCKET [MODULE ...]"
        )
    serve(args[0], tuple(args[1:]) or PRELOAD, with_parent)
