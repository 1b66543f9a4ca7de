"""What every stage shares: argument parsing, strict params, error-to-exit-code mapping.

Exit codes: 0 success; 2 bad input or params (the message says the fix);
75 a transient failure (I/O timeout, a lock) that the flow may retry; 1 a bug.
"""

from __future__ import annotations

import argparse
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
