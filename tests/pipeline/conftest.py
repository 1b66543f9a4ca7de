"""The scratch repo the pipeline tests share: one real first run (DVC, Prefect, MLflow) on
tiny params, reused by test_e2e and test_faults (each test leaves it consistent)."""

from __future__ import annotations

import pytest
from otcurate_support import BIN, SharedPrefect, SharedStageWorker, make_scratch, outs_md5, sh


@pytest.fixture(scope="session", autouse=True)
def shared_prefect(tmp_path_factory):
    """The session's Prefect server and stage worker for the flow runs (`SharedPrefect`,
    `SharedStageWorker`), stopped at the end."""
    SharedPrefect.start(tmp_path_factory.mktemp("prefect-server"))
    SharedStageWorker.start(tmp_path_factory.mktemp("stage-worker"))
    try:
        yield
    finally:
        try:
            SharedStageWorker.stop()
        finally:
            SharedPrefect.stop()


@pytest.fixture(scope="session")
def scratch(tmp_path_factory):
    """(repo root, the first `otcurate run`'s result, the md5 of every output after it).
    The first run starts its own temporary Prefect server (no PREFECT_API_URL) and its own
    stage worker (no OTCURATE_STAGE_WORKER), as a user's first run does; the runs after it
    use the session's server and stage worker."""
    root = make_scratch(tmp_path_factory.mktemp("e2e") / "repo")
    first = sh(root, str(BIN / "otcurate"), "run", shared_prefect=False, stage_worker=False)
    return root, first, outs_md5(root)
