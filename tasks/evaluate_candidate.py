"""Prefect task: the evaluation step of the serial and buffered strategies, on the slot that
owns the merged folder's node."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from evomerge.backends.slot_pool import CandidatePolicy, SlotRef, run_on_slot
from evomerge.backends.slot_worker import MergedCandidate
from evomerge.core.records import CandidateRequest, EvaluationOutcome


@task(name="evaluate-candidate", cache_policy=NO_CACHE, retries=0, log_prints=False)
def evaluate_candidate(
    request: CandidateRequest, slot: SlotRef, merged: MergedCandidate, policy: CandidatePolicy
) -> EvaluationOutcome:
    return run_on_slot(slot, request, policy, merged)
