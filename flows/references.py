"""Flow ``references``: scores that are not CMA-ES candidates, fanned out like a generation.

Two phases of the evolve flow use it: ``baselines`` (before the search: each parent model and the
uniform merge, on the search's tasks and on the held-out tasks) and ``held-out`` (after it: the
best candidates on the held-out tasks). Same slots, same strategies, same records; the results
are kept apart from the search (``baselines/``, ``held_out/``), never told to CMA-ES and never
counted in ``--max-fevals``.
"""

from __future__ import annotations

from prefect import flow

from evomerge.backends.prefect_artifacts import publish_references
from evomerge.backends.slot_pool import SlotRef
from evomerge.core.records import CandidateRecord, CandidateRequest
from evomerge.search_session import SearchSession
from flows.generation import dispatch


@flow(name="references", flow_run_name="{phase}")
def references(
    phase: str,
    requests: list[CandidateRequest],
    slots: list[SlotRef],
    session_id: str,
) -> list[CandidateRecord]:
    session = SearchSession.active(session_id)
    records = dispatch(session, requests, slots)
    publish_references(session, phase, records)
    return records
