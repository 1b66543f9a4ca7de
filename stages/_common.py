"""What every stage shares: argument parsing, strict params, error-to-exit-code mapping.

Exit codes: 0 success; 2 bad input or params (the message says the fix);
75 a transient failure (I/O timeout, a lock) that the flow may retry; 1 a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from otcurate_pipeline.artifacts import Mismatch
from otcurate_pipeline.params import ParamsError, load, read_file

EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.EINTR, errno.ENOLCK}


class StageError(ValueError):
    """Bad input data or a bad combination of inputs; the message says what to do."""


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=doc)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def read_params(path: str | Path, *sections: str) -> list[Any]:
    """The typed `base` section followed by each named section, strictly validated."""
    raw = read_file(Path(path))
    return [load(raw, s) for s in ("base", *sections)]


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError | BlockingIOError | InterruptedError | ConnectionError):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def run(name: str, body: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a stage body and map its failure to an exit code with a one-line reason."""
    try:
        body(args)
    except (ParamsError, StageError, Mismatch) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FileNotFoundError as exc:
        print(
            f"{name}: error: missing input {exc.filename or exc}: run the upstream stages first (dvc repro).",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - classify, report, exit once
        if _is_transient(exc):
            print(f"{name}: transient failure, may be retried: {exc}", file=sys.stderr)
            return EXIT_TRANSIENT
        traceback.print_exc()
        return 1
    return 0


def exit_process(code: int) -> NoReturn:
    """End `python -m stages.<name>` with ``code`` without the interpreter's teardown.

    By the time main() returns, the outputs are renamed into place (otcurate.io) and every
    file is closed; what remains is the teardown of torch's and open_clip's modules, 0.8-1.5 s
    a stage here (#18). The streams and log handlers are flushed first; the process ends as
    multiprocessing ends its workers. Only in a stage's ``__main__``: tests call main()."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


STAGE_WORKER = "OTCURATE_STAGE_WORKER"  # otcurate_pipeline.stageworker's socket


def main_process(main: Callable[[], int], module: str | None) -> NoReturn:
    """`python -m stages.<name>`'s end: run `main` in the stage worker that the environment
    names (otcurate_pipeline.stageworker: torch and open_clip already imported), else here,
    and end with its exit code. An unreachable worker is said once; the stage then runs here.
    `module`: this module's name under `python -m` (None when run as a file: runs here)."""
    path = os.environ.get(STAGE_WORKER)
    if path and module:
        _delegate(path, module)
        os.environ.pop(STAGE_WORKER, None)  # unreachable: what this stage starts runs plainly
    exit_process(main())


def _delegate(path: str, module: str) -> None:
    """Hand this process's module, arguments, directory, environment, sys.path and streams
    to the worker at `path`, pass SIGINT/SIGTERM/SIGHUP on to the stage it forks, and end as
    that stage ends (by its signal, if one killed it). Returns only if nothing was started."""
    import json
    import signal
    import socket
    import struct

    req = {
        "module": module,
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "path": sys.path,
        "encodings": [
            getattr(s, "encoding", None) or "utf-8" for s in (sys.stdin, sys.stdout, sys.stderr)
        ],
    }
    data = json.dumps(req).encode()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        socket.send_fds(conn, [struct.pack("!I", len(data))], [0, 1, 2])
        conn.sendall(data)
        reader = conn.makefile("r")
        first = reader.readline().split()
        if first[:1] != ["pid"]:
            raise OSError("no stage was started")
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # nothing was started
    except OSError as exc:
        print(
            f"{module}: stage worker {path} unreachable ({exc}); running here. Start the worker "
            f"(python -m otcurate_pipeline.stageworker {path}) or unset {STAGE_WORKER}.",
            file=sys.stderr,
        )
        return
    pid = int(first[1])

    def forward(sig: int, _frame: Any) -> None:  # to the stage's group: what it started too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        last = reader.readline().split()
    except OSError:
        last = []
    if last[:1] != ["exit"]:
        print(
            f"{module}: the stage worker {path} ended before the stage (pid {pid}) reported; "
            f"rerun, or unset {STAGE_WORKER} to run stages in their own processes.",
            file=sys.stderr,
        )
        os._exit(EXIT_TRANSIENT)
    code = int(last[1])
    if code < 0:  # the stage was killed by a signal: so is this process
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def live_logger() -> Callable[[str, float, int], None] | None:
    """Log curves to the MLflow run the flow handed us (MLFLOW_RUN_ID), else None."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
    except Exception:  # noqa: BLE001 - tracking must never break a stage
        return None

    def log(key: str, value: float, step: int) -> None:
        try:
            client.log_metric(run_id, key, float(value), step=step)
        except Exception:  # noqa: BLE001
            pass

    return log


def save_model_and_curve(
    clip, out_dir: str, results_dir: str, metrics: dict, curve=None, extra=None
) -> None:
    """Write a trained model (open_clip folder) and its results (metrics, loss curve), each
    atomically; `extra` (a state dict) goes beside the model as the fine-tuned weights
    before WiSE-FT mixing (`models.UNMIXED_FILE`)."""
    from safetensors.torch import save_file

    from otcurate import models
    from otcurate.io import atomic_dir, write_json, write_tsv

    with atomic_dir(out_dir) as out:
        models.save(clip, out)
        if extra is not None:
            save_file(extra, str(out / models.UNMIXED_FILE), metadata={"format": "pt"})
    with atomic_dir(results_dir) as res:
        if curve is not None:
            (res / "plots").mkdir()
            steps = range(len(curve.losses))
            write_tsv(
                res / "plots" / "loss.tsv", {"step": steps, "loss": curve.losses, "lr": curve.lrs}
            )
        write_json(res / "metrics.json", metrics)


def model_logit_scale(model_dir: str) -> float:
    """exp(logit_scale) of a saved model, read from its weights alone (no open_clip import)."""
    from safetensors import safe_open

    with safe_open(f"{model_dir}/model.safetensors", framework="pt") as f:
        return float(f.get_tensor("logit_scale").exp().clamp(max=100.0))
