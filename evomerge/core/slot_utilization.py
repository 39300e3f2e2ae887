"""How busy a run kept its evaluation slots (pure): slot-busy seconds / (slots x search wall).

A slot is busy while its worker works on a candidate (the record's ``timings.total``: merge,
load and evaluation in the slot's process; with serial and buffered, the evaluation, the merge
being another task's); the search wall runs from the first submission (``finished_at`` minus
``round_trip``) to the last result. Orchestration between a slot's candidates counts as idle. Computed over the candidates one run evaluated (a resumed search's downtime is no
idle slot), with the slots that run used (those named in its records). With a generation
barrier, slots idle while a generation's last candidates finish: ``benchmarks/slot_utilization.py``
measures how much on a simulated clock.

>>> from evomerge.core.records import CandidateRecord, Timings
>>> def done(slot, start, end):
...     return CandidateRecord(key=f"{slot}{start}", generation=0, index=0, vector=[], parameters={},
...                            merge_config={}, status="ok", slot=slot,
...                            timings=Timings(total=end - start, round_trip=end - start), finished_at=end)
>>> slot_utilization([done("a", 0, 10), done("b", 0, 5), done("b", 5, 8)])  # b idles 2 s of 20
0.9
"""

from __future__ import annotations

from collections.abc import Iterable

from evomerge.core.records import CandidateRecord


def slot_utilization(records: Iterable[CandidateRecord]) -> float | None:
    """None until a candidate with timings is in."""
    timed = [r for r in records if r.timings.round_trip > 0 and r.finished_at > 0]
    if not timed:
        return None
    start = min(r.finished_at - r.timings.round_trip for r in timed)
    wall = max(r.finished_at for r in timed) - start
    slots = len({r.slot for r in timed})
    return sum(r.timings.total for r in timed) / (slots * wall) if wall > 0 else None
