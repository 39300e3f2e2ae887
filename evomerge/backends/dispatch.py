"""Dispatch candidates to slots: each free slot takes the next candidate at once.

Generic over how a candidate is submitted and waited for, so the logic is tested without Prefect
or Ray; the generation flow passes Prefect task submission and a Ray wait.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

R = TypeVar("R")


def dispatch_to_slots(
    requests: Sequence[Any] | Callable[[], Any | None],
    slots: Sequence[Any],
    submit: Callable[[Any, Any], Any],
    wait_first: Callable[[list[Any]], Any],
    on_result: Callable[[Any, Any, float], R],
    on_error: Callable[[Any, Exception], Any],
) -> list[R]:
    """Run every request on some slot, at most one per slot at a time.

    ``submit(request, slot)`` returns a future; ``wait_first(futures)`` returns one finished
    future; ``on_result(request, outcome, seconds)`` is called as each finishes, with the seconds
    from submission to result (its exceptions stop the dispatch, with the futures still in
    flight cancelled). A future that raises (its task crashed, not the candidate failed) becomes
    the outcome ``on_error(request, exception)``: one broken task is one failed candidate.

    ``requests`` may be a ``next_request`` callable, for requests made while others run
    (``--barrier-free``): each free slot calls it and runs what it returns; ``None`` means nothing
    now (it is asked again after the next result, which may have made work: a completed
    generation opens the next). The dispatch ends when nothing runs and nothing is left to run.
    """
    next_request = _puller(requests)
    if not slots:
        raise ValueError("no evaluation slots")
    free = deque(slots)
    in_flight: dict[Any, tuple[Any, Any, float]] = {}
    results: list[R] = []
    try:
        while True:
            while free and (request := next_request()) is not None:
                slot = free.popleft()
                in_flight[submit(request, slot)] = (request, slot, time.perf_counter())
            if not in_flight:
                return results
            done = wait_first(list(in_flight))
            request, slot, submitted = in_flight.pop(done)
            free.append(slot)
            try:
                outcome = done.result()
            except Exception as exc:
                outcome = on_error(request, exc)
            results.append(on_result(request, outcome, time.perf_counter() - submitted))
    finally:
        for future in in_flight:
            _cancel(future)


def dispatch_pipelined(
    requests: Sequence[Any] | Callable[[], Any | None],
    slots: Sequence[Any],
    submit_merge: Callable[[Any, Any], Any],
    submit_evaluate: Callable[[Any, Any, Any], Any],
    wait_first: Callable[[list[Any]], Any],
    on_result: Callable[[Any, Any, float], R],
    on_error: Callable[[Any, Exception], Any],
    lookahead: int,
) -> list[R]:
    """Serial and buffered strategies: a merge task, then the slot's evaluation of its output.

    A candidate is given to a slot when its merge starts (the merge task runs on the slot's node,
    which then holds the folder), and is evaluated by that slot once merged. ``lookahead`` is how
    many candidates may be merged or merging for a slot while it evaluates: 0 is ``serial`` (a
    slot waits for each merge), 1 or more is ``buffered`` (merges run ahead, so once the pipeline
    is full a slot waits for a merge only when merging is slower than evaluating).
    ``submit_merge(request, slot)`` and ``submit_evaluate(request, slot, merged)`` return
    futures; ``on_result(request, outcome, seconds)`` gets the seconds from the start of the
    merge to the result; a future that raises becomes ``on_error(request, exception)``.
    ``requests`` may be a ``next_request`` callable, as for ``dispatch_to_slots``.
    """
    if not slots:
        raise ValueError("no evaluation slots")
    next_request = _puller(requests)
    pending: deque = deque()  # taken from next_request, not yet given to a slot

    def take() -> bool:
        if not pending and (request := next_request()) is not None:
            pending.append(request)
        return bool(pending)

    merged_ready: dict[Any, deque] = {slot: deque() for slot in slots}
    merging = dict.fromkeys(slots, 0)
    evaluating = dict.fromkeys(slots, False)
    in_flight: dict[Any, tuple[str, Any, Any, float]] = {}
    results: list[R] = []

    def fill(slot, ahead: int) -> None:
        capacity = ahead + (0 if evaluating[slot] else 1)
        while merging[slot] + len(merged_ready[slot]) < capacity and take():
            request = pending.popleft()
            in_flight[submit_merge(request, slot)] = ("merge", request, slot, time.perf_counter())
            merging[slot] += 1
        if not evaluating[slot] and merged_ready[slot]:
            request, merged, started = merged_ready[slot].popleft()
            in_flight[submit_evaluate(request, slot, merged)] = ("evaluate", request, slot, started)
            evaluating[slot] = True

    try:
        while True:
            # Every slot gets its next candidate before any slot gets one to merge ahead.
            for ahead in range(lookahead + 1):
                for slot in slots:
                    fill(slot, ahead)
            if not in_flight:
                break
            done = wait_first(list(in_flight))
            stage, request, slot, started = in_flight.pop(done)
            if stage == "merge":
                merging[slot] -= 1
            else:
                evaluating[slot] = False
            try:
                value = done.result()
            except Exception as exc:
                results.append(on_result(request, on_error(request, exc), time.perf_counter() - started))
                continue
            if stage == "merge":
                merged_ready[slot].append((request, value, started))
            else:
                results.append(on_result(request, value, time.perf_counter() - started))
    finally:
        for future in in_flight:
            _cancel(future)
    return results


def _puller(requests: Sequence[Any] | Callable[[], Any | None]) -> Callable[[], Any | None]:
    """``requests`` as a ``next_request`` callable (a sequence is handed out in order)."""
    if callable(requests):
        return requests
    queued = deque(requests)
    return lambda: queued.popleft() if queued else None


def wait_for_first(futures: list[Any]) -> Any:
    """The first finished of some PrefectRayFutures (waits on their Ray object refs)."""
    import ray

    by_ref = {f.wrapped_future: f for f in futures}
    done, _ = ray.wait(list(by_ref), num_returns=1)
    return by_ref[done[0]]


def _cancel(future: Any) -> None:
    ref = getattr(future, "wrapped_future", None)
    if ref is None:
        return
    try:
        import ray

        ray.cancel(ref, force=False)
    except Exception:  # best effort: the run is stopping anyway
        pass
