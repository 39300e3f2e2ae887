"""RunStore on a local folder: atomic, write-once records, keys that cannot escape; on S3:
bounded retries while the endpoint is down."""

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid

import pytest

from evomerge.backends import run_store
from evomerge.backends.prefect_server import free_port
from evomerge.backends.run_store import RunStore, StorageError
from evomerge.core.records import CandidateRecord


def make_record(key="ab" * 12, score=0.5):
    return CandidateRecord(
        key=key,
        generation=0,
        index=0,
        vector=[0.1],
        parameters={"w": 0.1},
        merge_config={"merge_method": "linear"},
        status="ok",
        score=score,
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


def test_unreadable_records_are_moved_aside_and_reported_when_resuming(store):
    good, truncated, foreign = make_record("ab" * 12), make_record("cd" * 12), make_record("ef" * 12)
    for record in (good, truncated, foreign):
        store.write_record(record)
    path = store.path("records", f"{truncated.key}.json")
    store.fs.pipe_file(path, store.fs.cat_file(path)[:40])
    path = store.path("records", f"{foreign.key}.json")
    store.fs.pipe_file(path, foreign.model_copy(update={"format_version": 7}).model_dump_json().encode())
    notes = []
    assert list(store.read_records(on_unreadable=notes.append)) == [good.key]
    assert len(notes) == 2
    assert truncated.key in notes[0] and "truncated?" in notes[0] and "moved to" in notes[0]
    assert foreign.key in notes[1] and "format version 7" in notes[1]
    assert store.list_names("quarantine/records") == [f"{truncated.key}.json", f"{foreign.key}.json"]
    store.write_record(truncated)  # evaluated again: its key is free for a new record
    assert set(store.read_records()) == {good.key, truncated.key}


@pytest.mark.parametrize(
    "damaged",
    [b"\xff\xfe{not utf-8", b"[1, 2, 3]", b'{"key": 5, "score": "high"}'],
    ids=["not-utf8", "not-an-object", "wrong-types"],
)
def test_a_damaged_record_of_any_kind_is_quarantined_by_name(store, damaged):
    good, damaged_key = make_record("ab" * 12), "cd" * 12
    store.write_record(good)
    store.fs.pipe_file(store.path("records", f"{damaged_key}.json"), damaged)
    with pytest.raises(StorageError, match=f"record .*{damaged_key}.json cannot be read"):
        store.read_records()
    notes = []
    assert list(store.read_records(on_unreadable=notes.append)) == [good.key]
    (note,) = notes
    assert damaged_key in note and "moved to" in note
    assert store.list_names("quarantine/records") == [f"{damaged_key}.json"]


def test_json_round_trip_and_missing_files(store):
    assert store.read_json("summary.json") is None
    store.write_json("summary.json", {"evaluations": 3})
    store.write_json("summary.json", {"evaluations": 4})
    assert store.read_json("summary.json") == {"evaluations": 4}
    store.write_text("checkpoints/00001.json", "{}")
    store.write_text("checkpoints/00000.json", "{}")
    assert store.list_names("checkpoints") == ["00000.json", "00001.json"]
    assert store.list_names("nothing-here") == []


def test_a_full_disk_fails_clearly_and_keeps_the_previous_file(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path))
    real_fsync = os.fsync
    calls = []

    def fsync_until_the_disk_is_full(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(run_store.os, "fsync", fsync_until_the_disk_is_full)
    store.write_json("summary.json", {"evaluations": 3})
    with pytest.raises(StorageError, match=r"summary\.json: No space left on device"):
        store.write_json("summary.json", {"evaluations": 4})
    assert store.read_json("summary.json") == {"evaluations": 3}
    assert os.listdir(tmp_path) == ["summary.json"]


def s3_store_at(port, retry_delays):
    """A store whose S3 endpoint is 127.0.0.1:port, whether or not anything listens there."""
    return RunStore(
        f"s3://evomerge-test/{uuid.uuid4().hex}",
        storage_options={
            "endpoint_url": f"http://127.0.0.1:{port}",
            "key": "testing-key-id",
            "secret": "testing-secret",
            "client_kwargs": {"region_name": "us-east-1"},
        },
        retry_delays=retry_delays,
    )


@pytest.fixture
def evomerge_warnings(caplog, monkeypatch):
    # The CLI stops the "evomerge" logger propagating, which would hide it from caplog.
    monkeypatch.setattr(logging.getLogger("evomerge"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="evomerge")
    return caplog


def forward(listener, upstream_port):
    """Relay every connection to ``listener`` to the S3 endpoint on ``upstream_port``."""

    def relay(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # the other side closed
        finally:
            sink.close()

    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return  # the listener was closed: the test is over
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=relay, args=(source, sink), daemon=True).start()


def test_a_write_waits_for_s3_to_come_back(s3_endpoint, evomerge_warnings):
    # The endpoint "comes back" as a relay to the session's moto_server on this port: a fresh
    # moto_server would come up without the bucket, and a write landing before the test created
    # it would get NoSuchBucket, an answer that is rightly not retried.
    port = free_port()
    store = s3_store_at(port, retry_delays=(0.5, 1, 1, 1, 2))
    outcome = {}

    def write():
        try:
            store.write_json("summary.json", {"evaluations": 3})
            outcome["ok"] = True
        except StorageError as exc:
            outcome["error"] = exc

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(1.5)
    listener = socket.create_server(("127.0.0.1", port))
    moto_port = int(s3_endpoint.rsplit(":", 1)[1])
    threading.Thread(target=forward, args=(listener, moto_port), daemon=True).start()
    try:
        writer.join(timeout=30)
        assert outcome == {"ok": True}
        assert store.read_json("summary.json") == {"evaluations": 3}
        warnings = [r.getMessage() for r in evomerge_warnings.records if r.name == "evomerge"]
        assert warnings
        assert all("write s3://evomerge-test/" in w and "summary.json" in w for w in warnings)
        assert "attempt 1 of 6" in warnings[0]
        # A missing file is an answer: no retry, no warning.
        assert store.read_json("missing.json") is None
        assert len([r for r in evomerge_warnings.records if r.name == "evomerge"]) == len(warnings)
        assert "testing-secret" not in evomerge_warnings.text
    finally:
        listener.close()


def test_s3_that_stays_down_fails_after_the_last_retry(evomerge_warnings):
    store = s3_store_at(free_port(), retry_delays=(0.05, 0.05))
    started = time.monotonic()
    expected = r"could not write s3://evomerge-test/\w+/summary\.json: 3 attempts"
    with pytest.raises(StorageError, match=expected) as caught:
        store.write_json("summary.json", {"evaluations": 3})
    assert time.monotonic() - started < 5
    assert "run the same command again" in str(caught.value)
    assert caught.value.__cause__ is not None
    assert len([r for r in evomerge_warnings.records if r.name == "evomerge"]) == 2
