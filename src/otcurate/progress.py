"""Progress reporting that reads well both in a terminal and in a captured log."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(
    items: Iterable[T], *, total: int | None, description: str, every: float = 0.1
) -> Iterator[T]:
    """Yield from `items` showing progress: a rich bar on a terminal, else a line every 10%.

    Under torchrun only the first process reports.
    """
    if int(os.environ.get("RANK", "0")) > 0:
        yield from items
        return
    if sys.stderr.isatty():
        from rich.progress import track as rich_track

        yield from rich_track(items, total=total, description=description, transient=False)
        return
    start = time.perf_counter()
    next_mark = every
    done = 0
    for item in items:
        yield item
        done += 1
        if total and done / total >= next_mark - 1e-9:
            rate = done / max(time.perf_counter() - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else 0.0
            print(
                f"{description}: {done}/{total} ({100 * done / total:.0f}%, {rate:.1f}/s, eta {eta:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
            next_mark += every
