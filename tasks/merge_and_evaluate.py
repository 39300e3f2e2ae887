"""Prefect task: merge and score one candidate on its slot (pool strategy)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from evomerge.backends.slot_pool import CandidatePolicy, SlotRef, run_on_slot
from evomerge.core.records import CandidateRequest, EvaluationOutcome


# NO_CACHE: Prefect's default cache key includes the flow-run id and would hash every input;
# evomerge's own idempotence is the candidate key in the run store.
@task(name="merge-and-evaluate", cache_policy=NO_CACHE, retries=0, log_prints=False)
def merge_and_evaluate(request: CandidateRequest, slot: SlotRef, policy: CandidatePolicy) -> EvaluationOutcome:
    return run_on_slot(slot, request, policy)
