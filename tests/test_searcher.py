"""The Searcher protocol: seeded, private randomness; results told one at a time in any order;
steps replayed bit for bit; CMA-ES and random search behind the same calls."""

from dataclasses import replace

import numpy as np
import pytest

from evomerge.core.searcher import CmaEsSearcher, RandomSearcher, ReplayMismatchError


def quadratic(vector) -> float:
    return -float(((np.asarray(vector) - 0.1) ** 2).sum())


def drive(searcher, generations, score=quadratic, order=lambda suggestions: suggestions, fail=lambda s: False):
    """Ask, then tell each result (in ``order``); returns every asked vector and the steps."""
    asked, steps = [], []
    for _ in range(generations):
        suggestions = searcher.ask()
        np.random.rand(7)  # other code using numpy's global generator must not matter
        asked.append([s.vector for s in suggestions])
        for s in order(suggestions):
            step = searcher.tell(s.id, None if fail(s) else score(s.vector))
        steps.append(step)
    return np.array(asked), steps


def cma(seed=3, dim=4, popsize=6):
    return CmaEsSearcher(np.full(dim, 0.5), 0.2, seed=seed, popsize=popsize)


def test_same_seed_same_trajectory_whatever_the_global_generator_does():
    np.random.seed(1)
    a, _ = drive(cma(), 5)
    np.random.seed(99)
    b, _ = drive(cma(), 5)
    assert np.array_equal(a, b)


def test_other_seed_other_trajectory():
    assert not np.array_equal(drive(cma(seed=3), 5)[0], drive(cma(seed=4), 5)[0])


def test_the_order_results_arrive_in_does_not_change_a_generational_search():
    a, steps_a = drive(cma(), 5)
    b, steps_b = drive(cma(), 5, order=lambda s: list(reversed(s)))
    assert np.array_equal(a, b) and steps_a == steps_b


def test_it_maximizes_the_score():
    searcher = cma(seed=0)
    drive(searcher, 40)
    assert np.abs(searcher.mean - 0.1).max() < 0.05


def test_one_dimensional_problems_work():
    searcher = CmaEsSearcher([0.5], 0.3, seed=0, popsize=4)
    asked, _ = drive(searcher, 30, score=lambda v: -((v[0] - 0.8) ** 2))
    assert asked.shape == (30, 4, 1)
    assert abs(searcher.mean[0] - 0.8) < 0.05


def test_a_generation_steps_once_every_result_is_told_and_failures_rank_last():
    searcher = cma(popsize=4)
    suggestions = searcher.ask()
    assert [s.id for s in suggestions] == [0, 1, 2, 3] and [s.index for s in suggestions] == [0, 1, 2, 3]
    assert searcher.ask() == [], "the open generation waits for its results"
    assert searcher.tell(2, 0.5) is None and searcher.tell(0, None) is None and searcher.tell(3, 0.2) is None
    step = searcher.tell(1, 0.9)
    assert step.generation == 0 and searcher.generation == 1
    assert step.scores_told == (pytest.approx(-0.8), 0.9, 0.5, 0.2), "failed: the worst success - 1"
    assert step.sigma_after == searcher.sigma and step.mean_after == tuple(searcher.mean)
    assert [s.id for s in searcher.ask()] == [4, 5, 6, 7]


def test_tell_refuses_what_was_not_asked_twice_told_or_not_finite():
    searcher = cma(popsize=4)
    with pytest.raises(ValueError, match="ask"):
        searcher.tell(0, 1.0)
    searcher.ask()
    with pytest.raises(ValueError, match="not in generation 0"):
        searcher.tell(4, 1.0)
    with pytest.raises(ValueError, match="finite"):
        searcher.tell(0, float("nan"))
    searcher.tell(0, 1.0)
    with pytest.raises(ValueError, match="told already"):
        searcher.tell(0, 1.0)


def cma_box(seed=3, dim=4, popsize=6, sigma0=0.3):
    return CmaEsSearcher(np.full(dim, 0.5), sigma0, seed=seed, popsize=popsize, box=(np.zeros(dim), np.ones(dim)))


def cma_mirrored(seed=3, dim=4, popsize=6, sigma0=0.3, box=(0.0, 1.0)):
    """cma-es-box-mirrored-elitist."""
    lower, upper = np.full(dim, box[0]), np.full(dim, box[1])
    return CmaEsSearcher(
        np.full(dim, 0.5), sigma0, seed=seed, popsize=popsize, box=(lower, upper), mirrored=True, elitist=True
    )


