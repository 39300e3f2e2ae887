"""``run.json``: which search a storage path holds. One search per path; a run with other
search-shaping settings is refused before any work, and the same settings continue it."""

from __future__ import annotations

import time

from evomerge.backends.run_store import DamagedFileError, RunStore
from evomerge.core.run_spec import RunSpec
from evomerge.core.storage_layout import RUN_MANIFEST


class StorageMismatchError(RuntimeError):
    pass


def check_storage_path(spec: RunSpec, store: RunStore | None = None) -> bool:
    """Whether the storage path already holds this search; raises if it holds another one."""
    store = store or RunStore(spec.storage_path)
    try:
        manifest = store.read_json(RUN_MANIFEST)
        if manifest is not None and not isinstance(manifest, dict):
            raise DamagedFileError(store.path(RUN_MANIFEST), "it holds no JSON object")
        if manifest is not None and not isinstance(manifest.get("fingerprint"), str):
            raise DamagedFileError(store.path(RUN_MANIFEST), "it names no search (no fingerprint)")
    except DamagedFileError as exc:
        raise StorageMismatchError(
            f"{exc}. This file records which search the storage path holds. Restore it from a copy, "
            f"or delete it and run the same command again: it is written anew from this command's "
            "settings, and the checkpoints, which carry the search's fingerprint, are replayed only "
            "if they belong to that same search (a record is reused wherever the search asks its merge)"
        ) from exc
    if manifest is None:
        return False
    fingerprint = spec.fingerprint()
    if manifest.get("fingerprint") != fingerprint:
        begun_with = (manifest.get("options") or {}).get("searcher", "cma-es")  # 0.1 had no choice
        if begun_with != spec.options.searcher:
            raise StorageMismatchError(
                f"storage path {spec.storage_path} holds a search begun with --searcher {begun_with}"
                + (" (the default before evomerge 0.3)" if begun_with == "cma-es" else "")
                + f", and this run asks for --searcher {spec.options.searcher}: add --searcher "
                f"{begun_with} to continue it, or use a new --storage-path"
            )
        raise StorageMismatchError(
            f"storage path {spec.storage_path} holds another search (fingerprint "
            f"{manifest.get('fingerprint')}, this one {fingerprint}): the config, seed, "
            "sigma0, popsize or searcher differ. Use a new --storage-path, or the original "
            "settings to continue that search"
        )
    return True


def ensure_manifest(spec: RunSpec, store: RunStore) -> None:
    """Write ``run.json`` for a new search; check it for an existing one."""
    if check_storage_path(spec, store):
        return
    space = spec.search_space()
    store.write_json(
        RUN_MANIFEST,
        {
            "fingerprint": spec.fingerprint(),
            "config": spec.config.model_dump(mode="json"),
            "options": spec.options.model_dump(mode="json"),
            "models": spec.models.model_dump(mode="json"),
            "dimension": space.dimension,
            "parameter_labels": space.labels(),
            "created_at": time.time(),
        },
    )
