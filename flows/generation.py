"""Flow ``generation``: one CMA-ES generation, fanned out over the slots on a RayTaskRunner.

Each candidate is a ``merge-and-evaluate`` task tagged with its strategy, slot and node (visible
in the Prefect UI); a slot takes the next candidate as soon as it is free. Each result is
recorded the moment it arrives.
"""

from __future__ import annotations

import logging

from prefect import flow, tags
from prefect_ray.context import remote_options

from evomerge.backends.dispatch import dispatch_to_slots, wait_for_first
from evomerge.backends.prefect_artifacts import publish_candidates
from evomerge.backends.slot_pool import CandidatePolicy, SlotRef
from evomerge.core.records import CandidateRecord, CandidateRequest, EvaluationOutcome, error_summary
from evomerge.search_session import SearchSession
from tasks.merge_and_evaluate import merge_and_evaluate


def _submitter(policy: CandidatePolicy):
    def submit(request: CandidateRequest, slot: SlotRef):
        logging.getLogger("evomerge").info(
            "candidate %d.%d %s started on %s", request.generation, request.index, request.key, slot.name
        )
        # The task only waits on its slot's actor, which holds the slot's CPU or GPU: it asks
        # Ray for no resources of its own.
        with tags("strategy:pool", f"slot:{slot.name}", f"node:{slot.node}"), remote_options(num_cpus=0):
            return merge_and_evaluate.with_options(
                task_run_name=f"candidate-{request.generation}.{request.index}"
            ).submit(request, slot, policy)

    return submit


def _crashed_task_outcome(request: CandidateRequest, exc: Exception) -> EvaluationOutcome:
    return EvaluationOutcome(status="failed", error=error_summary(exc))


@flow(name="generation", flow_run_name="generation-{generation}")
def generation(
    generation: int,
    requests: list[CandidateRequest],
    slots: list[SlotRef],
    session_id: str,
) -> list[CandidateRecord]:
    session = SearchSession.active(session_id)
    records = dispatch_to_slots(
        requests, slots, submit=_submitter(CandidatePolicy.from_options(session.spec.options)), wait_first=wait_for_first,
        on_result=session.record_outcome, on_error=_crashed_task_outcome,
    )
    publish_candidates(session, generation, records)
    return records
