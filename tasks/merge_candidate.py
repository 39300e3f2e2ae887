"""Prefect task: the merge step of the serial and buffered strategies, on the slot's node."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from evomerge.backends.slot_worker import MergedCandidate, merge_to_folder
from evomerge.core.records import CandidateRequest
from evomerge.core.run_spec import RunSpec


@task(name="merge-candidate", cache_policy=NO_CACHE, retries=0, log_prints=False)
def merge_candidate(spec: RunSpec, request: CandidateRequest) -> MergedCandidate:
    return merge_to_folder(spec, request)
