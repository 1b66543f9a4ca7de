"""Fault injection for the DVC subprocesses of the fault tests (on their PYTHONPATH only).

OTCURATE_TEST_ENOSPC=<text>: copying a file into a DVC cache whose path holds <text> fails
as a full disk does (OSError ENOSPC), after writing part of it."""

import errno
import os

_marker = os.environ.get("OTCURATE_TEST_ENOSPC")
if _marker:
    import dvc_objects.fs.local as _local
    import dvc_objects.fs.utils as _utils

    _real = _utils.copyfile

    def copyfile(src, dest, *args, **kwargs):
        if _marker in str(dest):
            with open(dest, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))
        return _real(src, dest, *args, **kwargs)

    _utils.copyfile = copyfile
    _local.copyfile = copyfile
