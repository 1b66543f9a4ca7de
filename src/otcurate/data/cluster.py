"""Where embed's work may run: the grammar of a Dask address (torch-free, so that params can
check it without loading what the work needs)."""

from __future__ import annotations

import re

LOCAL = re.compile(r"^local(?::(\d+))?$")


def check_dask_address(value: str | None) -> None:
    """None, 'local', 'local:N' (N worker processes on this machine) or a scheduler address."""
    if value is None or LOCAL.match(value) or "://" in value:
        return
    raise ValueError(
        f"embed.dask must be null (in-process), 'local' / 'local:N' (a local cluster of N worker "
        f"processes) or a scheduler address such as tcp://127.0.0.1:8786; got {value!r}."
    )
