"""The search loop, once: the evolve flow, the tests and the benchmarks all run this function.

    baselines -> [next batch -> evaluate it -> finish it -> observers] until a stopping rule
    fires -> held-out scores of the best candidates (when the search itself is over)

How a batch is evaluated is the caller's: the evolve flow fans it out over Ray slots in a Prefect
subflow, a test or a benchmark calls a slot in-process. Either way every result goes to
``session.record_outcome`` as it arrives, which records it and tells the searcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from evomerge.core.records import CandidateRequest, EvaluationOutcome
from evomerge.failpoints import failpoint
from evomerge.search_session import SearchSession

log = logging.getLogger("evomerge")


@dataclass(frozen=True)
class Phase:
    """What a batch is: a generation of the search, the baselines, or the held-out scores."""

    kind: Literal["generation", "baselines", "held-out"]
    generation: int | None = None

    @property
    def name(self) -> str:
        return f"generation-{self.generation}" if self.kind == "generation" else self.kind


# Evaluates the requests and hands every result to the session's record_outcome as it arrives.
BatchRunner = Callable[[Phase, list[CandidateRequest]], None]
# Barrier-free: evaluates what ``next_request()`` returns whenever a slot is free (None: nothing
# now, ask again after the next result), handing each result to ``on_result``; returns when
# nothing runs and nothing is left.
NextRequest = Callable[[], CandidateRequest | None]
OnResult = Callable[[CandidateRequest, EvaluationOutcome, float], object]
StreamRunner = Callable[[NextRequest, OnResult], None]


class Observer(Protocol):
    """Hears of each evaluated generation (Prefect artifacts, the terminal, wandb)."""

    def generation_done(self, generation: int, keys: Sequence[str]) -> None: ...

    def finish(self) -> None: ...


def run_search_loop(
    session: SearchSession,
    run_batch: BatchRunner,
    observers: Sequence[Observer] = (),
    logger: logging.Logger | logging.LoggerAdapter = log,
    run_stream: StreamRunner | None = None,
) -> str:
    """Run the search until a stopping rule fires; returns the reason (also in the summary).
    ``logger``: where the run's own lines go (the evolve flow passes its Prefect run logger).
    With ``--barrier-free``, the generations go through ``run_stream`` as one stream."""
    log = logger
    for note in session.restore_notes:
        log.warning(note)
    if session.records or session.generations_done:
        log.info(
            "storage path holds %d records and %d generation checkpoints: continuing from them",
            len(session.records),
            session.generations_done,
        )
    try:
        # What a user would pick by hand, scored first: a configuration error in the tasks (or
        # held-out tasks) shows here, before the search spends anything.
        if baselines := session.baseline_requests():
            run_batch(Phase("baselines"), baselines)
        if session.spec.options.barrier_free:
            if run_stream is None:
                raise ValueError("--barrier-free needs a stream runner")
            _run_stream(session, run_stream, observers, log)
            reason = session.should_stop() or session.stream_stalled()
        else:
            while (reason := session.should_stop()) is None:
                plan = session.next_batch()
                failpoint("after-ask")
                if plan.to_evaluate:
                    run_batch(Phase("generation", plan.generation), list(plan.to_evaluate))
                session.finish_batch(plan)
                if plan.to_evaluate:
                    for observer in observers:
                        observer.generation_done(plan.generation, plan.keys)
                best = session.best
                log.info(
                    "generation %d: %d evaluated, %d of %d evaluations spent, best fitness %s",
                    plan.generation,
                    len(plan.to_evaluate),
                    session.evaluations,
                    session.spec.options.max_fevals,
                    f"{best.score:.4f}" if best else "none",
                )
        # The search is over (not paused): score the best candidates on the held-out tasks.
        if session.search_finished and (held_out := session.held_out_requests()):
            run_batch(Phase("held-out"), held_out)
    finally:
        for observer in observers:
            observer.finish()
    session.finish(reason)
    log.info("%s: %s", "run paused" if session.paused else "search finished", reason)
    return reason


def _run_stream(session: SearchSession, run_stream: StreamRunner, observers: Sequence[Observer], log) -> None:
    """The generations without a barrier: each result is recorded and told as it arrives; a
    generation whose step completes is shown to the observers at once."""

    def on_result(request: CandidateRequest, outcome: EvaluationOutcome, seconds: float) -> None:
        session.record_outcome(request, outcome, seconds)
        _show_completed(session, observers, log)

    _show_completed(session, observers, log)  # steps completed from records while resuming
    run_stream(session.next_request, on_result)
    _show_completed(session, observers, log)


def _show_completed(session: SearchSession, observers: Sequence[Observer], log) -> None:
    while session.completed:
        generation, keys = session.completed.pop(0)
        session.generation_told(generation, keys)
        for observer in observers:
            observer.generation_done(generation, keys)
        best = session.best
        log.info(
            "generation %d told: %d of %d evaluations spent, best fitness %s",
            generation,
            session.evaluations,
            session.spec.options.max_fevals,
            f"{best.score:.4f}" if best else "none",
        )


def inline_runner(session: SearchSession, evaluate: Callable[[CandidateRequest], EvaluationOutcome]) -> BatchRunner:
    """A batch runner that evaluates each request in this process, one after the other (tests,
    benchmarks); ``evaluate`` is e.g. ``SlotWorker(spec, "slot-0").run``."""

    def run_batch(phase: Phase, requests: list[CandidateRequest]) -> None:
        for request in requests:
            started = time.perf_counter()
            outcome = evaluate(request)
            session.record_outcome(request, outcome, time.perf_counter() - started)

    return run_batch


def inline_stream_runner(evaluate: Callable[[CandidateRequest], EvaluationOutcome]) -> StreamRunner:
    """A stream runner with one slot in this process (tests, benchmarks)."""

    def run_stream(next_request: NextRequest, on_result: OnResult) -> None:
        while (request := next_request()) is not None:
            started = time.perf_counter()
            outcome = evaluate(request)
            on_result(request, outcome, time.perf_counter() - started)

    return run_stream
