"""One run per storage path: a lease file with an owner and a heartbeat.

``lease.json`` names the owner (host, pid, run id) and the time of its last heartbeat, which a
background thread renews every ``heartbeat_seconds``. Another run on the same path is refused
with a message naming the holder, unless the lease is stale: its heartbeat is older than
``stale_after_seconds``, or its owner is a process of this host that no longer exists (a run
killed with SIGKILL). A stale lease is taken over, with a message saying whose it was.

Object stores have no atomic create-if-absent here, so two runs started within the same second
on one ``s3://`` path can both believe they won; the read-back after writing catches the common
case. Local paths use an exclusive create for a fresh lease.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from evomerge.backends.run_store import DamagedFileError, RunStore
from evomerge.core.storage_layout import LEASE


class LeaseHeldError(RuntimeError):
    pass


@dataclass
class LeaseInfo:
    owner: str
    host: str
    pid: int
    heartbeat: float

    def describe(self, now: float) -> str:
        return f"pid {self.pid} on {self.host} (run {self.owner[:8]}, heartbeat {now - self.heartbeat:.0f} s ago)"


def read_lease(store: RunStore) -> LeaseInfo | None:
    # A torn, damaged or foreign file holds nothing: treated as absent (and overwritten).
    try:
        raw = store.read_text(LEASE)
        if not raw:
            return None
        data = json.loads(raw)
        return LeaseInfo(str(data["owner"]), str(data["host"]), int(data["pid"]), float(data["heartbeat"]))
    except (DamagedFileError, ValueError, KeyError, TypeError):
        return None


def lease_is_stale(lease: LeaseInfo, stale_after_seconds: float, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if now - lease.heartbeat > stale_after_seconds:
        return True
    if lease.host == socket.gethostname():
        try:
            os.kill(lease.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


class RunLease:
    def __init__(
        self,
        store: RunStore,
        heartbeat_seconds: float = 10.0,
        stale_after_seconds: float = 60.0,
    ):
        self.store = store
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_after_seconds = stale_after_seconds
        self.owner = uuid.uuid4().hex
        self.taken_over: LeaseInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_free(self) -> None:
        """Raise LeaseHeldError when a live run holds the storage path."""
        held = read_lease(self.store)
        if held is not None and held.owner != self.owner and not lease_is_stale(held, self.stale_after_seconds):
            raise LeaseHeldError(
                f"storage path {self.store.storage_path} is in use by another evomerge run: "
                f"{held.describe(time.time())}. Wait for it to finish, stop it, or use another "
                f"--storage-path (a lease whose heartbeat is older than {self.stale_after_seconds:.0f} s "
                "is taken over)"
            )

    def acquire(self) -> RunLease:
        self.check_free()
        self.taken_over = read_lease(self.store)
        self._write(exclusive=self.taken_over is None)
        time.sleep(0.05)
        current = read_lease(self.store)
        if current is None or current.owner != self.owner:
            raise LeaseHeldError(
                f"storage path {self.store.storage_path} was taken by another run at the same moment"
                + (f": {current.describe(time.time())}" if current else "")
            )
        self._thread = threading.Thread(target=self._beat, name="evomerge-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = read_lease(self.store)
        if current is not None and current.owner == self.owner:
            self.store.remove(LEASE)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _write(self, exclusive: bool = False) -> None:
        text = json.dumps(
            {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        )
        path = self.store.local_path(LEASE)
        if exclusive and path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError as exc:
                if read_lease(self.store) is not None:
                    raise LeaseHeldError(
                        f"storage path {self.store.storage_path} was taken by another run at the same moment"
                    ) from exc
                # A file that holds no lease (torn, damaged) is no owner: overwritten below.
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                return
        self.store.write_text(LEASE, text)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                current = read_lease(self.store)
                if current is not None and current.owner != self.owner:
                    return  # taken over after we looked stale; the other run owns the path now
                self._write()
            except Exception:  # a missed heartbeat is retried; a long outage makes us look stale
                continue
