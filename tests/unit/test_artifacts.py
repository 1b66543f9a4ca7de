import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from otcurate.io import atomic_dir
from otcurate_pipeline import artifacts


def test_scores_round_trip_and_the_reader_checks_the_uids(tmp_path):
    with atomic_dir(tmp_path / "detect") as out:
        artifacts.write_scores(out, ["a", "b", "c"], [0.9, 0.1, 0.5], [False, True, False])
    got = artifacts.read_scores(tmp_path / "detect", ["a", "b", "c"])
    assert got.uids == ["a", "b", "c"] and got.flagged() == {"b"}
    np.testing.assert_array_equal(got.score, [0.9, 0.1, 0.5])
    assert got.score.dtype == np.float64 and got.noisy.dtype == bool
    with pytest.raises(
        artifacts.Mismatch, match=r"detect does not match data/embed .*rerun detect"
    ):
        artifacts.read_scores(tmp_path / "detect", ["a", "c", "b"], against="data/embed")


def test_scores_with_extra_columns_keep_the_detect_schema_first(tmp_path):
    artifacts.write_scores(tmp_path, ["x"], [0.2], [True], {"index": pa.array([7], pa.int64())})
    schema = pq.read_schema(tmp_path / artifacts.SCORES)
    assert schema.names == ["uid", "score", "noisy", "index"]
    plain = tmp_path / "plain"
    plain.mkdir()
    artifacts.write_scores(plain, ["x"], [0.2], [True])
    assert pq.read_schema(plain / artifacts.SCORES) == pa.schema(list(schema)[:3])
    assert artifacts.read_scores(tmp_path).uids == ["x"]


def test_subset_and_detector_round_trip(tmp_path):
    artifacts.write_subset(tmp_path, ["b", "a"], [1.0, 2.0], [0.3, 0.4])
    sub = artifacts.read_subset(tmp_path)
    assert sub.uids == ["b", "a"] and sub.weight.tolist() == [1.0, 2.0]
    meta, tensors = {"method": "infoot", "cutoff": 0.5}, {"plan": torch.ones(2, 3)}
    artifacts.write_detector(tmp_path, meta, tensors)
    got_meta, got_tensors = artifacts.read_detector(tmp_path)
    assert got_meta == meta and torch.equal(got_tensors["plan"], tensors["plan"])
    (tmp_path / "none").mkdir()
    artifacts.write_detector(tmp_path / "none", meta, {})  # no fitted plan: no tensors file
    assert artifacts.read_detector(tmp_path / "none") == (meta, {})
    with pytest.raises(FileNotFoundError):
        artifacts.read_detector(tmp_path / "missing")
