"""What the flow does when a stage fails: keep what exists, say only what is true.

A failed `dvc repro --single-item <stage>` can leave three kinds of damage, each seen in
practice: DVC deleted the stage's outputs before running it (it always does), the stage
was computed but DVC could not copy it into its cache (a full disk) while `dvc.lock`
already names the new hashes, and temporaries (`<out>.tmp-*`, `.dvc/cache/**/*.tmp`)
stay behind. `recover` puts `dvc.lock` back as it was before the stage (it then names
only data the cache holds), restores the last outputs with `dvc checkout` only when the
cache holds every file of them, never deletes outputs it cannot restore, and returns
what it did in words. `sweep` removes the temporaries at the start of the next run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from otcurate_pipeline import layout

NO_SPACE = ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")
LOCK_BUSY = ("Unable to acquire lock", "is busy")
TMP_MARKS = (".tmp-", ".old-")  # otcurate.io's atomic writes


@dataclass(frozen=True)
class Recovery:
    restored: bool  # the last good outputs are in place (restored, or never touched)
    message: str  # what happened to the outputs and to dvc.lock, for the console


def cache_dir(root: Path) -> Path:
    """The local DVC cache's md5 folder (`dvc cache dir` setting honoured)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return Path(repo.cache.local.path)


def _lock_entry(text: str | None, stage: str) -> dict | None:
    if not text:
        return None
    return ((layout.load_yaml(text) or {}).get("stages") or {}).get(stage)


def uncached(cache: Path, entry: dict) -> list[str]:
    """The outs of a dvc.lock entry whose data the cache does not hold in full."""

    def has(md5: str) -> bool:
        return (cache / md5[:2] / md5[2:]).is_file()

    missing = []
    for out in entry.get("outs") or []:
        md5 = out.get("md5") or ""
        ok = bool(md5) and has(md5)
        if ok and md5.endswith(".dir"):
            files = json.loads((cache / md5[:2] / md5[2:]).read_text())
            ok = all(has(f["md5"]) for f in files)
        if not ok:
            missing.append(out["path"])
    return missing


def uncached_outs(root: Path, stage: str) -> list[str]:
    """The outs that dvc.lock names for `stage` now but the cache lacks. `dvc repro` exits 0
    after a failed copy into its cache (a full disk: "ERROR: failed to transfer ...") with
    the new hashes already in dvc.lock, so success is checked here, not taken from DVC."""
    lock = Path(root) / "dvc.lock"
    entry = _lock_entry(lock.read_text() if lock.exists() else None, stage)
    return uncached(cache_dir(root), entry) if entry else []


def _size_mb(paths: list[Path]) -> float:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total / 2**20


def recover(
    root: Path,
    stage: str,
    lock_before: str | None,
    log_tail: str,
    dvc: Callable[..., subprocess.CompletedProcess],
    uncached_now: list[str] | None = None,
) -> Recovery:
    """After `stage` failed: dvc.lock back to `lock_before`, outputs restored when safe.
    `uncached_now`: outs the stage computed but DVC did not cache (`dvc repro` exited 0):
    those are kept in place, never replaced by the old ones."""
    try:
        return _recover(root, stage, lock_before, log_tail, dvc, uncached_now or [])
    except Exception as exc:  # noqa: BLE001 - never hide the stage's own failure
        return Recovery(
            False,
            f"could not check or restore the outputs of '{stage}' ({type(exc).__name__}: "
            f"{exc}); nothing was deleted, but dvc.lock may name data the DVC cache lacks: "
            f"run `dvc status {stage}` before trusting it.",
        )


def _put_back(lock: Path, text: str | None) -> None:
    if text is None:
        lock.unlink(missing_ok=True)
        return
    tmp = lock.with_name("dvc.lock.tmp-recover")
    try:
        tmp.write_text(text)
        tmp.replace(lock)
    except OSError:
        tmp.unlink(missing_ok=True)
        with open(lock, "r+") as fh:  # in place: no second copy needed on a full disk
            fh.truncate(0)
            fh.write(text)


def _lock_size_mb(text: str | None, stage: str) -> float:
    entry = _lock_entry(text, stage) or {}
    return sum(int(o.get("size") or 0) for o in entry.get("outs") or []) / 2**20


