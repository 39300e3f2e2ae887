"""Dispatch candidates to slots: each free slot takes the next candidate at once.

Generic over how a candidate is submitted and waited for, so the logic is tested without Prefect
or Ray; the generation flow passes Prefect task submission and a Ray wait.
"""

from __future__ import annotations

from collections import deque
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

R = TypeVar("R")


def dispatch_to_slots(
    requests: Sequence[Any],
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
    """
    if not slots:
        raise ValueError("no evaluation slots")
    free = deque(slots)
    pending = deque(requests)
    in_flight: dict[Any, tuple[Any, Any, float]] = {}
    results: list[R] = []
    try:
        while pending or in_flight:
            while free and pending:
                slot, request = free.popleft(), pending.popleft()
                in_flight[submit(request, slot)] = (request, slot, time.perf_counter())
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
    return results


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
