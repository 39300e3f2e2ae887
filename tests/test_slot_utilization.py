"""The slot-utilization benchmark's simulation: hand-checkable schedules through the real dispatch."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "slot_utilization.py"
_spec = importlib.util.spec_from_file_location("slot_utilization", _PATH)
su = sys.modules["slot_utilization"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(su)


def test_equal_durations_with_popsize_equal_to_slots_keep_every_slot_busy():
    gens = [[10.0] * 4 for _ in range(3)]
    barrier = su.with_barrier(gens, slots=4)
    assert [(s.start, s.end) for s in barrier] == [(0, 10), (10, 20), (20, 30)]
    assert su.utilization(barrier, 4) == 1.0
    assert su.utilization(su.without_barrier(gens, 4), 4) == 1.0
    assert [su.boundary_idle(s, 4) for s in barrier] == [0, 0, 0]


def test_one_straggler_per_generation_idles_the_other_slot_until_it_ends():
    # Barrier: each generation lasts 30 s, slot 1 idles 20 s of it: 80 / (2 x 60).
    # No barrier: slot 0 runs 10, 10, 30 while slot 1 runs the first 30: 80 / (2 x 50).
    gens = [[10.0, 30.0], [10.0, 30.0]]
    barrier = su.with_barrier(gens, slots=2)
    assert barrier == [su.Span(0, 30, 40, 30), su.Span(30, 60, 40, 30)]
    assert [su.boundary_idle(s, 2) for s in barrier] == [20, 20]
    assert su.utilization(barrier, 2) == pytest.approx(2 / 3)
    stream = su.without_barrier(gens, slots=2)
    assert stream == [su.Span(0, 50, 80, 30)]
    assert su.utilization(stream, 2) == pytest.approx(0.8)


def test_a_free_slot_takes_the_next_candidate_at_once():
    # slot 1 runs 1, 1, 1 while slot 0 runs 5: the generation ends at 5, not 6.
    assert su.dispatch([5.0, 1.0, 1.0, 1.0], slots=2, start=100.0) == su.Span(100, 105, 8, 5)


@given(
    st.lists(st.floats(0.1, 1000.0), min_size=1, max_size=40),
    st.integers(1, 12),
)
def test_generation_idle_is_at_most_slots_minus_one_times_the_longest(durations, slots):
    span = su.dispatch(durations, slots)
    assert 0 <= su.boundary_idle(span, slots) <= (slots - 1) * max(durations) * (1 + 1e-9) + 1e-9


def test_durations_have_the_stated_mean_and_stragglers_multiply():
    base = su.sample_durations(np.random.default_rng(0), 200_000, mean=60, sigma=0.25, straggler_rate=0)
    assert base.mean() == pytest.approx(60, rel=0.01)
    assert np.log(base).std() == pytest.approx(0.25, rel=0.02)
    slow = su.sample_durations(np.random.default_rng(0), 200_000, mean=60, sigma=0.25, straggler_rate=1)
    assert slow.mean() == pytest.approx(180, rel=0.01)


def test_records_give_slots_round_trips_by_generation_and_actual_spans(tmp_path):
    rows = [  # generation, index, slot, round_trip, finished_at
        (0, 1, "slot-1", 4.0, 104.0),
        (0, 0, "slot-0", 2.0, 102.0),
        (0, 2, "slot-0", 1.0, 103.0),
        (1, 0, "slot-0", 3.0, 110.0),
        (1, 1, "slot-1", 3.0, 110.0),
    ]
    (tmp_path / "records").mkdir()
    for i, (g, idx, slot, rt, fin) in enumerate(rows):
        record = {"generation": g, "index": idx, "slot": slot, "timings": {"round_trip": rt}, "finished_at": fin}
        (tmp_path / "records" / f"{i}.json").write_text(json.dumps(record))
    (tmp_path / "records" / "failed.json").write_text(json.dumps({"generation": 1, "timings": None}))
    slots, gens, actual = su.read_records(str(tmp_path))
    assert slots == 2
    assert gens == [[2.0, 4.0, 1.0], [3.0, 3.0]]
    assert actual == [su.Span(100, 104, 7, 4), su.Span(107, 110, 6, 3)]
    # 13 busy slot-seconds over 2 slots x 10 s; the 3 s between generations count as idle.
    assert su.utilization(actual, 2) == pytest.approx(0.65)


def test_barrier_free_keeps_slots_busier_than_synchronous_with_the_real_searcher():
    args = su.argparse.Namespace(
        dimension=6, generations=8, mean=60.0, sigma=0.25, straggler_rate=0.02, straggler_factor=3.0, seed=0
    )
    sync = su.searcher_utilization(args, slots=6, popsize=8, barrier_free=False)
    free = su.searcher_utilization(args, slots=6, popsize=8, barrier_free=True)
    assert 0 < sync < free <= 1.0
    # Synchronous through the searcher is the barrier schedule of the same durations: at most
    # what streaming them would reach.
    assert sync < 0.9
