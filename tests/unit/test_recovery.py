"""What the flow does after a failed stage (otcurate_pipeline.recovery), on a real DVC repo:
dvc.lock back as it was, outputs restored only from a cache that holds them, never deleted
otherwise, a full disk named as such, and temporaries swept on the next run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from otcurate_pipeline.flow import dvc
from otcurate_pipeline.recovery import cache_dir, recover, sweep, uncached

DVC_YAML = """stages:
  embed:
    cmd: python -m stages.embed --out data/embed
    outs:
    - data/embed
"""


@pytest.fixture
def repo(tmp_path):
    """A DVC repo whose one stage has committed (cached, locked) outputs."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc(tmp_path, "init", "-q").returncode == 0
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    out = tmp_path / "data" / "embed"
    out.mkdir(parents=True)
    (out / "a.bin").write_bytes(b"good outputs")
    proc = dvc(tmp_path, "commit", "-f", "embed")
    assert proc.returncode == 0, proc.stderr
    return tmp_path


def _lock(root: Path) -> str:
    return (root / "dvc.lock").read_text()


def test_a_failed_stage_gets_its_cached_outputs_back(repo):
    before = _lock(repo)
    (repo / "data" / "embed" / "a.bin").unlink()  # DVC removes outputs before it runs a stage
    r = recover(repo, "embed", before, "Traceback ... ValueError: boom", dvc)
    assert r.restored and "were restored from the DVC cache" in r.message
    assert (repo / "data" / "embed" / "a.bin").read_bytes() == b"good outputs"
    assert _lock(repo) == before


def test_a_full_disk_keeps_the_computed_outputs_and_the_old_lock(repo):
    before = _lock(repo)
    (repo / "data" / "embed" / "a.bin").write_bytes(b"fresh, not cached")
    # DVC wrote the new hashes into dvc.lock, then failed to copy the data into its cache
    (repo / "dvc.lock").write_text(before.replace("md5: ", "md5: 0", 1))
    tail = "ERROR: failed to reproduce 'embed': [Errno 28] No space left on device"
    r = recover(repo, "embed", before, tail, dvc)
    assert not r.restored
    assert "no space left on device while writing or caching data/embed: free at least" in r.message
    assert "dvc.lock was put back" in r.message
    assert (repo / "data" / "embed" / "a.bin").read_bytes() == b"fresh, not cached"
    assert _lock(repo) == before
    assert uncached(cache_dir(repo), yaml.safe_load(before)["stages"]["embed"]) == []


def test_outputs_the_cache_cannot_restore_are_kept_and_the_console_says_so(repo):
    before = _lock(repo)
    for f in cache_dir(repo).rglob("*"):
        if f.is_file() and not f.name.endswith(".dir"):
            f.unlink()
    (repo / "data" / "embed" / "a.bin").write_bytes(b"half written")
    r = recover(repo, "embed", before, "ValueError: boom", dvc)
    assert not r.restored
    assert (
        "could not restore the last outputs of 'embed': the DVC cache lacks data/embed" in r.message
    )
    assert (repo / "data" / "embed" / "a.bin").read_bytes() == b"half written"


def test_a_failed_restore_is_never_reported_as_done(repo, monkeypatch):
    before = _lock(repo)

    def failing(root, *args):
        return subprocess.CompletedProcess(args, 255, "", "ERROR: Permission denied: data")

    r = recover(repo, "embed", before, "OSError: [Errno 1] Operation not permitted", failing)
    assert not r.restored and "could not restore" in r.message and "Permission denied" in r.message


def test_another_dvc_process_holding_the_lock_means_hands_off(repo):
    before = _lock(repo)
    (repo / "dvc.lock").write_text(before + "# written by the other process\n")
    r = recover(repo, "embed", before, "ERROR: 'dvc.yaml' is busy, it is being blocked by", dvc)
    assert not r.restored and "changed nothing" in r.message
    assert _lock(repo).endswith("# written by the other process\n")


def test_sweep_removes_temporaries_of_failed_runs_only(repo):
    cache = cache_dir(repo)
    orphan = cache / "ab" / "cdef.0123.tmp"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    (repo / "data" / "embed.tmp-1a2b3c4d").mkdir()
    (repo / "data" / "embed.tmp-1a2b3c4d" / "part").write_bytes(b"x")
    (repo / "data" / "embedding-notes.txt").write_text("a user's file")
    gone = sweep(repo)
    assert sorted(p.name for p in gone) == ["cdef.0123.tmp", "embed.tmp-1a2b3c4d"]
    assert not orphan.exists() and not (repo / "data" / "embed.tmp-1a2b3c4d").exists()
    assert (repo / "data" / "embedding-notes.txt").exists()
    assert (repo / "data" / "embed" / "a.bin").exists()
    assert uncached(cache, yaml.safe_load(_lock(repo))["stages"]["embed"]) == []


def test_outputs_dvc_did_not_cache_are_kept_whatever_the_error(repo):
    """dvc repro exited 0 but the cache lacks the new outputs (here a quota, not ENOSPC):
    the computed outputs stay, never replaced by the old cached ones."""
    before = _lock(repo)
    (repo / "data" / "embed" / "a.bin").write_bytes(b"computed, cache refused it")
    (repo / "dvc.lock").write_text(before.replace("md5: ", "md5: 0", 1))
    r = recover(
        repo,
        "embed",
        before,
        "ERROR: failed to transfer ...: [Errno 13] Permission denied",
        dvc,
        ["data/embed"],
    )
    assert not r.restored and "the computed outputs were kept in place" in r.message
    assert (repo / "data" / "embed" / "a.bin").read_bytes() == b"computed, cache refused it"
    assert _lock(repo) == before


def test_a_failure_inside_recovery_never_hides_the_stage_failure(repo, monkeypatch):
    import otcurate_pipeline.recovery as rec

    def broken(root):
        raise OSError("cache unreadable")

    monkeypatch.setattr(rec, "cache_dir", broken)
    r = recover(repo, "embed", _lock(repo), "ValueError: boom", dvc)
    assert not r.restored and "could not check or restore the outputs of 'embed'" in r.message
    assert (repo / "data" / "embed" / "a.bin").exists()


def test_the_lock_reader_parses_dvc_lock_as_safe_load_does(repo):
    from otcurate_pipeline import layout

    text = _lock(repo)
    assert layout.load_yaml(text) == yaml.safe_load(text)
    assert layout.load_yaml(text)["stages"]["embed"]["outs"][0]["path"] == "data/embed"
    with pytest.raises(yaml.constructor.ConstructorError):  # safe: no Python objects
        layout.load_yaml("!!python/object/apply:os.getcwd []")
