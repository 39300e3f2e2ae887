"""--save-final-model: merge the best configuration into ``final_model/`` at the end."""

from __future__ import annotations

import os
import tempfile

from evomerge.backends.merger_disk import DiskMerger
from evomerge.backends.run_store import DamagedFileError
from evomerge.core.storage_layout import FINAL_MODEL, FINAL_MODEL_MARKER
from evomerge.search_session import SearchSession


def save_final_model(session: SearchSession) -> str | None:
    """Merge the best candidate into ``final_model/``; nothing to do when it already holds it.
    Returns the folder, or None when there is no successful candidate."""
    best = session.best
    if best is None:
        return None
    store = session.store
    try:
        marker = store.read_json(FINAL_MODEL_MARKER)
    except DamagedFileError:
        marker = None  # which candidate final_model/ holds is unknown: merged again
    if isinstance(marker, dict) and marker.get("key") == best.key:
        return store.path(FINAL_MODEL)
    merger = DiskMerger(session.spec.options, use_cuda=False)
    target = store.local_path(FINAL_MODEL)
    if target is not None:
        merger.merge(best.merge_config, target)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            merger.merge(best.merge_config, tmp)
            for root, _, files in os.walk(tmp):
                for name in files:
                    local = os.path.join(root, name)
                    store.put_file(local, f"{FINAL_MODEL}/{os.path.relpath(local, tmp)}")
    store.write_json(FINAL_MODEL_MARKER, {"key": best.key, "score": best.score})
    return store.path(FINAL_MODEL)
