"""What an idle evaluation slot runs next (pure): the open generation's next suggestion, or, when
they are all out and the search runs without a generation barrier, one drawn ahead for the next
generation; ``None`` while it must wait for results.

The feed also records the order results were told in (``told``): with the same seed and the same
order, a barrier-free search is the same search.

>>> from evomerge.core.searcher import CmaEsSearcher
>>> feed = SuggestionFeed(CmaEsSearcher([0.5, 0.5], 0.2, seed=1, popsize=4), budget=6, barrier_free=True)
>>> out = [feed.next() for _ in range(6)]  # six idle slots
>>> [(s.generation, s.index) for s in out]
[(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
>>> feed.next() is None  # the budget is spent
True
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from evomerge.core.searcher import Searcher, SearchStep, Suggestion


class SuggestionFeed:
    """``on_generation_asked(generation)``: more suggestions to hand out right after the
    generation's own (the session's: those a resumed search draws ahead again)."""

    def __init__(
        self,
        searcher: Searcher,
        budget: int,
        barrier_free: bool,
        on_generation_asked: Callable[[int], list[Suggestion]] | None = None,
    ):
        self.searcher = searcher
        self.budget = budget  # suggestions handed out, at most
        self.barrier_free = barrier_free
        self.handed_out = 0
        self.told: list[int] = []  # suggestion ids in the order their results were told
        self._queue: deque[Suggestion] = deque()
        self._on_generation_asked = on_generation_asked

    def next(self) -> Suggestion | None:
        if self.handed_out >= self.budget:
            return None
        if not self._queue:
            asked = self.searcher.ask()  # [] while a generation is open
            self._queue.extend(asked)
            if asked and self._on_generation_asked is not None:
                self._queue.extend(self._on_generation_asked(asked[0].generation))
        if self._queue:
            suggestion: Suggestion | None = self._queue.popleft()
        else:
            suggestion = self.searcher.ask_ahead() if self.barrier_free else None
        self.handed_out += suggestion is not None
        return suggestion

    def tell(self, suggestion_id: int, score: float | None) -> SearchStep | None:
        self.told.append(suggestion_id)
        return self.searcher.tell(suggestion_id, score)
