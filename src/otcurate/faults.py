"""Named crash points, so a test can kill a process at a known place instead of after a sleep.

A process whose environment has ``OTCURATE_STOP_AT=<point>`` stops when it reaches that point:
it writes its pid to the file named by ``OTCURATE_STOP_READY`` (or says so on stderr), then
waits there to be killed. Unset, a point costs one dictionary look-up.

Points (``<path>`` as the writer was given it, e.g. ``data/detect``):

- ``<description>:step:<n>``: a training loop has finished step n (``pretrain:step:3``);
- ``staging:chunk:<n>``: ingest has finished n chunks of its resumable staging;
- ``commit:<path>``: an atomic directory is written whole, not yet renamed into place;
- ``committed:<path>``: it has been renamed into place.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STOP_AT = "OTCURATE_STOP_AT"
STOP_READY = "OTCURATE_STOP_READY"
WAIT_S = 600.0  # a stopped process nobody kills gives up, so a broken test cannot hang CI


def point(name: str) -> None:
    """Stop here if the environment asks for this point; otherwise return at once."""
    if os.environ.get(STOP_AT) != name:
        return
    ready = os.environ.get(STOP_READY)
    if ready:
        tmp = Path(f"{ready}.part")
        tmp.write_text(str(os.getpid()))
        tmp.replace(ready)  # the test sees the whole pid or nothing
    print(f"otcurate: stopped at {name} (pid {os.getpid()}), waiting to be killed", file=sys.stderr)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        time.sleep(1.0)
    print(f"otcurate: nobody killed the process stopped at {name}; exiting", file=sys.stderr)
    os._exit(70)
