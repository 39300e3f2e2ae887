"""Slot dispatch: every request runs, one at a time per slot, free slots take work at once."""

from itertools import pairwise

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
        requests,
        slots,
        submit,
        wait_first,
        on_result=lambda req, out, seconds: out,
        on_error=lambda req, exc: f"failed: {exc}",
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


def run_pipelined(requests, slots, merge_seconds, eval_seconds, lookahead):
    """Drive dispatch_pipelined on a simulated clock; returns (results, intervals, end time)."""
    from evomerge.backends.dispatch import dispatch_pipelined

    clock = {"now": 0.0}
    intervals = []  # (slot, stage, request, start, end)

    class Timed:
        def __init__(self, value, stage, request, slot, seconds):
            self.value, self.stage, self.request, self.slot = value, stage, request, slot
            self.start, self.finish_at = clock["now"], clock["now"] + seconds

        def result(self):
            if self.request.startswith("bad") and self.stage == "merge":
                raise RuntimeError("merge task crashed")
            return self.value

    def submit_merge(request, slot):
        return Timed(f"merged:{request}", "merge", request, slot, merge_seconds)

    def submit_evaluate(request, slot, merged):
        assert merged == f"merged:{request}"
        return Timed(f"{request}@{slot}", "evaluate", request, slot, eval_seconds)

    def wait_first(futures):
        first = min(futures, key=lambda f: (f.finish_at, f.request))
        clock["now"] = first.finish_at
        intervals.append((first.slot, first.stage, first.request, first.start, first.finish_at))
        return first

    results = dispatch_pipelined(
        requests,
        slots,
        submit_merge,
        submit_evaluate,
        wait_first,
        on_result=lambda req, out, seconds: out,
        on_error=lambda req, exc: f"failed: {exc}",
        lookahead=lookahead,
    )
    return results, intervals, clock["now"]


def evaluations_of(intervals, slot):
    return sorted((start, end) for s, stage, _, start, end in intervals if s == slot and stage == "evaluate")


def test_serial_merges_then_evaluates_one_candidate_at_a_time_per_slot():
    results, intervals, end = run_pipelined(list("abcd"), ["s0", "s1"], merge_seconds=1, eval_seconds=3, lookahead=0)
    assert sorted(results) == ["a@s0", "b@s1", "c@s0", "d@s1"]
    for slot in ("s0", "s1"):
        spans = sorted((start, end) for s, _, _, start, end in intervals if s == slot)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in pairwise(spans)), "nothing overlaps on a slot"
    assert end == 8  # per slot: merge 1 + evaluate 3, twice


def test_buffered_merges_ahead_so_a_slot_does_not_wait_for_merges():
    results, intervals, end = run_pipelined(list("abcdef"), ["s0", "s1"], merge_seconds=1, eval_seconds=3, lookahead=1)
    assert sorted(results) == ["a@s0", "b@s1", "c@s0", "d@s1", "e@s0", "f@s1"]
    for slot in ("s0", "s1"):
        evaluations = evaluations_of(intervals, slot)
        assert len(evaluations) == 3
        gaps = [b_start - a_end for (_, a_end), (b_start, _) in pairwise(evaluations)]
        assert gaps == [0, 0], "after the first merge, the slot evaluates back to back"
    assert end == 1 + 3 * 3  # serial would take 3 x (1 + 3) = 12


def test_a_crashed_merge_task_is_one_failed_candidate():
    results, _, _ = run_pipelined(["a", "bad", "c"], ["s0"], merge_seconds=1, eval_seconds=1, lookahead=1)
    assert sorted(results) == ["a@s0", "c@s0", "failed: merge task crashed"]


def test_a_stream_asks_for_work_whenever_a_slot_is_free_and_again_after_each_result():
    """dispatch_to_slots: ``None`` means nothing now; a result can make work (a generation told
    opens the next), which the free slots then take."""
    from evomerge.backends.dispatch import dispatch_to_slots

    made = iter(["a", "b"])
    unlocked = []  # "c" exists only once "a" is back
    asked = []

    def next_request():
        request = next(made, None) or (unlocked.pop() if unlocked else None)
        asked.append(request)
        return request

    def on_result(request, outcome, seconds):
        if request == "a":
            unlocked.append("c")
        return outcome

    clock = {"now": 0.0}

    def wait_first(futures):
        first = min(futures, key=lambda f: (f.finish_at, f.request))
        clock["now"] = first.finish_at
        return first

    results = dispatch_to_slots(
        next_request,
        ["s0", "s1", "s2"],
        lambda r, s: FakeFuture(r, s, clock["now"] + {"a": 1, "b": 5, "c": 1}[r]),
        wait_first,
        on_result,
        lambda r, exc: None,
    )
    assert results == ["a@s0", "c@s2", "b@s1"]
    assert asked[:3] == ["a", "b", None], "the third slot found nothing and waited"
    assert clock["now"] == 5
