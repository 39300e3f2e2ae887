"""When a search (or one run of it) stops (pure).

Two kinds of stop: the search itself is over (its evaluation budget is spent, or it converged),
or only this run is (its time budget, or its generation budget: ``--generations-per-run``, after
which the same command or the next scheduled flow run continues, "paused").

Converged: a searcher can settle where every vector it asks decodes to a merge already evaluated
(e.g. slerp t values past the clipping bounds). Such generations spend no budget, so without a
limit the loop would run (and write checkpoints) until pycma's step size turns into NaN; after
``IDLE_GENERATIONS_LIMIT`` of them in a row the search stops.
"""

from __future__ import annotations

from dataclasses import dataclass

IDLE_GENERATIONS_LIMIT = 10


@dataclass(frozen=True)
class StopDecision:
    reason: str
    paused: bool = False  # only this run stops; the search goes on in the next one


@dataclass
class SearchProgress:
    """The counters the rules read; the session keeps them current (derived from the store on
    resume, so a resumed run decides the same)."""

    evaluations: int = 0  # candidates recorded, over every run of the search
    generations_done: int = 0  # searcher steps taken, over every run
    idle_generations: int = 0  # consecutive steps whose candidates were all evaluated before
    generations_this_run: int = 0  # steps of this run that evaluated something
    evaluated_this_run: int = 0
    items_scored: int = 0  # --racing: task items scored by candidates, over every run


@dataclass(frozen=True)
class StoppingRules:
    max_fevals: int
    timeout: float | None = None  # seconds of this run
    generations_per_run: int | None = None
    max_items: int | None = None  # --racing's budget in items scored

    def budget_left(self, progress: SearchProgress) -> int:
        """Candidates that may still start: none once either budget is spent."""
        if self.max_items is not None and progress.items_scored >= self.max_items:
            return 0
        return max(0, self.max_fevals - progress.evaluations)

    def search_finished(self, progress: SearchProgress) -> bool:
        """The search itself is over (budget spent, or converged), not just this run."""
        return self.budget_left(progress) == 0 or progress.idle_generations >= IDLE_GENERATIONS_LIMIT

    def decide(self, progress: SearchProgress, elapsed_seconds: float) -> StopDecision | None:
        if progress.idle_generations >= IDLE_GENERATIONS_LIMIT:
            return StopDecision(
                f"search converged: the last {progress.idle_generations} generations asked only "
                f"merges already evaluated ({self.budget_left(progress)} of the budget left unspent)"
            )
        if self.max_items is not None and progress.items_scored >= self.max_items:
            return StopDecision(f"item budget spent ({progress.items_scored} of {self.max_items} items scored)")
        if self.budget_left(progress) == 0:
            return StopDecision(f"evaluation budget spent ({progress.evaluations} of {self.max_fevals})")
        if self.timeout is not None and elapsed_seconds > self.timeout:
            return StopDecision(f"time budget of this run spent ({self.timeout:.0f} s)")
        if self.generations_per_run is not None and progress.generations_this_run >= self.generations_per_run:
            return StopDecision(
                f"generation budget of this run spent ({self.generations_per_run}); run again to continue",
                paused=True,
            )
        return None
