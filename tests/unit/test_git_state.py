"""`tracking.git_state`: the commit a run is recorded against, and whether tracked files
differ from it (all of them, or those under given pathspecs)."""

from __future__ import annotations

import subprocess

from otcurate_pipeline.tracking import git_state


def test_git_state_reads_the_commit_and_changes_under_the_given_paths(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("a = 1\n")
    (tmp_path / "notes.md").write_text("x\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=tmp_path, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "notes.md").write_text("y\n")
    (tmp_path / "untracked.py").write_text("")
    assert git_state(tmp_path) == (head, True)
    assert git_state(tmp_path, "src", "*.py") == (head, False)  # untracked files never count
    (tmp_path / "src" / "a.py").write_text("a = 2\n")
    assert git_state(tmp_path, "src") == (head, True)
    assert git_state(tmp_path / "src" / "..", "bench") == (head, False)


def test_git_state_outside_a_repository_is_none_and_dirty(tmp_path):
    assert git_state(tmp_path) == ("none", True)
