import pyarrow as pa
import pytest

from otcurate.io import atomic_dir, atomic_file, dumps_json, write_parquet


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "a.txt").write_text("second, half written")
            raise RuntimeError("crash")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left
    with atomic_dir(out) as d:
        (d / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_atomic_file_keeps_old_content_on_error(tmp_path):
    f = tmp_path / "m.json"
    f.write_text("old")
    with pytest.raises(ValueError):
        with atomic_file(f, "w") as fh:
            fh.write("new")
            raise ValueError
    assert f.read_text() == "old"


def test_json_and_parquet_are_byte_deterministic(tmp_path):
    assert dumps_json({"b": 1, "a": [1.5, 2]}) == dumps_json({"a": [1.5, 2], "b": 1})
    t = pa.table({"uid": ["a", "b"], "x": [1.0, 2.0]})
    write_parquet(tmp_path / "1.parquet", t)
    write_parquet(tmp_path / "2.parquet", t)
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()


def test_non_finite_metrics_become_null():
    assert (
        dumps_json({"x": float("nan"), "y": [float("inf")]})
        == '{\n  "x": null,\n  "y": [\n    null\n  ]\n}\n'
    )
