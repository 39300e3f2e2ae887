"""RunStore: everything a run keeps, under one storage path (a local folder or ``s3://...``).

The layout (every name under a storage path) is declared in ``evomerge.core.storage_layout``.

Every write is atomic: a temporary file then ``os.replace`` locally, a whole-object PUT on object
stores, so a reader never sees half a file. Reading never executes anything: JSON and YAML only.

Object-store calls are retried with a bounded exponential backoff (``retry_delays``), because a
network blip or an endpoint restart should not end a search that took hours. Local disk errors are
not retried (a full disk does not heal in seconds); both end in a ``StorageError`` that says what
failed and that the previous files are untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import fsspec
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError
from fsspec.implementations.local import LocalFileSystem

from evomerge.core.records import RECORD_FORMAT_VERSION, CandidateRecord
from evomerge.core.storage_layout import CANDIDATES, RecordFolder, quarantine_name, record_name, scratch_name
from evomerge.failpoints import failpoint

_KEY = re.compile(r"^[0-9a-f]{8,64}$")
# mkstemp creates files 0600; a finished file gets the mode an ordinary open() would give it.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK

logger = logging.getLogger("evomerge")
T = TypeVar("T")

DEFAULT_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
# Before a run starts nothing is at stake: an object store that does not answer within a few
# seconds is reported at once (a running search waits the full schedule above).
PREFLIGHT_RETRY_DELAYS = (0.5, 1.0)
# The store answered; asking again gets the same answer. (All are OSError subclasses.)
_ANSWERS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
# botocore's connection errors (EndpointConnectionError when nothing listens, ConnectionClosedError,
# ReadTimeoutError) are not all OSError subclasses, and s3fs passes them through untranslated.
_TRANSIENT = (OSError, BotoConnectionError, HTTPClientError)


class StorageError(RuntimeError):
    pass


class DamagedFileError(StorageError):
    """A stored file whose bytes are not what evomerge writes (not UTF-8 text, or not JSON):
    each reader takes its documented path (a record is quarantined, a checkpoint ends the
    replay, a lease holds nothing); where none exists, the message names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} is damaged: {reason}")
        self.reason = reason


