"""The run's temporary Prefect server (otcurate_pipeline.services.temporary_prefect). Its
real start, the flow on it and its stop are asserted on the suite's first `otcurate run`
(tests/pipeline/test_e2e.py), which is the only run without PREFECT_API_URL."""

from __future__ import annotations

import os

from otcurate_pipeline import services


def test_temporary_prefect_starts_nothing_where_prefect_api_url_names_a_server(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    with services.temporary_prefect(tmp_path / "prefect.log") as server:
        assert server is None
        assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert not (tmp_path / "prefect.log").exists()
