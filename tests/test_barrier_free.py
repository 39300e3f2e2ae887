"""--barrier-free at the session and loop level, without Prefect or Ray: slots on a simulated
clock (results arrive out of order; idle slots take candidates drawn ahead), the budget, the
checkpoints, the same search for the same arrival order, and resume after a kill."""

import heapq
import json

import numpy as np
import pytest
from test_search_session import make_spec, outcome

from evomerge.search_loop import inline_runner, inline_stream_runner, run_search_loop
from evomerge.search_session import SearchSession


class Killed(Exception):
    """Stands for SIGKILL: the results in flight are lost."""


def simulated_slots(slots, seed, kill_after=None):
    """A stream runner: ``slots`` slots, each candidate scored at once by the fake evaluator and
    its result delivered when its (random, seeded) duration has passed on a simulated clock."""

    def run_stream(next_request, on_result):
        rng = np.random.default_rng(seed)
        running, now, seq, delivered = [], 0.0, 0, 0
        while True:
            while len(running) < slots and (request := next_request()) is not None:
                seq += 1
                heapq.heappush(running, (now + rng.lognormal(0, 0.5), seq, request, outcome(request.vector)))
            if not running:
                return
            now, _, request, result = heapq.heappop(running)
            if kill_after is not None and delivered == kill_after:
                raise Killed
            on_result(request, result, 1.0)
            delivered += 1

    return run_stream


def search(storage, slots, seed=0, max_fevals=24, kill_after=None, **options):
    session = SearchSession(make_spec(storage, max_fevals=max_fevals, seed=3, barrier_free=True, **options))
    try:
        run_search_loop(
            session,
            inline_runner(session, lambda r: outcome(r.vector)),
            (),
            run_stream=simulated_slots(slots, seed, kill_after),
        )
    except Killed:
        pass
    finally:
        session.close()
    return session


def checkpoints(storage):
    return [json.loads(p.read_text()) for p in sorted((storage / "checkpoints").glob("*.json"))]


def records(storage):
    return {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in (storage / "records").glob("*.json")}


def test_idle_slots_take_candidates_of_the_next_generation_and_the_budget_holds(tmp_path):
    session = search(tmp_path, slots=3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["evaluations"] == 24 == len(records(tmp_path))
    cps = checkpoints(tmp_path)
    assert [cp["generation"] for cp in cps] == list(range(len(cps))) and len(cps) >= 5
    assert any(cp["ahead"] > 0 for cp in cps), "slots drew ahead while a generation's last ran"
    # Every told vector is a record: nothing was evaluated that the searcher was not told.
    told = {k for cp in cps for k in cp["keys"]}
    assert told <= set(records(tmp_path))
    assert session.finished_reason.startswith("evaluation budget spent")


def test_one_slot_is_the_synchronous_search(tmp_path):
    """With one slot nothing is ever drawn ahead: the stream is the generation loop, step for step."""
    sync = SearchSession(make_spec(tmp_path / "sync", max_fevals=16, seed=3))
    run_search_loop(sync, inline_runner(sync, lambda r: outcome(r.vector)))
    stream = SearchSession(make_spec(tmp_path / "stream", max_fevals=16, seed=3, barrier_free=True))
    run_search_loop(
        stream,
        inline_runner(stream, lambda r: outcome(r.vector)),
        (),
        run_stream=inline_stream_runner(lambda r: outcome(r.vector)),
    )
    strip = lambda cps: [{k: v for k, v in cp.items() if k != "written_at"} for cp in cps]  # noqa: E731
    assert strip(checkpoints(tmp_path / "sync")) == strip(checkpoints(tmp_path / "stream"))
    assert set(records(tmp_path / "sync")) == set(records(tmp_path / "stream"))


def test_the_same_arrival_order_makes_the_same_search(tmp_path):
    search(tmp_path / "a", slots=3, seed=5)
    search(tmp_path / "b", slots=3, seed=5)
    search(tmp_path / "c", slots=3, seed=6)
    key = lambda cps: [(cp["keys"], cp["scores_told"], cp["sigma_after"], cp["ahead"]) for cp in cps]  # noqa: E731
    assert key(checkpoints(tmp_path / "a")) == key(checkpoints(tmp_path / "b"))
    assert key(checkpoints(tmp_path / "a")) != key(checkpoints(tmp_path / "c")), "another order, another search"


@pytest.mark.parametrize("kill_after", [5, 9, 14])
def test_a_killed_barrier_free_search_resumes_from_its_records_and_loses_none(tmp_path, kill_after):
    killed = search(tmp_path, slots=3, seed=5, kill_after=kill_after)
    before = records(tmp_path)
    assert len(before) == kill_after
    state = (killed.searcher.generation, killed.searcher.sigma, tuple(killed.searcher.mean))
    resumed = SearchSession(make_spec(tmp_path, max_fevals=24, seed=3, barrier_free=True))
    # The checkpoints replay to where the killed search was told (its open generation aside).
    done = len(checkpoints(tmp_path))
    assert resumed.searcher.generation == done <= state[0]
    run_search_loop(
        resumed, inline_runner(resumed, lambda r: outcome(r.vector)), (), run_stream=simulated_slots(3, seed=8)
    )
    after = records(tmp_path)
    assert len(after) == 24 and set(before) <= set(after)
    # Every record made before the kill was told to the searcher after it: the vectors drawn
    # ahead before the kill were drawn again, the same, and their records used.
    told = {k for cp in checkpoints(tmp_path) for k in cp["keys"]}
    last_open = max(r["generation"] for r in after.values())
    assert {k for k, r in before.items() if r["generation"] < last_open} <= told
