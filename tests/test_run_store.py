"""RunStore on a local folder: atomic, write-once records, keys that cannot escape."""

import json
import os

import pytest

from evomerge.backends.run_store import RunStore, StorageError
from evomerge.core.records import CandidateRecord


def make_record(key="ab" * 12, score=0.5):
    return CandidateRecord(
        key=key, generation=0, index=0, vector=[0.1], parameters={"w": 0.1},
        merge_config={"merge_method": "linear"}, status="ok", score=score,
        metrics={"t": {"acc,none": 0.5}},
    )


def test_records_round_trip_and_are_written_once(tmp_path):
    store = RunStore(str(tmp_path / "run"))
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


def test_a_truncated_record_is_reported_by_name(tmp_path):
    store = RunStore(str(tmp_path))
    store.write_record(make_record())
    path = tmp_path / "records" / f"{'ab' * 12}.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(StorageError, match="cannot be read"):
        store.read_records()
