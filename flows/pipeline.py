"""The Prefect entry point: `python flows/pipeline.py [root]` runs the pipeline flow once.

The flows themselves (`pipeline`, one task per DVC stage, and `nightly`, the scheduled run)
live in the application package, `otcurate_pipeline.flow`, which `otcurate run` and
`otcurate schedule` import.
"""

from __future__ import annotations

import sys

from otcurate_pipeline.flow import nightly, pipeline

__all__ = ["nightly", "pipeline"]

if __name__ == "__main__":
    print(pipeline(sys.argv[1] if len(sys.argv) > 1 else "."))
