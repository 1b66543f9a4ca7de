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


def test_an_api_url_in_the_active_prefect_profile_counts_as_configured(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert services.configured_api_url() is None  # no profiles.toml
    (tmp_path / "profiles.toml").write_text(
        'active = "work"\n[profiles.default]\n'
        '[profiles.work]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n'
    )
    assert services.configured_api_url() == "http://10.0.0.5:4200/api"
    with services.temporary_prefect(tmp_path / "prefect.log") as server:
        assert server is None  # the run goes to the user's server
    monkeypatch.setenv("PREFECT_PROFILE", "default")  # another profile, without one
    assert services.configured_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # the environment wins
    assert services.configured_api_url() == "http://127.0.0.1:4200/api"