def _recover(root, stage, lock_before, log_tail, dvc, uncached_now) -> Recovery:
    root = Path(root)
    lock = root / "dvc.lock"
    outs = list(layout.stages(root)[stage].outs)
    if any(s in log_tail for s in LOCK_BUSY):
        return Recovery(
            False,
            "another DVC process holds this repository's lock; otcurate changed nothing "
            "(outputs and dvc.lock are as that process leaves them). Rerun when it is done.",
        )
    put_back = ""  # said after what happened to the outputs
    now = lock.read_text() if lock.exists() else None
    if now != lock_before:
        _put_back(lock, lock_before)
        put_back = f"; dvc.lock was put back as it was before '{stage}' ran"
    before = _lock_entry(lock_before, stage)
    cache = cache_dir(root)
    if any(s in log_tail for s in NO_SPACE):
        need = _size_mb([root / o for o in outs]) or _lock_size_mb(now, stage)
        free = shutil.disk_usage(cache if cache.exists() else root).free / 2**20
        where = ", ".join(outs)
        return Recovery(
            False,
            f"no space left on device while writing or caching {where}: free at least "
            f"{need:.0f} MB ({free:.0f} MB are free under {cache}) and rerun. The outputs "
            "on disk were kept as they are" + put_back + ".",
        )
    if uncached_now:
        return Recovery(
            False,
            f"DVC could not copy {', '.join(uncached_now)} into its cache (see its ERROR "
            "above); the computed outputs were kept in place"
            + put_back
            + ". Fix the cause and rerun.",
        )
    if before is None:
        return Recovery(
            False,
            f"'{stage}' has no earlier outputs to restore (it never finished before); "
            "the outputs on disk were kept as they are" + put_back + ".",
        )
    missing = uncached(cache, before)
    if missing:
        return Recovery(
            False,
            f"could not restore the last outputs of '{stage}': the DVC cache lacks "
            f"{', '.join(missing)}; the outputs on disk were kept as they are" + put_back + ".",
        )
    proc = dvc(root, "checkout", "--force", stage)
    absent = [o for o in outs if not (root / o).exists()]
    if proc.returncode != 0 or absent:
        why = (proc.stderr or proc.stdout or "").strip().splitlines()
        return Recovery(
            False,
            f"could not restore the last outputs of '{stage}' (dvc checkout: "
            f"{why[-1] if why else 'exit ' + str(proc.returncode)})"
            + (f"; missing now: {', '.join(absent)}" if absent else "")
            + put_back
            + ".",
        )
    return Recovery(True, f"the last good outputs of '{stage}' were restored from the DVC cache.")


def _dvc_idle(root: Path) -> bool:
    """No DVC process works in this repo now: its lock file (`.dvc/tmp/lock`, an flock) is
    free. Checked with the same kind of lock, taken and let go at once."""
    import fcntl
    import os

    path = root / ".dvc" / "tmp" / "lock"
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep(root: Path) -> list[Path]:
    """Remove temporaries of earlier failed runs: DVC's `*.tmp` files in its cache (when the
    cache is this repo's own) and otcurate's `<out>.tmp-*` / `<out>.old-*` beside each out.
    Call it holding the run lock; nothing is swept while a DVC process works here."""
    root = Path(root)
    gone: list[Path] = []
    if not _dvc_idle(root):
        return gone
    try:
        cache = cache_dir(root)
    except Exception:  # noqa: BLE001 - no DVC repo: nothing of DVC's to sweep
        cache = None
    if cache is not None and cache.exists() and cache.resolve().is_relative_to(root.resolve()):
        for f in cache.rglob("*.tmp"):
            if f.is_file():
                f.unlink(missing_ok=True)
                gone.append(f)
    for st in layout.stages(root).values():
        for out in st.outs:
            p = root / out
            if not p.parent.exists():
                continue
            for sib in p.parent.iterdir():
                if any(sib.name.startswith(p.name + m) for m in TMP_MARKS):
                    if sib.is_dir() and not sib.is_symlink():
                        shutil.rmtree(sib, ignore_errors=True)
                    else:
                        sib.unlink(missing_ok=True)
                    gone.append(sib)
    return gone
