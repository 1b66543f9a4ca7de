"""The stage worker (otcurate_pipeline.stageworker) and its client (stages._common.main_process):
a stage run through it sees its own directory, arguments, environment and streams, ends
with its own exit status or signal, and dies with its client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otcurate_pipeline import stageworker
from otcurate_pipeline.stageworker import ENV

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import os, signal, sys, time
from stages._common import main_process

def main():
    print("cwd", os.getcwd(), "argv", *sys.argv[1:], flush=True)
    print("env", os.environ.get("PROBE"), os.environ.get("OTCURATE_STAGE_WORKER"), flush=True)
    print("pid", os.getpid(), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    mode = sys.argv[1]
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "wait":
        time.sleep(600)
    if mode == "raise":
        raise RuntimeError("boom")
    return {"exit": 3}.get(mode, 0)

if __name__ == "__main__":
    main_process(main, __spec__.name)
"""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    sock = tmp / "w.sock"
    proc = subprocess.Popen(  # preloading json only: the protocol, not torch's import time
        [sys.executable, "-m", "otcurate_pipeline.stageworker", str(sock), "json"],
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    yield sock
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def probe(tmp: Path, sock: Path | None, *args: str, wait: bool = True):
    (tmp / "probe.py").write_text(PROBE)
    env = {**os.environ, "PROBE": "seen", "PYTHONPATH": str(ROOT)}
    env.pop(ENV, None)
    if sock is not None:
        env[ENV] = str(sock)
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe", *args],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not wait:
        return proc
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, proc.pid


def stage_pid(out: str) -> int:
    return int(next(line for line in out.splitlines() if line.startswith("pid ")).split()[1])


def test_a_stage_runs_in_the_worker_as_in_its_own_process(worker, tmp_path):
    code, out, err, client = probe(tmp_path, worker, "exit", "--flag", "x y")
    assert code == 3
    assert f"cwd {tmp_path} argv exit --flag x y" in out
    assert "env seen None" in out  # its environment; the worker's variable is not passed on
    assert stage_pid(out) != client  # a fork of the worker ran it
    assert "to stderr" in err
    code, out, err, _ = probe(tmp_path, worker, "raise")
    assert code == 1 and "RuntimeError: boom" in err
    assert probe(tmp_path, worker, "ok")[0] == 0


def test_a_stage_killed_by_a_signal_kills_its_client_alike(worker, tmp_path):
    code, out, _, _ = probe(tmp_path, worker, "kill")
    assert code == -signal.SIGKILL and "pid " in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_stage_dies_with_its_client(worker, tmp_path, sig):
    """SIGTERM is passed on to the stage; a SIGKILLed client's stage is killed by the worker."""
    proc = probe(tmp_path, worker, "wait", wait=False)
    line = proc.stdout.readline()
    while not line.startswith("pid "):
        line = proc.stdout.readline()
    pid = int(line.split()[1])
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == -sig
    deadline = time.monotonic() + 30
    while True:  # gone (its supervisor reaps it at once)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"stage {pid} outlived its client"
        time.sleep(0.05)


def test_an_unreachable_worker_runs_the_stage_here(tmp_path):
    code, out, err, client = probe(tmp_path, tmp_path / "nobody.sock", "exit")
    assert code == 3 and stage_pid(out) == client
    assert "stage worker" in err and "unreachable" in err and "running here" in err


def gone(pid: int, timeout: float = 30) -> bool:
    """`pid` ended within `timeout` s (a zombie nobody reaps counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_run_s_own_worker_serves_its_stages_and_leaves_with_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with stageworker.for_run(2, tmp_path, ("json",)) as worker:
        assert worker is not None
        env = worker.env(wait=True)
        sock = Path(env[ENV])
        assert sock.exists() and len(str(sock)) < 100  # AF_UNIX's limit is 108 bytes
        code, out, _, client = probe(tmp_path, sock, "exit")
        assert code == 3 and stage_pid(out) != client  # forked by the run's worker
        with stageworker.for_run(8, tmp_path) as again:
            assert again is worker  # the flow inside `otcurate run`'s block: the same one
        assert worker.proc.poll() is None
        pid = worker.proc.pid
    assert gone(pid) and not sock.exists() and not sock.parent.exists()
    log = (tmp_path / stageworker.LOG).read_text()
    assert "probe in" in log  # the worker's own lines go to its log, not the console
    # one stage is worth a worker that boots while the run waits for its Prefect server
    with stageworker.for_run(1, tmp_path, ("json",), overlaps=True) as worker:
        assert worker is not None and worker.overlaps


def test_no_worker_where_the_environment_names_one_says_0_or_one_stage_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with stageworker.for_run(1, tmp_path) as worker:
        assert worker is None  # its own imports would cost what it saves
    with stageworker.for_run(0, tmp_path, overlaps=True) as worker:
        assert worker is None  # nothing to run
    for value in ("0", str(tmp_path / "theirs.sock")):
        monkeypatch.setenv(ENV, value)
        with stageworker.for_run(8, tmp_path) as worker:
            assert worker is None
    assert not (tmp_path / stageworker.LOG).exists()


def test_the_flow_runs_stages_as_their_own_processes_under_0(monkeypatch):
    from otcurate_pipeline import flow

    monkeypatch.setenv(ENV, "0")
    assert ENV not in flow._env()  # a stage's client would take "0" for a socket
    assert flow._env({ENV: "/tmp/w.sock"})[ENV] == "/tmp/w.sock"


def test_a_killed_run_s_worker_ends_with_it_and_removes_its_socket(tmp_path):
    """SIGKILL to the run (the worker is in a session of its own, out of Ctrl-C's reach):
    the worker sees its standard input close, removes its socket's folder and exits."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from otcurate_pipeline import stageworker\n"
            "with stageworker.for_run(2, Path(sys.argv[1]), ('json',)) as w:\n"
            "    w.env(wait=True); print(w.proc.pid, w.path, flush=True); time.sleep(600)\n",
            str(tmp_path),
        ],
        env={k: v for k, v in os.environ.items() if k != ENV},
        stdout=subprocess.PIPE,
        text=True,
    )
    pid, path = parent.stdout.readline().split()
    assert Path(path).exists() and not gone(int(pid), timeout=0.2)  # up
    parent.kill()
    parent.wait()
    assert gone(int(pid)), f"the worker {pid} outlived its run"
    deadline = time.monotonic() + 10
    while Path(path).parent.exists():
        assert time.monotonic() < deadline, f"{Path(path).parent} left behind"
        time.sleep(0.05)


def test_a_worker_that_died_or_never_listens_leaves_the_stages_to_their_own_processes(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv(ENV, raising=False)
    with stageworker.for_run(2, tmp_path, ("json",)) as worker:
        worker.proc.kill()
        worker.proc.wait()
        assert worker.env(wait=True) == {ENV: "0"}
        assert worker.env(wait=True) == {ENV: "0"}
    said = capsys.readouterr().err
    assert said.count("stage worker: exited -9") == 1 and "own processes" in said
    (tmp_path / "slowmod.py").write_text("import time\ntime.sleep(60)\n")  # a preload that hangs
    worker = stageworker.RunWorker(tmp_path, ("slowmod",), boot=1.0)
    try:
        assert worker.env(wait=False) == {ENV: "0"}  # the first stage waits for nothing
        assert worker.env(wait=True) == {ENV: "0"}  # the second, up to the boot deadline
        t0 = time.monotonic()
        assert worker.env(wait=True) == {ENV: "0"}  # one deadline for the run, not per stage
        assert time.monotonic() - t0 < 0.5
    finally:
        worker.close()
    said = capsys.readouterr().err
    assert said.count("did not listen in time") == 1
    assert not Path(worker.folder).exists()
