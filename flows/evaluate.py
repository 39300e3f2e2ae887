"""Flow ``evaluate``: one batch (a generation, the baselines, or the held-out scores) fanned out
over the evaluation slots on a RayTaskRunner. Its runs are named after the batch:
``generation-<n>``, ``baselines``, ``held-out``.

Strategies (``--strategy``), each task tagged with its strategy, slot and node in the Prefect UI:

- ``pool``: one ``merge-and-evaluate`` task per candidate; the slot's actor merges and scores it.
- ``serial``: a ``merge-candidate`` task pinned to the slot's node (Ray node affinity, hard), then
  an ``evaluate-candidate`` task on the slot; the slot waits while its next candidate merges.
- ``buffered``: the same two tasks, with one merge per slot running ahead of its evaluation.

A slot takes its next candidate as soon as it is free; each result is recorded (and told to the
searcher) the moment it arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from prefect import flow, tags
from prefect_ray.context import remote_options

from evomerge.backends.dispatch import dispatch_pipelined, dispatch_to_slots, wait_for_first
from evomerge.backends.prefect_artifacts import publish_batch
from evomerge.backends.slot_pool import CandidatePolicy, SlotRef
from evomerge.core.records import CandidateRequest, EvaluationOutcome, error_summary
from evomerge.search_loop import Phase
from evomerge.search_session import SearchSession
from evomerge.tasks.evaluate_candidate import evaluate_candidate
from evomerge.tasks.merge_and_evaluate import merge_and_evaluate
from evomerge.tasks.merge_candidate import merge_candidate

log = logging.getLogger("evomerge")


@contextmanager
def _placed(strategy: str, slot: SlotRef, pin_to_node: bool = False):
    # Tasks that call a slot's actor ask Ray for no resources: the actor holds the slot's CPU or
    # GPU. A merge task of serial/buffered runs on the slot's node (hard node affinity: the
    # folder it writes is read there) and uses the slot's compute, which the dispatcher keeps
    # for this candidate.
    placement = {"num_cpus": 0}
    if pin_to_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.node_id, soft=False)
    with (
        tags(f"strategy:{strategy}", f"slot:{slot.name}", f"node:{slot.node}:{slot.node_id[:8]}"),
        remote_options(**placement),
    ):
        yield


def _started(request: CandidateRequest, slot: SlotRef) -> str:
    """Log the start; returns the name of the candidate's task runs."""
    if request.kind == "baseline":
        what, name = f"baseline: {request.label}", request.label.replace(" ", "-")
    else:
        what, name = f"candidate {request.generation}.{request.index}", f"{request.generation}.{request.index}"
    if request.held_out:
        what, name = f"held out: {what}", f"held-out-{name}"
    log.info("%s %s started on %s", what, request.key, slot.name)
    return name


def _crashed_task_outcome(request: CandidateRequest, exc: Exception) -> EvaluationOutcome:
    return EvaluationOutcome(status="failed", error=error_summary(exc))


def dispatch(
    session: SearchSession,
    requests: list[CandidateRequest] | Callable[[], CandidateRequest | None],
    slots: list[SlotRef],
    on_result: Callable[[CandidateRequest, EvaluationOutcome, float], Any] | None = None,
) -> list:
    """Run the requests on the slots by the run's strategy; each result is recorded as it
    arrives (``on_result``, by default the session's ``record_outcome``). ``requests`` may be a
    ``next_request`` callable (``--barrier-free``): each free slot asks it for work."""
    options = session.spec.options
    policy = CandidatePolicy.from_options(options)
    on_result = on_result or session.record_outcome
    if options.strategy == "pool":

        def submit(request, slot):
            name = _started(request, slot)
            with _placed("pool", slot):
                return merge_and_evaluate.with_options(task_run_name=f"candidate-{name}").submit(request, slot, policy)

        return dispatch_to_slots(
            requests,
            slots,
            submit=submit,
            wait_first=wait_for_first,
            on_result=on_result,
            on_error=_crashed_task_outcome,
        )

    merged_names: dict[str, str] = {}

    def submit_merge(request, slot):
        name = merged_names[request.key] = _started(request, slot)
        with _placed(options.strategy, slot, pin_to_node=True):
            return merge_candidate.with_options(task_run_name=f"merge-{name}").submit(session.spec, request)

    def submit_evaluate(request, slot, merged):
        with _placed(options.strategy, slot):
            return evaluate_candidate.with_options(task_run_name=f"evaluate-{merged_names[request.key]}").submit(
                request, slot, merged, policy
            )

    return dispatch_pipelined(
        requests,
        slots,
        submit_merge=submit_merge,
        submit_evaluate=submit_evaluate,
        wait_first=wait_for_first,
        on_result=on_result,
        on_error=_crashed_task_outcome,
        lookahead=0 if options.strategy == "serial" else 1,
    )


@flow(name="evaluate", flow_run_name="{phase.name}")
def evaluate(phase: Phase, requests: list[CandidateRequest], slots: list[SlotRef], session_id: str) -> None:
    session = SearchSession.active(session_id)
    publish_batch(session, phase, dispatch(session, requests, slots))


# The loop's callbacks of a barrier-free stream, by session id: flow parameters are stored as
# JSON by Prefect, so they travel as the session's id (as the session itself does).
_STREAMS: dict[str, tuple[Callable[[], CandidateRequest | None], Callable[..., Any]]] = {}


@flow(name="evaluate", flow_run_name="generations")
def evaluate_stream(slots: list[SlotRef], session_id: str) -> None:
    """``--barrier-free``: every generation of this run in one flow run, each free slot taking
    the session's next request (a candidate of the open generation, or one drawn ahead)."""
    session = SearchSession.active(session_id)
    next_request, on_result = _STREAMS[session_id]
    dispatch(session, next_request, slots, on_result)


def stream_runner(evaluate_stream_flow, slots_of: Callable[[], list[SlotRef]], session_id: str):
    """The search loop's ``run_stream`` for an ``evaluate_stream`` flow (with its task runner)."""

    def run_stream(next_request, on_result) -> None:
        _STREAMS[session_id] = (next_request, on_result)
        try:
            evaluate_stream_flow(slots_of(), session_id)
        finally:
            _STREAMS.pop(session_id, None)

    return run_stream
