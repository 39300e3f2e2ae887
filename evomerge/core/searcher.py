"""Searchers: what proposes candidate vectors and learns from their scores (pure).

The protocol follows Ray Tune's ``Searcher`` and optuna's samplers: the searcher knows nothing of
execution. ``ask()`` returns the suggestions it wants evaluated now (each with an id), possibly
none while it waits for results; ``tell(id, score)`` reports one result at a time, as it arrives,
``None`` for a failed candidate. When a searcher has what it needs to move on (CMA-ES: every
candidate of its generation), ``tell`` returns the ``SearchStep`` it took: plain data that a
checkpoint stores, and that ``replay`` takes again on a new searcher of the same seed, checking
bit for bit that it asks the same vectors and ends in the same state (no optimizer object is
ever serialised; no pickle).

Without a generation barrier: while the open generation's last results are out, an idle slot
calls ``ask_ahead()`` and gets a vector drawn now, from the current distribution, that becomes
one of the next generation's (CMA-ES: injected into it with pycma's ``inject``); once the next
generation holds all but one of its vectors, the one after it. How many were
drawn ahead during a generation depends on the order results arrived in; the step records it
(``ahead``), so replay draws as many at the same point and a resumed search continues bit for
bit. A caller that never calls ``ask_ahead`` gets the synchronous search, unchanged.

>>> searcher = CmaEsSearcher(x0=[0.5, 0.5], sigma0=0.2, seed=1, popsize=4)
>>> suggestions = searcher.ask()
>>> [s.id for s in suggestions], searcher.ask()
([0, 1, 2, 3], [])
>>> steps = [searcher.tell(s.id, -sum(v * v for v in s.vector)) for s in suggestions]
>>> steps[-1].generation, searcher.generation
(0, 1)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from evomerge.core.fitness import scores_for_optimizer


@dataclass(frozen=True)
class Suggestion:
    """One vector the searcher wants scored. ``id`` counts every suggestion of the search."""

    id: int
    generation: int
    index: int  # position within its generation
    vector: tuple[float, ...]


@dataclass(frozen=True)
class SearchStep:
    """What the searcher was told in one step and where it ended: a checkpoint's content.

    ``sigma_after`` and ``mean_after`` are CMA-ES's step size and mean after the step (None for
    searchers without them); replay checks them.
    """

    generation: int
    vectors: tuple[tuple[float, ...], ...]  # every asked vector, in the order asked
    scores_told: tuple[float, ...]  # failures already replaced by the penalty
    sigma_after: float | None = None
    mean_after: tuple[float, ...] | None = None
    # Vectors drawn ahead from this generation's distribution before it was told (they open the
    # coming generations); replay draws as many at the same point.
    ahead: int = 0


class ReplayMismatchError(ValueError):
    """Replaying a stored step through this searcher does not reproduce it (another seed, pycma
    or evomerge version wrote it)."""


class Searcher(Protocol):
    """Proposes vectors, learns from scores (higher is better)."""

    name: str
    dimension: int

    @property
    def popsize(self) -> int:
        """Suggestions per generation."""

    @property
    def generation(self) -> int:
        """Steps taken so far (generations told)."""

    def ask(self) -> list[Suggestion]:
        """Suggestions to evaluate now; ``[]`` while the searcher waits for results."""

    def ask_ahead(self) -> Suggestion | None:
        """For an idle slot while the open generation's suggestions are all out: a vector of a
        coming generation, drawn now (``None``: no generation is open)."""

    def held_ahead(self) -> list[tuple[int, int]]:
        """(generation, index) of the vectors drawn ahead for generations not asked yet (after a
        replay: drawn again, and handed out by ``ask`` with their generation)."""

    def tell(self, suggestion_id: int, score: float | None) -> SearchStep | None:
        """One result (``None``: the candidate failed); the step taken, if this completed one."""

    def replay(self, step: SearchStep) -> None:
        """Take a stored step again: ask, check the vectors, tell its scores, check the state."""


class _GenerationBuffer:
    """One generation's suggestions and the scores told so far, in any order."""

    def __init__(self, generation: int, ids: list[int], vectors: NDArray[np.float64]):
        self.generation = generation
        self.ids = ids
        self.vectors = vectors
        self.scores: list[float | None] = [None] * len(vectors)
        self.told = [False] * len(vectors)

    def suggestions(self) -> list[Suggestion]:
        return [
            Suggestion(self.ids[i], self.generation, i, tuple(float(v) for v in x)) for i, x in enumerate(self.vectors)
        ]

    def tell(self, suggestion_id: int, score: float | None) -> bool:
        """Record a score; returns whether the generation is now complete."""
        if suggestion_id not in self.ids:
            raise ValueError(f"suggestion {suggestion_id} is not in generation {self.generation}")
        i = self.ids.index(suggestion_id)
        if self.told[i]:
            raise ValueError(f"suggestion {suggestion_id} was told already")
        if score is not None and not np.isfinite(score):
            raise ValueError(f"suggestion {suggestion_id}: a score must be finite (None for a failure)")
        self.scores[i], self.told[i] = score, True
        return all(self.told)