class RunStore:
    def __init__(
        self,
        storage_path: str,
        storage_options: dict[str, Any] | None = None,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    ):
        self.storage_path = storage_path
        self.retry_delays = tuple(retry_delays)
        options = dict(storage_options or {})
        if fsspec.utils.get_protocol(storage_path) in ("s3", "s3a"):
            # botocore retries every request itself (legacy mode: 5 attempts with its own backoff),
            # so a down endpoint took 6-12 s per call before our schedule even started; one attempt
            # per call makes ``retry_delays`` the one schedule. Explicit config_kwargs still win.
            options["config_kwargs"] = {"retries": {"total_max_attempts": 1}, **options.get("config_kwargs", {})}
        self.fs, root = fsspec.core.url_to_fs(storage_path, **options)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def _retrying(self, what: str, path: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried on transient object-store errors; ``what`` and ``path``
        name it in the warnings and in the final ``StorageError``."""
        if self.is_local:
            return fn(*args, **kwargs)
        delays = iter(self.retry_delays)
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except _ANSWERS:
                raise
            except _TRANSIENT as exc:
                url = self.fs.unstrip_protocol(path)
                delay = next(delays, None)
                if delay is None:
                    raise StorageError(
                        f"could not {what} {url}: {attempt} attempts over "
                        f"{time.monotonic() - started:.1f} s failed ({type(exc).__name__}: {exc}). "
                        "The previous files are untouched; run the same command again once the "
                        "storage is reachable."
                    ) from exc
                logger.warning(
                    "%s %s failed (attempt %d of %d, %s: %s); retrying in %g s",
                    what,
                    url,
                    attempt,
                    len(self.retry_delays) + 1,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                time.sleep(delay)

    def check_writable(self) -> None:
        """Before any work: the storage path is a folder this process can write (created if
        missing), or an object-store prefix it can write with the credentials it has. A probe
        file is written and removed; every failure is one StorageError naming the path and the fix."""
        where = self.root if self.is_local else self.fs.unstrip_protocol(self.root)
        probe = self.path(f".evomerge-write-probe-{os.getpid()}")
        if self.is_local:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise StorageError(f"--storage-path {where} is a file; give a folder (it is created if missing)")
            # The folders made for the probe are removed again: a run refused later (a task name,
            # say) leaves nothing behind; the run itself makes them when it writes.
            made = []
            folder = os.path.abspath(self.root)
            while not os.path.exists(folder):
                made.append(folder)
                folder = os.path.dirname(folder)
            try:
                os.makedirs(self.root, exist_ok=True)
                with open(probe, "wb"):
                    pass
                os.remove(probe)
                for folder in made:
                    os.rmdir(folder)
            except OSError as exc:
                raise StorageError(
                    f"--storage-path {where} cannot be written ({exc.strerror or exc}: "
                    f"{exc.filename or self.root}); choose a folder this user can create and write in"
                ) from exc
            return
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        try:
            self._retrying("write", probe, self.fs.pipe_file, probe, b"")
            self._retrying("remove", probe, self.fs.rm, probe)
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StorageError(
                f"--storage-path {where}: no credentials for the object store ({exc}). Set AWS "
                "credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, in "
                "evomerge's environment (and AWS_ENDPOINT_URL for an S3 API other than AWS)"
            ) from exc
        except PermissionError as exc:
            raise StorageError(
                f"--storage-path {where}: the object store refused a write ({exc}); check the "
                "bucket's name and that the credentials may write under this prefix"
            ) from exc
        except FileNotFoundError as exc:
            raise StorageError(
                f"--storage-path {where}: the bucket does not exist ({exc}); create it or fix the path"
            ) from exc

    # --- paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        for part in parts:
            if part.startswith("/") or ".." in part.split("/"):
                raise StorageError(f"refusing a storage key outside the storage path: {part!r}")
        return "/".join([self.root, *parts])

    def record_path(self, key: str, folder: RecordFolder = CANDIDATES) -> str:
        if not _KEY.match(key):
            raise StorageError(f"invalid candidate key {key!r}")
        return self.path(record_name(folder, key))

    def scratch_dir(self, key: str) -> str:
        """Where an on-disk merge of ``key`` is written (a local folder, deleted after scoring)."""
        if not _KEY.match(key):
            raise StorageError(f"invalid candidate key {key!r}")
        if self.is_local:
            return os.path.join(self.root, scratch_name(key))
        return os.path.join(tempfile.gettempdir(), "evomerge-merged", key)

    # --- raw I/O ---------------------------------------------------------------------------
    def write_text(self, rel: str, text: str, failpoint_name: str | None = None) -> None:
        """Write ``rel`` whole or not at all. ``failpoint_name`` marks the write for
        fault-injection tests: locally the point sits halfway through the temporary file."""
        self.write_bytes(rel, text.encode(), failpoint_name)

    def write_bytes(self, rel: str, data: bytes, failpoint_name: str | None = None) -> None:
        target = self.path(rel)
        if not self.is_local:
            if failpoint_name:
                failpoint(failpoint_name)
            self._retrying("write", target, self.fs.pipe_file, target, data)
            return
        try:
            _write_local_atomically(target, data, failpoint_name)
        except OSError as exc:
            raise StorageError(
                f"could not write {target}: {exc.strerror or exc}. The previous file is untouched; "
                "free the space (or fix the folder) and run the same command again."
            ) from exc

    def read_text(self, rel: str) -> str | None:
        """The file's text; None when it does not exist. DamagedFileError when its bytes are
        not UTF-8 (evomerge writes only UTF-8 JSON and YAML)."""
        target = self.path(rel)
        try:
            data = self._retrying("read", target, self.fs.cat_file, target)
        except FileNotFoundError:
            return None
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise DamagedFileError(target, f"byte {exc.start} of {len(data)} is not UTF-8 text") from exc

    def write_json(self, rel: str, value: Any) -> None:
        self.write_text(rel, json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n")

    def read_json(self, rel: str) -> Any | None:
        text = self.read_text(rel)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DamagedFileError(self.path(rel), f"not valid JSON ({exc}); it may be truncated") from exc

    # --- records ---------------------------------------------------------------------------
    def write_record(self, record: CandidateRecord, folder: RecordFolder = CANDIDATES) -> None:
        """Write a candidate's record once; a second write of the same key is refused.
        ``folder``: ``records`` (searcher candidates), ``baselines`` or ``held_out``."""
        target = self.record_path(record.key, folder)  # validates the key
        if self._retrying("check", target, self.fs.exists, target):
            raise StorageError(f"record {record.key} already exists; records are written once")
        self.write_text(record_name(folder, record.key), record.model_dump_json(indent=2) + "\n")

    def remove(self, rel: str) -> None:
        target = self.path(rel)
        self._retrying("remove", target, self.fs.rm, target)

    def put_file(self, local: str, rel: str) -> None:
        target = self.path(rel)
        self._retrying("upload", target, self.fs.put_file, local, target)

    def _list(self, directory: str) -> list[str]:
        # Object-store clients cache listings; a store must see what other processes wrote.
        self.fs.invalidate_cache(directory)
        return self._retrying("list", directory, self.fs.ls, directory, detail=False)

    def read_records(
        self, on_unreadable: Callable[[str], None] | None = None, folder: RecordFolder = CANDIDATES
    ) -> dict[str, CandidateRecord]:
        """Every readable record in ``folder`` by key.

        A record that cannot be used (truncated, another format version, under another key's
        name) raises StorageError, or, with ``on_unreadable``, is moved to
        ``quarantine/<folder>/`` and reported through it: its candidate is then evaluated again.
        """
        directory = self.path(folder)
        try:
            names = self._list(directory)
        except FileNotFoundError:
            return {}
        records = {}
        for name in sorted(names):
            base = name.rsplit("/", 1)[-1]
            if not base.endswith(".json") or base.startswith("."):
                continue
            key = base[: -len(".json")]
            try:
                text = self.read_text(f"{folder}/{base}")  # == record_name(folder, key)
                record = CandidateRecord.model_validate_json(text or "")
                problem = None
            except DamagedFileError as exc:
                problem = f"cannot be read ({exc.reason})"
            except ValueError as exc:
                problem = f"cannot be read ({str(exc).splitlines()[0]}; truncated?)"
            if problem is None and record.format_version != RECORD_FORMAT_VERSION:
                problem = (
                    f"has format version {record.format_version}; this evomerge reads version {RECORD_FORMAT_VERSION}"
                )
            if problem is None and record.key != key:
                problem = f"holds key {record.key}, not {key}"
            if problem is None:
                records[key] = record
                continue
            where = self.fs.unstrip_protocol(name)
            if on_unreadable is None:
                raise StorageError(f"record {where} {problem}")
            aside = self.set_aside(f"{folder}/{base}")
            on_unreadable(
                f"record {where} {problem}; moved to {self.fs.unstrip_protocol(aside)} "
                "and its candidate will be evaluated again if the search needs it"
            )
        return records

    def set_aside(self, rel: str) -> str:
        """Move ``rel`` (``<folder>/<file>``) to ``quarantine/<folder>/``, never over an earlier
        file set aside there; returns where it went. Nothing is deleted."""
        folder, _, file_name = rel.rpartition("/")
        aside = self.path(quarantine_name(folder, file_name))
        if self._retrying("check", aside, self.fs.exists, aside):
            aside = self.path(quarantine_name(folder, f"{time.time_ns()}-{file_name}"))
        if self.is_local:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
        source = self.path(rel)
        self._retrying("move", source, self.fs.mv, source, aside)
        return aside

    def list_names(self, rel: str) -> list[str]:
        """File names directly under ``rel`` (no temporary files); [] when it does not exist."""
        try:
            names = self._list(self.path(rel))
        except FileNotFoundError:
            return []
        return sorted(n.rsplit("/", 1)[-1] for n in names if not n.rsplit("/", 1)[-1].startswith("."))

    def local_path(self, rel: str) -> str | None:
        """The filesystem path of ``rel`` for local stores (None for object stores)."""
        return self.path(rel) if self.is_local else None


def _write_local_atomically(target: str, data: bytes, failpoint_name: str | None = None) -> None:
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            if failpoint_name:
                half = len(data) // 2
                f.write(data[:half])
                f.flush()
                os.fsync(f.fileno())
                failpoint(failpoint_name)
                data = data[half:]
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
