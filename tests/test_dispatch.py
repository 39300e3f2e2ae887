"""Slot dispatch: every request runs, one at a time per slot, free slots take work at once."""

import pytest

from evomerge.backends.dispatch import dispatch_to_slots


class FakeFuture:
    def __init__(self, request, slot, finish_at):
        self.request, self.slot, self.finish_at = request, slot, finish_at

    def result(self):
        if self.request.startswith("crash"):
            raise RuntimeError(f"task of {self.request} crashed")
        return f"{self.request}@{self.slot}"


def run(requests, slots, durations):
    clock = {"now": 0.0}
    busy = {}
    log = []

    def submit(request, slot):
        assert slot not in busy, "a slot got two candidates at once"
        busy[slot] = request
        log.append((clock["now"], request, slot))
        return FakeFuture(request, slot, clock["now"] + durations[request])

    def wait_first(futures):
        first = min(futures, key=lambda f: (f.finish_at, f.request))
        clock["now"] = first.finish_at
        del busy[first.slot]
        return first

    results = dispatch_to_slots(
        requests, slots, submit, wait_first,
        on_result=lambda req, out, seconds: out, on_error=lambda req, exc: f"failed: {exc}",
    )
    return results, log, clock["now"]


def test_each_free_slot_takes_the_next_request_at_once():
    durations = {"a": 5, "b": 1, "c": 1, "d": 1}
    results, log, end = run(["a", "b", "c", "d"], ["s0", "s1"], durations)
    assert sorted(results) == ["a@s0", "b@s1", "c@s1", "d@s1"]
    assert end == 5  # s1 ran b, c, d while s0 ran a: no slot waited for another
    assert [(t, r) for t, r, _ in log] == [(0, "a"), (0, "b"), (1, "c"), (2, "d")]


def test_on_result_errors_stop_the_dispatch():
    def boom(request, outcome, seconds):
        raise RuntimeError("fatal configuration error")

    with pytest.raises(RuntimeError, match="fatal"):
        dispatch_to_slots(["a", "b"], ["s0"], lambda r, s: FakeFuture(r, s, 0), lambda fs: fs[0], boom, None)


def test_a_crashed_task_is_one_failed_candidate_and_its_slot_goes_on():
    results, log, _ = run(["a", "crash-b", "c"], ["s0"], {"a": 1, "crash-b": 1, "c": 1})
    assert results == ["a@s0", "failed: task of crash-b crashed", "c@s0"]


def test_no_slots_is_an_error():
    with pytest.raises(ValueError):
        dispatch_to_slots(["a"], [], None, None, None, None)
