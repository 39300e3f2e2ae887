"""RunStore on a local folder: atomic, write-once records, keys that cannot escape."""

import json
import os
import uuid

import pytest

from evomerge.backends.run_store import RunStore, StorageError
from evomerge.core.records import CandidateRecord


def make_record(key="ab" * 12, score=0.5):
    return CandidateRecord(
        key=key, generation=0, index=0, vector=[0.1], parameters={"w": 0.1},
        merge_config={"merge_method": "linear"}, status="ok", score=score,
        metrics={"t": {"acc,none": 0.5}},
    )


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same contract, on a local folder and on a real S3 API (moto_server on loopback)."""
    if request.param == "local":
        return RunStore(str(tmp_path / "run"))
    request.getfixturevalue("s3_endpoint")
    return RunStore(f"s3://evomerge-test/{uuid.uuid4().hex}")


def test_records_round_trip_and_are_written_once(store):
    store.write_record(make_record())
    assert store.read_records()["ab" * 12].score == 0.5
    with pytest.raises(StorageError, match="written once"):
        store.write_record(make_record(score=0.9))
    assert store.read_records()["ab" * 12].score == 0.5


def test_writes_leave_no_temporary_files(tmp_path):
    store = RunStore(str(tmp_path))
    store.write_json("summary.json", {"a": 1})
    store.write_text("best_config.yaml", "merge_method: linear\n")
    assert sorted(os.listdir(tmp_path)) == ["best_config.yaml", "summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}


def test_keys_cannot_escape_the_storage_path(tmp_path):
    store = RunStore(str(tmp_path))
    with pytest.raises(StorageError):
        store.path("../outside.json")
    with pytest.raises(StorageError):
        store.record_path("../../etc/passwd")
    with pytest.raises(StorageError):
        store.scratch_dir("not-a-key/..")


def test_a_truncated_record_is_reported_by_name(store):
    store.write_record(make_record())
    path = store.path("records", f"{'ab' * 12}.json")
    store.fs.pipe_file(path, store.fs.cat_file(path)[:40])
    with pytest.raises(StorageError, match="cannot be read"):
        store.read_records()


def test_json_round_trip_and_missing_files(store):
    assert store.read_json("summary.json") is None
    store.write_json("summary.json", {"evaluations": 3})
    store.write_json("summary.json", {"evaluations": 4})
    assert store.read_json("summary.json") == {"evaluations": 4}
    store.write_generation(0, {"keys": ["a"]})
    store.write_generation(1, {"keys": ["b"]})
    assert [g["keys"] for g in store.read_generations()] == [["a"], ["b"]]
