"""``summary.json``: what a search has spent and found so far (pure).

Built from the records (the store's truth) and the session's counters, so a resumed run writes
the same summary as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evomerge.core.config import TaskConfiguration
from evomerge.core.records import CandidateRecord
from evomerge.core.stopping import SearchProgress

TIMING_PARTS = ("merge", "load", "evaluate", "total", "round_trip")


def mean_timings(records: Mapping[str, CandidateRecord]) -> dict[str, float | None]:
    """Mean seconds per successful candidate, by part."""
    ok = [r for r in records.values() if r.status == "ok"]
    return {part: float(np.mean([getattr(r.timings, part) for r in ok])) if ok else None for part in TIMING_PARTS}


def items_spent(records: Mapping[str, CandidateRecord]) -> dict[str, Any]:
    """--racing: task items the candidates scored (``items_scored``) and what scoring each of the
    same candidates on every item would have been (``items_full``); None without racing."""
    raced = [r.race for r in records.values() if r.race is not None]
    if not raced:
        return {"items_scored": None, "items_full": None, "stopped_early": None}
    return {
        "items_scored": sum(r.items_scored for r in raced),
        "items_full": sum(r.items_full for r in raced),
        "stopped_early": sum(r.stopped for r in raced),
    }


def run_summary(
    *,
    storage_path: str,
    fingerprint: str,
    max_fevals: int,
    popsize: int,
    dimension: int,
    tasks: Sequence[TaskConfiguration],
    records: Mapping[str, CandidateRecord],
    best: CandidateRecord | None,
    progress: SearchProgress,
    finished_reason: str | None,
    paused: bool,
    elapsed_seconds: float,
    comparison: dict[str, Any],
    slot_utilization: float | None = None,
) -> dict[str, Any]:
    return {
        "storage_path": storage_path,
        "fingerprint": fingerprint,
        "evaluations": len(records),
        "max_fevals": max_fevals,
        "failed_evaluations": sum(r.status == "failed" for r in records.values()),
        "generations": progress.generations_done,
        "popsize": popsize,
        "dimension": dimension,
        "best_fitness": best.score if best else None,
        "best_key": best.key if best else None,
        "best_generation": best.generation if best else None,
        "best_metrics": {t.name: {t.metric: best.metrics.get(t.name, {}).get(t.metric)} for t in tasks}
        if best
        else None,
        "best_parameters": best.parameters if best else None,
        "mean_seconds_per_candidate": mean_timings(records),
        "finished_reason": finished_reason,
        "paused": paused,
        "elapsed_seconds": elapsed_seconds,
        # Of this run's candidates (evomerge.core.slot_utilization); None before the first.
        "slot_utilization": slot_utilization,
        **items_spent(records),
        "comparison": comparison,
    }
