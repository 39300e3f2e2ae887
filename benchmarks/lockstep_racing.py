"""Racing with a slot per candidate, simulated in one process (``benchmarks/search_quality.py``'s
system ``evomerge-racing-lockstep``).

On a cluster with at least a generation's worth of slots, every candidate of a generation runs at
once, so after each stage a candidate is compared with all of the others at that stage, not only
with those that ran before it; evaluated one after another (the benchmark's ``evomerge-racing``),
the first ``mu`` candidates of each generation can never stop. Here each candidate of a generation
runs ``SlotWorker.run`` in a thread of its own, and the board holds every candidate at a stage until
all of the generation's running candidates have published that stage: the stages advance in
lockstep. The one resident model is shared: a stage is scored under a lock, after the candidate's
merge is written into the model again if another candidate's is there (in memory a merge costs a
fraction of a stage; the benchmark counts items, not seconds). Scores, merges and the racing rule
are the product's own (``Racer``, ``outraced_by``); only the schedule is simulated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from evomerge.backends.race_board import RaceBoard
from evomerge.core.records import CandidateRequest


class LockstepBoard(RaceBoard):
    """A race board whose ``others`` waits until every running candidate of the generation has
    published as many stages as the caller (a candidate that finished or stopped no longer runs)."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()
        self._stages: dict[str, int] = {}
        self._running: set[str] = set()

    def begin(self, keys: list[str]) -> None:
        with self._changed:
            self._running = set(keys)
            self._stages = dict.fromkeys(keys, 0)

    def done(self, key: str) -> None:
        with self._changed:
            self._running.discard(key)
            self._changed.notify_all()

    def publish(self, generation: int, key: str, items) -> None:
        with self._changed:
            super().publish(generation, key, items)
            self._stages[key] = self._stages.get(key, 0) + 1
            self._changed.notify_all()

    def others(self, generation: int, key: str):
        with self._changed:
            mine = self._stages[key]
            self._changed.wait_for(lambda: all(self._stages[k] >= mine for k in self._running))
            return super().others(generation, key)


@contextmanager
def lockstep_runner(worker, record: Callable[[CandidateRequest, object], None]) -> Iterator[Callable]:
    """A batch runner (``run_search_loop``'s) that scores a generation's candidates in lockstep on
    ``worker`` (an in-memory ``SlotWorker`` whose racer has a ``LockstepBoard``); ``record(request,
    outcome)`` records each outcome, in the generation's order, once all are in. The worker is
    itself again when the context ends (the benchmark's worker serves other searches too)."""
    board: LockstepBoard = worker.racer.board
    resident, evaluator = worker.resident, worker.evaluator
    merge_into_model, score_items = resident.merge, evaluator.score_items
    model_lock, mine = threading.Lock(), threading.local()
    in_model: list[object] = [None]  # the merge configuration the resident model holds

    def merge(config) -> float:  # SlotWorker.run's merge: remembered, written when a stage is scored
        mine.config = config
        return 0.0

    def score_stage(lm, items):
        with model_lock:
            if in_model[0] is not mine.config:
                merge_into_model(mine.config)
                in_model[0] = mine.config
            return score_items(lm, items)

    resident.merge, evaluator.score_items = merge, score_stage

    def run_batch(phase, requests: list[CandidateRequest]) -> None:
        board.begin([r.key for r in requests])
        outcomes: dict[str, object] = {}

        def run(request: CandidateRequest) -> None:
            try:
                outcomes[request.key] = worker.run(request)
            finally:
                board.done(request.key)

        threads = [threading.Thread(target=run, args=(request,)) for request in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for request in requests:
            record(request, outcomes[request.key])

    try:
        yield run_batch
    finally:
        del resident.merge, evaluator.score_items  # the instance attributes set above
