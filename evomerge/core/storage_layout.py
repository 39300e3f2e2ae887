"""Every name under a storage path, in one place (pure).

::

    run.json                  what search this path holds (fingerprint, config, options)
    records/<key>.json        one write-once record per evaluated candidate
    baselines/<key>.json      parents and the uniform merge, scored before the search
    held_out/<key>.json       baselines and the best candidates scored on held_out_tasks
    checkpoints/<n>.json      step n of the searcher as told (format: evomerge.core.checkpoint)
    quarantine/<folder>/      records that could not be read, moved aside at resume
    lease.json                which process runs the search now (evomerge.backends.run_lease)
    best_config.yaml          the best merge so far, a config ``mergekit-yaml`` takes as is
    summary.json              evaluations spent, generations, best fitness and metrics
    merged/<key>/             scratch folder of an on-disk merge (local paths; deleted after scoring)
    final_model/              the best merge, when --save-final-model
    final_model.json          which candidate final_model/ holds
    report.md, report.png     ``evomerge report``: per-task table and fitness plot

Paths are relative to the storage path, with ``/`` separators (the run store joins them to a
local folder or an object-store prefix).
"""

from __future__ import annotations

from typing import Literal

RUN_MANIFEST = "run.json"
SUMMARY = "summary.json"
BEST_CONFIG = "best_config.yaml"
LEASE = "lease.json"
FINAL_MODEL = "final_model"
FINAL_MODEL_MARKER = "final_model.json"
REPORT_MARKDOWN = "report.md"
REPORT_PLOT = "report.png"
CHECKPOINTS = "checkpoints"
QUARANTINE = "quarantine"
MERGED = "merged"

# Where a record lives: CMA-ES candidates, baselines, and held-out scores are kept apart.
RecordFolder = Literal["records", "baselines", "held_out"]
CANDIDATES: RecordFolder = "records"
BASELINES: RecordFolder = "baselines"
HELD_OUT: RecordFolder = "held_out"


def record_name(folder: RecordFolder, key: str) -> str:
    return f"{folder}/{key}.json"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINTS}/{step:05d}.json"


def quarantine_name(folder: str, file_name: str) -> str:
    return f"{QUARANTINE}/{folder}/{file_name}"


def scratch_name(key: str) -> str:
    return f"{MERGED}/{key}"
