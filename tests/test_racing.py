"""--racing: the pure rule (core), and real staged lm-eval scoring in a slot on the tiny models:
what a candidate that finishes scores, where one stops, and that memory and disk agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TASKS_DIR, write_config

from evomerge.backends.evaluator_hf import HFEvaluator
from evomerge.backends.merger_disk import DiskMerger
from evomerge.backends.prepare import build_options, prepare_run
from evomerge.backends.slot_worker import SlotWorker, merge_to_folder
from evomerge.core.config import TaskConfiguration
from evomerge.core.fitness import weighted_score
from evomerge.core.racing import STAGES, is_better, item_order, outraced_by, stage_end
from evomerge.core.records import CandidateRequest, candidate_key

TASKS = [TaskConfiguration(name="a"), TaskConfiguration(name="b", weight=0.5)]


# --- the rule ----------------------------------------------------------------------------------
def test_the_item_order_is_a_permutation_fixed_by_seed_and_task():
    order = item_order(50, 3, "tiny_rev")
    assert sorted(order) == list(range(50))
    assert order == item_order(50, 3, "tiny_rev")
    assert order != item_order(50, 4, "tiny_rev") and order != item_order(50, 3, "tiny_shift")
    assert [stage_end(8, s) for s in range(len(STAGES))] == [1, 2, 4, 8]


def test_a_candidate_stops_only_when_mu_others_beat_it_on_the_same_items_with_confidence():
    rng = np.random.default_rng(0)
    weak = {"a": list(rng.binomial(1, 0.3, 40).astype(float)), "b": list(rng.binomial(1, 0.3, 40).astype(float))}
    strong = {"a": [1.0] * 80, "b": [1.0] * 80}  # went further: compared on the weak one's 40 items
    equal = {"a": list(weak["a"]), "b": list(weak["b"])}
    running = {"a": [1.0] * 20, "b": [1.0] * 20}  # still running: compared on the first 20 items
    started = {"a": [1.0], "b": [1.0]}  # one item shared: no standard error, no comparison
    z = 1.645
    assert is_better(strong, weak, TASKS, z) and is_better(running, weak, TASKS, z)
    assert not is_better(equal, weak, TASKS, z) and not is_better(started, weak, TASKS, z)
    assert not is_better(weak, strong, TASKS, z)
    others = {"s1": strong, "run": running, "eq": equal, "started": started}
    assert outraced_by(weak, others, TASKS, mu=2) == ["run", "s1"]
    assert outraced_by(weak, others, TASKS, mu=3) == []  # two better are not three


def test_a_small_noisy_lead_is_not_confidence():
    """Two candidates of equal quality: their per-item differences are noise, and at 95 % a
    lead on 40 items does not stop either one (checked over 200 draws: stops ~5 % or less)."""
    rng = np.random.default_rng(1)
    stops = 0
    for _ in range(200):
        one = {t.name: list(rng.binomial(1, 0.6, 40).astype(float)) for t in TASKS}
        two = {t.name: list(rng.binomial(1, 0.6, 40).astype(float)) for t in TASKS}
        stops += is_better(one, two, TASKS, 1.645)
    assert stops <= 200 * 0.08


# --- in a slot, with real lm-eval ----------------------------------------------------------------
@pytest.fixture(scope="module")
def racing_spec(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("racing")
    config = write_config(tmp / "c.yml", tiny_models, limit=None)
    options = build_options(task_search_path=[str(TASKS_DIR)], racing=True, popsize=4)
    return prepare_run(str(config), str(tmp / "store"), options)


def request_for(spec, x, generation=0, index=0):
    config = spec.search_space().decode(np.asarray(x, dtype=float))
    key = candidate_key(config, spec.evaluation)
    return CandidateRequest(key=key, generation=generation, index=index, vector=list(x), merge_config=config)


def test_a_candidate_nothing_beats_is_scored_on_every_item_and_scores_as_without_racing(racing_spec, tmp_path):
    """With no results in, every stage runs: lm-eval's own metrics, exactly, and the per-item
    scores in the race order are the same items lm-eval scores in a full run (lm-eval maps item
    indices onto documents in document order: a wrong order would give items each other's names)."""
    worker = SlotWorker(racing_spec, "slot-race")
    request = request_for(racing_spec, [0.7, 0.2, 0.4, 0.9])
    outcome = worker.run(request)
    assert outcome.status == "ok", outcome.error
    race = outcome.race
    assert race is not None and not race.stopped and race.beaten_by == []
    assert race.items_scored == race.items_full == 200  # tiny_shift and tiny_rev: 100 items each

    folder = tmp_path / "merged"
    DiskMerger(racing_spec.options, use_cuda=False).merge(request.merge_config, str(folder))
    full = HFEvaluator(racing_spec.evaluation, [str(TASKS_DIR)], False, batch_size=16, per_item=True)
    plain = full.evaluate(str(folder))
    for task in racing_spec.evaluation.tasks:
        assert outcome.metrics[task.name][task.metric] == plain.results[task.name][task.metric]
        in_doc_order = plain.item_scores[task.name]
        assert race.item_scores[task.name] == [in_doc_order[d] for d in worker.racer.order[task.name]]


def test_a_candidate_beaten_by_mu_of_its_generation_stops_after_the_first_stage(racing_spec):
    """Two candidates of its generation (mu of popsize 4) got every item right: a candidate that
    misses items stops after 1/8 of them, scored on those only, and its record says by whom."""
    store_board = {
        "perfect-1": {"tiny_shift": [1.0] * 100, "tiny_rev": [1.0] * 100},
        "perfect-2": {"tiny_shift": [1.0] * 100, "tiny_rev": [1.0] * 100},
    }
    worker = SlotWorker(racing_spec, "slot-race")
    for key, items in store_board.items():
        worker.racer.board.publish(5, key, items)
    for vector in ([0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]):
        outcome = worker.run(request_for(racing_spec, vector, generation=5))
        assert outcome.status == "ok", outcome.error
        race = outcome.race
        per_task = [len(v) for v in race.item_scores.values()]
        if race.stopped:
            break
    assert race.stopped, "a candidate of the tiny models got every item right"
    assert per_task == [stage_end(100, 0)] * 2 and race.items_scored == 2 * stage_end(100, 0)
    assert race.beaten_by == ["perfect-1", "perfect-2"]
    tasks = racing_spec.evaluation.tasks
    for task in tasks:  # the partial score's metrics: means over the items scored
        assert outcome.metrics[task.name][task.metric] == pytest.approx(np.mean(race.item_scores[task.name]))
    # what the searcher is told: the fitness's weighted sum, of those means
    assert weighted_score(outcome.metrics, tasks) == pytest.approx(
        sum(t.weight * np.mean(race.item_scores[t.name]) for t in tasks)
    )


def test_candidates_still_running_on_other_slots_count_on_the_items_they_scored(racing_spec):
    """Two peers of the generation have published their first stage only (all right): the
    candidate is compared with them on those items, and stops; its own stages are on the board."""
    worker = SlotWorker(racing_spec, "slot-race")
    first_stage = stage_end(100, 0)
    for key in ("running-1", "running-2"):
        worker.racer.board.publish(6, key, {"tiny_shift": [1.0] * first_stage, "tiny_rev": [1.0] * first_stage})
    request = request_for(racing_spec, [0.1, 0.1, 0.1, 0.1], generation=6)
    outcome = worker.run(request)
    assert outcome.race.stopped and outcome.race.beaten_by == ["running-1", "running-2"]
    assert worker.racer.board.others(6, "running-1")[request.key] == outcome.race.item_scores


def test_racing_in_memory_on_disk_and_through_a_merge_task_score_the_same_stages(racing_spec, tiny_models, tmp_path):
    """Pool in memory (the resident model goes from stage to stage), pool on disk and the
    serial/buffered path (a folder merged by a merge task, kept until the candidate is decided):
    the same stages and item scores, against the same board."""
    config = write_config(tmp_path / "c.yml", tiny_models, limit=None)
    in_memory = prepare_run(
        str(config),
        racing_spec.storage_path,
        build_options(task_search_path=[str(TASKS_DIR)], racing=True, popsize=4, in_memory=True),
    )
    board = {"strong-1": {"tiny_shift": [1.0] * 100, "tiny_rev": [1.0] * 100}}
    disk_worker, memory_worker = SlotWorker(racing_spec, "disk"), SlotWorker(in_memory, "memory")
    for worker in (disk_worker, memory_worker):
        for key in ("strong-1", "strong-2"):
            worker.racer.board.publish(7, key, board["strong-1"])
    request = request_for(racing_spec, [0.2, 0.8, 0.6, 0.3], generation=7)
    on_disk = disk_worker.run(request)
    resident = memory_worker.run(request)
    merged = merge_to_folder(racing_spec, request)
    through_task = disk_worker.evaluate_merged(request, merged)
    for outcome in (on_disk, resident, through_task):
        assert outcome.status == "ok", outcome.error
    assert on_disk.race == resident.race == through_task.race
    assert on_disk.metrics == resident.metrics == through_task.metrics
    assert json.dumps(on_disk.race.item_scores)  # what a record keeps


def test_a_task_whose_metric_is_not_a_mean_cannot_be_raced(tiny_models, tmp_path):
    from evomerge.backends.racer import Racer, RacingNotPossibleError

    config = write_config(tmp_path / "c.yml", tiny_models, limit=None)
    spec = prepare_run(
        str(config), str(tmp_path / "store"), build_options(task_search_path=[str(TASKS_DIR)], racing=True)
    )
    evaluator = HFEvaluator(spec.evaluation, [str(TASKS_DIR)], False)
    task = evaluator.tasks[0]
    task._aggregation_list = {"acc": max}  # as a corpus-level metric would aggregate
    with pytest.raises(RacingNotPossibleError, match="means over items.*tiny_"):
        Racer(spec, evaluator, None)


# --- a search with racing ------------------------------------------------------------------------
def test_a_racing_search_stops_hopeless_candidates_tells_their_partial_scores_and_keeps_count(racing_spec, tmp_path):
    """The search loop in this process with a real racing slot (its own board: each candidate is
    compared with the ones it scored before), the stopped candidates are told their partial score,
    never become the best, and summary.json counts the items; a second session on the same path
    counts the same, and an item budget stops the search."""
    from evomerge.core.checkpoint import GenerationCheckpoint
    from evomerge.search_loop import inline_runner, run_search_loop
    from evomerge.search_session import SearchSession

    spec = racing_spec.model_copy(
        update={
            "storage_path": str(tmp_path / "run"),
            "options": racing_spec.options.model_copy(update={"max_fevals": 16, "baselines": False}),
        }
    )
    worker = SlotWorker(spec, "slot-race")
    session = SearchSession(spec)
    run_search_loop(session, inline_runner(session, worker.run))
    summary = session.summary()
    records = list(session.records.values())
    stopped = [r for r in records if r.race.stopped]
    assert stopped, "no candidate stopped early in 16"
    assert summary["stopped_early"] == len(stopped)
    assert summary["items_scored"] == sum(r.race.items_scored for r in records) < summary["items_full"] == 200 * 16
    assert session.best.fully_scored and session.best.race.items_scored == 200
    for record in stopped:
        beaters = [session.records[k] for k in record.race.beaten_by]
        assert len(beaters) >= 2 and all(b.generation == record.generation for b in beaters)
        checkpoint = GenerationCheckpoint.model_validate_json(
            (tmp_path / "run" / "checkpoints" / f"{record.generation:05d}.json").read_text()
        )
        assert checkpoint.scores_told[checkpoint.keys.index(record.key)] == record.score
    assert SearchSession(spec).progress.items_scored == summary["items_scored"]

    budget = spec.model_copy(
        update={
            "storage_path": str(tmp_path / "budget"),
            "options": spec.options.model_copy(update={"max_items": 500}),
        }
    )
    session = SearchSession(budget)
    run_search_loop(session, inline_runner(session, SlotWorker(budget, "slot-budget").run))
    assert session.finished_reason.startswith("item budget spent")
    assert 500 <= session.progress.items_scored < 500 + 4 * 200  # the generation under way finishes


def test_baselines_and_held_out_scores_always_use_every_item(racing_spec):
    worker = SlotWorker(racing_spec, "slot-race")
    request = request_for(racing_spec, [0.5, 0.5, 0.5, 0.5])
    baseline = request.model_copy(update={"kind": "baseline", "label": "uniform merge"})
    held_out = request.model_copy(update={"held_out": True})
    assert worker._scoring(baseline, worker.evaluator) == worker.evaluator.score
    assert worker._scoring(held_out, worker.evaluator) == worker.evaluator.score
    assert worker._scoring(request, worker.evaluator).func == worker.racer.race
    outcome = worker.run(baseline)
    assert outcome.status == "ok" and outcome.race is None