def test_the_mirrored_searcher_mirrors_some_samples_through_the_mean_in_every_generation():
    # A box wide enough that nothing is clipped: each pair's midpoint is the mean exactly.
    searcher = cma_mirrored(seed=4, dim=8, popsize=10, sigma0=0.5, box=(-100.0, 100.0))
    assert searcher.name == "cma-es-box-mirrored-elitist"
    for _ in range(3):
        mean = searcher.mean
        vectors = np.array([s.vector for s in searcher.ask()])
        # pycma's own number of mirrors at popsize 10 in 8 dimensions: 2 pairs, the last rows
        for a, b in ((-1, -2), (-3, -4)):
            np.testing.assert_allclose(vectors[a] + vectors[b], 2 * mean, rtol=0, atol=1e-12)
        assert not np.allclose(vectors[0] + vectors[1], 2 * mean), "the others are independent"
        for i, v in enumerate(vectors):
            searcher.tell(i + 10 * searcher.generation, quadratic(v))


@pytest.mark.parametrize(
    "make",
    [cma, cma_box, cma_mirrored, lambda: RandomSearcher(np.zeros(3), np.ones(3), seed=5, popsize=4)],
    ids=["cma", "cma-box", "cma-box-mirrored", "random"],
)
def test_replaying_the_steps_rebuilds_the_same_searcher_bit_for_bit(make):
    original = make()
    _, steps = drive(original, 4, fail=lambda s: s.index == 1)
    resumed = make()
    for step in steps:
        resumed.replay(step)
    assert resumed.generation == original.generation == 4
    assert np.array_equal(drive(resumed, 2)[0], drive(original, 2)[0]), "both continue identically"


def test_a_step_from_another_seed_or_state_is_refused():
    _, steps = drive(cma(seed=3), 2)
    with pytest.raises(ReplayMismatchError, match="other vectors"):
        cma(seed=4).replay(steps[0])
    tampered = steps[0].__class__(**{**steps[0].__dict__, "sigma_after": steps[0].sigma_after * 2})
    with pytest.raises(ReplayMismatchError, match="does not reproduce"):
        cma(seed=3).replay(tampered)


def test_random_search_draws_uniformly_in_its_box_and_learns_nothing():
    searcher = RandomSearcher([0.0, -1.0], [1.0, 1.0], seed=0, popsize=50)
    asked, steps = drive(searcher, 4)
    assert asked.shape == (4, 50, 2)
    assert asked[..., 0].min() >= 0 and asked[..., 0].max() < 1 and asked[..., 1].min() >= -1
    assert steps[-1].sigma_after is None and steps[-1].mean_after is None
    with pytest.raises(ValueError, match="lower < upper"):
        RandomSearcher([0.0], [0.0], seed=0, popsize=2)


def test_default_population_size_is_pycmas():
    assert CmaEsSearcher(np.zeros(12), 0.2, seed=0).popsize == 4 + int(3 * np.log(12))


def corner(vector) -> float:
    """Best at (1, 0, 1, 0), a corner of the box, and flat nowhere: like a merge whose best
    recipe takes each layer group from one model."""
    v = np.asarray(vector)
    return -float(np.abs(v - np.array([1.0, 0.0, 1.0, 0.0])).sum())


def test_the_box_searcher_asks_only_inside_its_box_and_reaches_the_corner_exactly():
    boxed = cma_box(seed=1)
    asked, _ = drive(boxed, 12, score=corner)
    assert boxed.name == "cma-es-box"
    assert asked.min() >= 0.0 and asked.max() <= 1.0
    last = asked[-1]
    # past the edge, pycma's mean keeps sampling on it: the corner itself is asked, exactly
    assert any(np.array_equal(v, [1.0, 0.0, 1.0, 0.0]) for v in last)
    # the unboxed searcher (0.2's) never asks the corner exactly: it is a single point to it
    plain, _ = drive(CmaEsSearcher(np.full(4, 0.5), 0.3, seed=1, popsize=6), 12, score=corner)
    assert not any(np.array_equal(v, [1.0, 0.0, 1.0, 0.0]) for v in plain.reshape(-1, 4))
    assert plain.min() < 0.0 or plain.max() > 1.0


def test_the_box_searcher_tells_pycma_its_own_samples():
    """pycma is told the unclipped sample (the fitness extended flat past the edge), so its
    state stays its own; the suggestion is the clipped one."""
    boxed = cma_box(seed=2, sigma0=2.0)  # wide: most samples fall outside
    suggestions = boxed.ask()
    pycma_asked = boxed._asked_padded.copy()
    assert not np.array_equal(pycma_asked, np.array([s.vector for s in suggestions]))
    assert np.array_equal(np.clip(pycma_asked, 0, 1), np.array([s.vector for s in suggestions]))