@dataclass(frozen=True)
class _DrawnAhead:
    """A suggestion drawn ahead of its generation, with the optimizer's own (unclipped, padded)
    sample, which the next generation is built around."""

    suggestion: Suggestion
    sample: NDArray[np.float64]
    handed_out: bool  # False when drawn by replay: ``ask`` hands it out with its generation


class _Generational:
    """Asks a whole generation and steps once every score of it is in; with ``ask_ahead``, the
    next generation's first vectors go out before that."""

    name = "generational"
    dimension: int

    def __init__(self) -> None:
        self._open: _GenerationBuffer | None = None
        self._next_id = 0
        self._generation = 0
        # Drawn ahead, per coming generation (the next first); each keeps room for one vector of
        # its own distribution. More slots than a generation holds draw for the one after.
        self._ahead: deque[list[_DrawnAhead]] = deque()
        self._ahead_scores: dict[int, float | None] = {}  # results of drawn-ahead ones, told early
        self._drawn_ahead = 0  # during the open generation (its step's ``ahead``)

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def popsize(self) -> int:
        raise NotImplementedError

    def ask(self) -> list[Suggestion]:
        if self._open is not None:
            return []  # the open generation is not told yet
        ahead = self._ahead.popleft() if self._ahead else []
        self._drawn_ahead = 0
        vectors = self._draw([a.sample for a in ahead])
        for i, a in enumerate(ahead):  # the vector that went out is the one that is scored
            vectors[i] = a.suggestion.vector
        ids = [a.suggestion.id for a in ahead] + list(range(self._next_id, self._next_id + len(vectors) - len(ahead)))
        self._next_id += len(vectors) - len(ahead)
        self._open = _GenerationBuffer(self._generation, ids, vectors)
        for a in ahead:
            if a.suggestion.id in self._ahead_scores:
                self._open.tell(a.suggestion.id, self._ahead_scores.pop(a.suggestion.id))
        return [s for s in self._open.suggestions() if s.index >= len(ahead) or not ahead[s.index].handed_out]

    def ask_ahead(self) -> Suggestion | None:
        return self._draw_one_ahead(handed_out=True)

    def held_ahead(self) -> list[tuple[int, int]]:
        """(generation, index) of each vector drawn ahead for a generation not asked yet."""
        return [(a.suggestion.generation, a.suggestion.index) for drawn in self._ahead for a in drawn]

    def _draw_one_ahead(self, handed_out: bool) -> Suggestion | None:
        if self._open is None or self.popsize < 2:
            return None
        coming = next((i for i, drawn in enumerate(self._ahead) if len(drawn) < self.popsize - 1), None)
        if coming is None:
            coming = len(self._ahead)
            self._ahead.append([])
        sample, vector = self._draw_ahead()
        drawn = self._ahead[coming]
        suggestion = Suggestion(
            self._next_id, self._generation + 1 + coming, len(drawn), tuple(float(v) for v in vector)
        )
        self._next_id += 1
        self._drawn_ahead += 1
        drawn.append(_DrawnAhead(suggestion, sample, handed_out))
        return suggestion

    def tell(self, suggestion_id: int, score: float | None) -> SearchStep | None:
        if any(a.suggestion.id == suggestion_id for drawn in self._ahead for a in drawn):
            if suggestion_id in self._ahead_scores:
                raise ValueError(f"suggestion {suggestion_id} was told already")
            if score is not None and not np.isfinite(score):
                raise ValueError(f"suggestion {suggestion_id}: a score must be finite (None for a failure)")
            self._ahead_scores[suggestion_id] = score  # its generation is not open yet
            return None
        if self._open is None:
            raise ValueError("tell() without an open generation; ask() first")
        if not self._open.tell(suggestion_id, score):
            return None
        buffer, self._open = self._open, None
        scores = np.asarray(scores_for_optimizer(buffer.scores), dtype=float)
        self._learn(buffer.vectors, scores)
        self._generation += 1
        return self._step(buffer.generation, buffer.vectors, scores)

    def replay(self, step: SearchStep) -> None:
        suggestions = self.ask()
        assert self._open is not None
        asked = np.asarray(self._open.vectors, dtype=float)
        if (
            step.generation != self._generation
            or not suggestions
            or not np.array_equal(asked, np.asarray(step.vectors, dtype=float))
        ):
            self._open = None
            raise ReplayMismatchError(
                f"{self.name} with this seed asks other vectors in generation {self._generation} than were stored"
            )
        for _ in range(step.ahead):  # drawn at the same point as in the run: before the step
            self._draw_one_ahead(handed_out=False)
        buffer, self._open = self._open, None
        scores = np.asarray(step.scores_told, dtype=float)
        self._learn(buffer.vectors, scores)
        self._generation += 1
        replayed = self._step(buffer.generation, buffer.vectors, scores)
        if (replayed.sigma_after, replayed.mean_after) != (step.sigma_after, step.mean_after):
            raise ReplayMismatchError(
                f"replaying generation {step.generation} through {self.name} does not reproduce the "
                "stored state (another pycma or numpy version?)"
            )

    # what a concrete searcher provides
    def _draw(self, ahead: list[NDArray[np.float64]]) -> NDArray[np.float64]:
        """A generation's vectors; the first ``len(ahead)`` are built from the samples drawn
        ahead (the caller puts the exact vectors that went out in their place)."""
        raise NotImplementedError

    def _draw_ahead(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """One sample of the current distribution: (the optimizer's own, the suggested vector)."""
        raise NotImplementedError

    def _learn(self, vectors: NDArray[np.float64], scores: NDArray[np.float64]) -> None:
        raise NotImplementedError

    def _step(self, generation: int, vectors: NDArray[np.float64], scores: NDArray[np.float64]) -> SearchStep:
        return SearchStep(generation, _rows(vectors), tuple(float(s) for s in scores), ahead=self._drawn_ahead)


class CmaEsSearcher(_Generational):
    """CMA-ES (pycma's ``CMAEvolutionStrategy``), maximising the score; with ``box``, its
    suggestions are clipped into the box (``cma-es-box``); with ``mirrored`` and ``elitist`` too,
    some of each generation's samples are mirrored through the mean and the best so far is asked
    again in each generation (``cma-es-box-mirrored-elitist``).

    Seeding: pycma draws its samples through the ``randn`` option, which is bound to a private
    ``numpy.random.Generator``; ``seed=nan`` stops pycma from reseeding numpy's global generator.
    Two searchers built with the same seed and told the same scores ask the same vectors, bit for
    bit, whatever else in the process uses ``numpy.random`` (lm-eval reseeds it on every
    evaluation).
    """

    def __init__(
        self,
        x0: Sequence[float] | NDArray[np.float64],
        sigma0: float,
        seed: int,
        popsize: int | None = None,
        box: tuple[Sequence[float], Sequence[float]] | None = None,
        mirrored: bool = False,
        elitist: bool = False,
    ):
        super().__init__()
        # With a box (``cma-es-box``), each suggestion is pycma's sample clipped into it, and
        # pycma is told the unclipped sample with the clipped one's score: the fitness extended
        # flat beyond the box. A parameter whose best value is on the edge (a weight of 0, a
        # density or t of 1: every layer taken from one model) is then reached with positive
        # probability, and once the mean has moved past the edge every sample there is exactly
        # on it (a repeat costs nothing: the batch plan reuses its record). Without a box
        # (``cma-es``, 0.2's and upstream's), an edge value is a single point that decoding by
        # abs or clip reaches by chance only.
        # ``mirrored`` and ``elitist`` together are ``cma-es-box-mirrored-elitist`` (opt-in).
        # Mirrored: pycma's own number of each generation's samples (about 1 in 6) are the
        # mirror images of others through the mean,
        # unconditionally (pycma's default mirrors only at populations under 6, and only the
        # worst); a pair x, 2m - x probes both sides of the mean along one direction, which
        # tells more than two independent samples where scores near the uniform start are flat
        # and tied and suggestions are clipped to the box's edges. Elitist: pycma puts the best
        # sample so far back into each generation (a repeated merge: its record is reused, no
        # evaluation is spent), so a lucky early find keeps pulling the mean. Measured on the
        # planted problems (README, "Search quality"): better on the 24-parameter problem, and
        # not reliably on the small ones (it won on the seeds it was chosen on, lost on others).
        self.name = (
            "cma-es"
            if box is None
            else "cma-es-box" + ("-mirrored" if mirrored else "") + ("-elitist" if elitist else "")
        )
        self._box = None if box is None else (np.asarray(box[0], dtype=float), np.asarray(box[1], dtype=float))
        start = np.asarray(x0, dtype=float)
        self.dimension = start.size
        self._rng = np.random.default_rng(seed)
        # pycma refuses 1-D problems; a single free value (slerp, one layer group) gets a second,
        # inert coordinate that decoding never reads.
        self._padded = start.size == 1
        if self._padded:
            start = np.append(start, 0.0)
        options = {
            "seed": np.nan,  # never touch numpy's global generator
            "randn": lambda *shape: self._rng.standard_normal(shape),
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "signals_filename": "",  # pycma would otherwise read options from a file in the cwd
            "tolflatfitness": 10**9,  # scores plateau on small eval sets; the budget decides
        }
        if popsize is not None:
            options["popsize"] = popsize
        if mirrored:
            options.update(CMA_mirrors=True, CMA_mirrormethod=0)  # 0: unconditional
        if elitist:
            options["CMA_elitist"] = True
        self._es = _pycma().CMAEvolutionStrategy(start, sigma0, options)
        self._asked_padded: NDArray[np.float64] | None = None
        self._order: list[int] = []  # pycma's row of each vector of the open generation

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    @property
    def mean(self) -> NDArray[np.float64]:
        return np.asarray(self._es.mean, dtype=float)[: self.dimension]

    def _suggested(self, samples: NDArray[np.float64]) -> NDArray[np.float64]:
        asked = samples[..., : self.dimension].copy()
        return asked if self._box is None else np.clip(asked, *self._box)

    def _draw(self, ahead: list[NDArray[np.float64]]) -> NDArray[np.float64]:
        # Samples drawn ahead go back in with pycma's inject (force=True: unchanged; pycma's tell,
        # not ask, limits how far one may move the distribution). pycma puts its own injected
        # directions (selective mirroring, at small populations) before them: the generation's
        # order is the samples drawn ahead first, then the rest in pycma's order, and tell gives
        # pycma its own order back.
        if ahead:
            self._es.inject(ahead, force=True)
        self._asked_padded = np.array(self._es.ask(), dtype=float)
        rows = [self._row_of(sample) for sample in ahead]
        self._order = rows + [r for r in range(len(self._asked_padded)) if r not in rows]
        return self._suggested(self._asked_padded[self._order])

    def _row_of(self, sample: NDArray[np.float64]) -> int:
        assert self._asked_padded is not None
        close = np.flatnonzero(np.all(np.isclose(self._asked_padded, sample, rtol=0, atol=1e-9), axis=1))
        if close.size == 0:
            raise RuntimeError("pycma did not return an injected sample (another pycma version?)")
        return int(close[0])

    def _draw_ahead(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        # pycma's documented way to sample more of a generation before its tell ("ask(1)"). A
        # single sample has no mirror image: pycma may warn that it made fewer mirrors than set.
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="fewer mirrors generated")
            sample = np.array(self._es.ask(1)[0], dtype=float)
        return sample, self._suggested(sample)

    def _learn(self, vectors: NDArray[np.float64], scores: NDArray[np.float64]) -> None:
        assert self._asked_padded is not None
        in_pycma_order = np.empty_like(scores)
        in_pycma_order[self._order] = scores
        self._es.tell(list(self._asked_padded), list(-in_pycma_order))  # pycma minimizes
        self._asked_padded = None

    def _step(self, generation: int, vectors: NDArray[np.float64], scores: NDArray[np.float64]) -> SearchStep:
        return SearchStep(
            generation,
            _rows(vectors),
            tuple(float(s) for s in scores),
            self.sigma,
            tuple(float(m) for m in self.mean),
            ahead=self._drawn_ahead,
        )


class RandomSearcher(_Generational):
    """Uniform random vectors in a box, one batch of ``popsize`` at a time: the baseline every
    search method must beat at the same budget."""

    name = "random"

    def __init__(
        self,
        lower: Sequence[float] | NDArray[np.float64],
        upper: Sequence[float] | NDArray[np.float64],
        seed: int,
        popsize: int,
    ):
        super().__init__()
        self.lower: NDArray[np.float64] = np.asarray(lower, dtype=float)
        self.upper: NDArray[np.float64] = np.asarray(upper, dtype=float)
        if self.lower.shape != self.upper.shape or not np.all(self.upper > self.lower):
            raise ValueError("random search needs lower < upper in every coordinate")
        self.dimension = self.lower.size
        self._popsize = popsize
        self._rng = np.random.default_rng(seed)

    @property
    def popsize(self) -> int:
        return self._popsize

    def _draw(self, ahead: list[NDArray[np.float64]]) -> NDArray[np.float64]:
        fresh = self.lower + (self.upper - self.lower) * self._rng.random((self.popsize - len(ahead), self.dimension))
        return np.vstack([*ahead, fresh]) if ahead else fresh

    def _draw_ahead(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        vector = self.lower + (self.upper - self.lower) * self._rng.random(self.dimension)
        return vector, vector

    def _learn(self, vectors: NDArray[np.float64], scores: NDArray[np.float64]) -> None:
        """Random search learns nothing."""


def _pycma() -> Any:
    """pycma, imported when a CMA-ES searcher is built: its import loads matplotlib.pyplot and
    scipy.stats (1.1 s), which the CLI's validation and the slots never need. (Typed ``Any``:
    pycma ships no type information.)"""
    import warnings

    with warnings.catch_warnings():
        # pycma warns at import when matplotlib is missing; evomerge plots nothing with it.
        warnings.simplefilter("ignore")
        import cma

    return cma


def _rows(vectors: NDArray[np.float64]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in vectors)
