"""RunStore: everything a run keeps, under one storage path (a local folder or ``s3://...``).

Layout::

    run.json                  what run this path holds (fingerprint, config, options)
    records/<key>.json        one write-once record per evaluated candidate
    generations/<n>.json      asked vectors, keys and told scores of each finished generation
    best_config.yaml          the best merge so far, a config ``mergekit-yaml`` takes as is
    summary.json              evaluations spent, generations, best fitness and metrics
    merged/<key>/             scratch folder of an on-disk merge (local paths; deleted after scoring)
    final_model/              the best merge, when --save-final-model

Every write is atomic: a temporary file then ``os.replace`` locally, a whole-object PUT on object
stores, so a reader never sees half a file. Reading never executes anything: JSON and YAML only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from evomerge.core.records import CandidateRecord

_KEY = re.compile(r"^[0-9a-f]{8,64}$")
# mkstemp creates files 0600; a finished file gets the mode an ordinary open() would give it.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


class StorageError(RuntimeError):
    pass


class RunStore:
    def __init__(self, storage_path: str, storage_options: dict[str, Any] | None = None):
        self.storage_path = storage_path
        self.fs, root = fsspec.core.url_to_fs(storage_path, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    # --- paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        for part in parts:
            if part.startswith("/") or ".." in part.split("/"):
                raise StorageError(f"refusing a storage key outside the storage path: {part!r}")
        return "/".join([self.root, *parts])

    def record_path(self, key: str) -> str:
        if not _KEY.match(key):
            raise StorageError(f"invalid candidate key {key!r}")
        return self.path("records", f"{key}.json")

    def scratch_dir(self, key: str) -> str:
        """Where an on-disk merge of ``key`` is written (a local folder, deleted after scoring)."""
        if not _KEY.match(key):
            raise StorageError(f"invalid candidate key {key!r}")
        if self.is_local:
            return os.path.join(self.root, "merged", key)
        return os.path.join(tempfile.gettempdir(), "evomerge-merged", key)

    # --- raw I/O ---------------------------------------------------------------------------
    def write_text(self, rel: str, text: str) -> None:
        target = self.path(rel)
        data = text.encode()
        if self.is_local:
            directory = os.path.dirname(target)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, _FILE_MODE)
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(target, data)

    def read_text(self, rel: str) -> str | None:
        target = self.path(rel)
        try:
            with self.fs.open(target, "rb") as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, value: Any) -> None:
        self.write_text(rel, json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n")

    def read_json(self, rel: str) -> Any | None:
        text = self.read_text(rel)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{self.path(rel)} is not valid JSON ({exc}); it may be truncated") from exc

    # --- records ---------------------------------------------------------------------------
    def write_record(self, record: CandidateRecord) -> None:
        """Write a candidate's record once; a second write of the same key is refused."""
        rel = f"records/{record.key}.json"
        self.record_path(record.key)  # validates the key
        if self.fs.exists(self.path(rel)):
            raise StorageError(f"record {record.key} already exists; records are written once")
        self.write_text(rel, record.model_dump_json(indent=2) + "\n")

    def _list(self, directory: str) -> list[str]:
        # Object-store clients cache listings; a store must see what other processes wrote.
        self.fs.invalidate_cache(directory)
        return self.fs.ls(directory, detail=False)

    def read_records(self) -> dict[str, CandidateRecord]:
        directory = self.path("records")
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
            text = self.read_text(f"records/{base}")
            try:
                record = CandidateRecord.model_validate_json(text or "")
            except ValueError as exc:
                raise StorageError(f"record {name} cannot be read ({exc})") from exc
            if record.key != key:
                raise StorageError(f"record {name} holds key {record.key}, not {key}")
            records[key] = record
        return records

    # --- generations -----------------------------------------------------------------------
    def write_generation(self, generation: int, data: dict[str, Any]) -> None:
        self.write_json(f"generations/{generation:05d}.json", data)

    def read_generations(self) -> list[dict[str, Any]]:
        directory = self.path("generations")
        try:
            names = sorted(self._list(directory))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.endswith(".json") and not base.startswith("."):
                out.append(self.read_json(f"generations/{base}"))
        return out

    def local_path(self, rel: str) -> str | None:
        """The filesystem path of ``rel`` for local stores (None for object stores)."""
        return self.path(rel) if self.is_local else None
