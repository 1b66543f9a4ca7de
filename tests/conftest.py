"""Shared fixtures. Helpers live in `otcurate_support` (importable by name from test modules)."""

from __future__ import annotations

import pytest
from otcurate_support import STAGE_PATHS, TinyRun


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyRun:
    """Every stage run once, in order, on tiny data (stage tests inspect and rerun from here)."""
    run = TinyRun(tmp_path_factory.mktemp("tiny"))
    for stage, paths in STAGE_PATHS.items():
        assert run.run(stage, **paths) == 0, f"stage {stage} failed"
    return run