# --- without the generation barrier -------------------------------------------------------------
def run_on_slots(searcher, slots, budget, seed, score=quadratic):
    """Evaluate through ``slots`` busy slots with random durations (a simulated clock): results
    arrive out of order and idle slots draw ahead. Returns the steps and the feed."""
    import heapq

    from evomerge.core.suggestion_feed import SuggestionFeed

    rng = np.random.default_rng(seed)
    feed = SuggestionFeed(searcher, budget, barrier_free=True)
    running, steps, now, seq = [], [], 0.0, 0
    while True:
        while len(running) < slots and (s := feed.next()) is not None:
            seq += 1
            heapq.heappush(running, (now + rng.lognormal(0, 0.5), seq, s))
        if not running:
            return steps, feed
        now, _, s = heapq.heappop(running)
        if (step := feed.tell(s.id, score(s.vector))) is not None:
            steps.append(step)


@pytest.mark.parametrize(
    "make", [cma_box, cma_mirrored, lambda: RandomSearcher(np.zeros(4), np.ones(4), seed=5, popsize=6)]
)
def test_vectors_drawn_ahead_open_the_coming_generations(make):
    searcher = make()
    n = searcher.popsize
    assert searcher.ask_ahead() is None, "nothing is drawn ahead before a generation is open"
    first = searcher.ask()
    drawn = [searcher.ask_ahead() for _ in range(n + 2)]
    # Each coming generation keeps one place for a vector of its own distribution.
    assert [(a.generation, a.index) for a in drawn] == [(1, i) for i in range(n - 1)] + [(2, i) for i in range(3)]
    next_gen, after = drawn[: n - 1], drawn[n - 1 :]
    searcher.tell(next_gen[0].id, quadratic(next_gen[0].vector))  # a result ahead of its generation
    steps = [searcher.tell(s.id, quadratic(s.vector)) for s in first]
    assert steps[-1].ahead == n + 2 and searcher.generation == 1
    rest = searcher.ask()
    assert [(s.generation, s.index) for s in rest] == [(1, n - 1)]
    for a in next_gen[1:] + after:
        assert searcher.tell(a.id, quadratic(a.vector)) is None
    step = searcher.tell(rest[0].id, quadratic(rest[0].vector))
    assert step.generation == 1 and step.vectors == tuple(a.vector for a in next_gen) + (rest[0].vector,)
    assert step.scores_told[0] == quadratic(next_gen[0].vector), "the early result counts in its generation"
    assert step.ahead == 0
    third = searcher.ask()
    assert [(s.generation, s.index) for s in third] == [(2, i) for i in range(3, n)]
    assert searcher.tell(third[-1].id, 0.0) is None
    for s in third[:-1]:
        searcher.tell(s.id, 0.0)
    assert searcher.generation == 3, "the results of generation 2's drawn-ahead vectors were kept"


@pytest.mark.parametrize("make", [cma_box, cma_mirrored])
def test_a_barrier_free_search_is_the_same_for_the_same_arrival_order_and_replays_bit_for_bit(make):
    steps, feed = run_on_slots(make(), slots=5, budget=60, seed=11)
    again, feed_again = run_on_slots(make(), slots=5, budget=60, seed=11)
    assert steps == again and feed.told == feed_again.told
    assert any(step.ahead for step in steps), "slots drew ahead"
    assert steps != run_on_slots(make(), slots=5, budget=60, seed=12)[0], "another arrival order, another search"

    live = make()
    live_steps, _ = run_on_slots(live, slots=5, budget=60, seed=11)
    resumed = make()
    for step in live_steps:
        resumed.replay(step)
    assert resumed.generation == live.generation and resumed.sigma == live.sigma
    assert np.array_equal(resumed.mean, live.mean)


def test_replay_detects_another_count_drawn_ahead():
    steps, _ = run_on_slots(cma_box(), slots=5, budget=30, seed=11)
    i = next(i for i, step in enumerate(steps) if step.ahead)
    resumed = cma_box()
    for step in steps[:i]:
        resumed.replay(step)
    resumed.replay(replace(steps[i], ahead=steps[i].ahead - 1))
    with pytest.raises(ReplayMismatchError):  # the next generation is then not the one stored
        resumed.replay(steps[i + 1])


def test_a_barrier_free_search_still_finds_the_optimum():
    # Fewer slots than a generation holds: vectors are drawn at most one generation ahead. (With
    # more slots than that, they are drawn from older distributions and convergence is slower:
    # see benchmarks/search_quality.py's barrier-free systems.)
    searcher = CmaEsSearcher(np.full(4, 0.5), 0.2, seed=0, popsize=6)
    steps, _ = run_on_slots(searcher, slots=4, budget=400, seed=3)
    assert any(step.ahead for step in steps)
    assert np.abs(searcher.mean - 0.1).max() < 0.01
