"""The scratch repo the pipeline tests share: one real first run (DVC, Prefect, MLflow) on
tiny params, reused by test_e2e and test_faults (each test leaves it consistent)."""

from __future__ import annotations

import pytest
from otcurate_support import BIN, make_scratch, outs_md5, sh


@pytest.fixture(scope="session")
def scratch(tmp_path_factory):
    """(repo root, the first `otcurate run`'s result, the md5 of every output after it)."""
    root = make_scratch(tmp_path_factory.mktemp("e2e") / "repo")
    first = sh(root, str(BIN / "otcurate"), "run")
    return root, first, outs_md5(root)
