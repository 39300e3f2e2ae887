"""One run per storage path: refused while held, taken over when stale, released at the end."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from evomerge.backends.run_lease import LeaseHeldError, RunLease, read_lease
from evomerge.backends.run_store import RunStore


def test_a_second_run_is_refused_with_the_holder_named(tmp_path):
    store = RunStore(str(tmp_path))
    holder = rf"in use by another evomerge run: pid {os.getpid()} on {socket.gethostname()}"
    with RunLease(store), pytest.raises(LeaseHeldError, match=holder):
        RunLease(RunStore(str(tmp_path))).acquire()
    assert read_lease(store) is None, "released at the end"
    with RunLease(RunStore(str(tmp_path))) as again:
        assert again.taken_over is None


def test_the_lease_of_a_killed_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lease.json").write_text(
        json.dumps({"owner": "a" * 32, "host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()})
    )
    with RunLease(RunStore(str(tmp_path))) as lease:
        assert lease.taken_over is not None and lease.taken_over.pid == dead.pid
        assert read_lease(lease.store).owner == lease.owner


def test_a_lease_without_heartbeat_is_stale(tmp_path):
    (tmp_path / "lease.json").write_text(
        json.dumps({"owner": "b" * 32, "host": "another-host", "pid": 1, "heartbeat": time.time() - 120})
    )
    with RunLease(RunStore(str(tmp_path)), stale_after_seconds=60) as lease:
        assert lease.taken_over.host == "another-host"


def test_a_live_lease_on_another_host_is_respected(tmp_path):
    (tmp_path / "lease.json").write_text(
        json.dumps({"owner": "c" * 32, "host": "another-host", "pid": 1, "heartbeat": time.time()})
    )
    with pytest.raises(LeaseHeldError, match="pid 1 on another-host"):
        RunLease(RunStore(str(tmp_path))).acquire()


def test_the_heartbeat_is_renewed(tmp_path):
    store = RunStore(str(tmp_path))
    with RunLease(store, heartbeat_seconds=0.1):
        first = read_lease(store).heartbeat
        time.sleep(0.5)
        assert read_lease(store).heartbeat > first
