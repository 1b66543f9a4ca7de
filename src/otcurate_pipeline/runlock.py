"""One pipeline run at a time per repository.

`otcurate run` and a `schedule` tick take this lock before they touch params.yaml, the
source manifests or any output, and hold it until they are done. It is an `flock` on
`.otcurate/run.lock`: the kernel releases it when the holder dies (SIGKILL included), so
a dead run never blocks the next one and there is nothing stale to clear. The file
records the holder (pid, command, since) so that the refusal can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = Path(".otcurate") / "run.lock"


class RunLocked(RuntimeError):
    """Another otcurate run holds this repository."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        pid = holder.get("pid", "?")
        what = holder.get("command") or "otcurate"
        since = holder.get("since", "an unknown time")
        super().__init__(
            f"another run holds this repository: pid {pid} ({what}), since {since}. "
            f"Wait for it to finish (or pass --wait), or stop it (kill {pid}) and rerun. "
            "Nothing was changed."
        )


def holder(root: Path) -> dict:
    """Who holds (or last held) the lock: {pid, command, since}, or {} when unknown."""
    try:
        return json.loads((Path(root) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def run_lock(
    root: Path,
    command: str,
    *,
    wait: bool = False,
    poll_seconds: float = 2.0,
    on_wait: Callable[[RunLocked], None] | None = None,
) -> Iterator[None]:
    """Hold the repository's run lock for the body; raises RunLocked at once when another
    process holds it, or (``wait``) blocks until it is free, calling ``on_wait`` once."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if not isinstance(exc, BlockingIOError):  # e.g. ENOLCK: no locks on this fs
                    print(
                        f"otcurate: cannot lock {path} ({exc}); running without the "
                        "one-run-at-a-time guard",
                        file=sys.stderr,
                    )
                    break
                busy = RunLocked(path, holder(root))
                if not wait:
                    raise busy from None
                if not told and on_wait is not None:
                    on_wait(busy)
                    told = True
                time.sleep(poll_seconds)
        record = {
            "pid": os.getpid(),
            "command": command,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        try:  # the holder record only names us in a refusal: a full disk must not stop us
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError:
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
