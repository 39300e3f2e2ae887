"""SearchSession without Prefect or Ray: recording, failure policy, stopping, replay."""

import json
import os

import numpy as np
import pytest

from evomerge.core.config import EvolveConfig
from evomerge.core.options import RunOptions
from evomerge.core.records import EvaluationOutcome, Timings
from evomerge.core.run_spec import ModelFacts, RunSpec
from evomerge.run_manifest import StorageMismatchError
from evomerge.search_loop import inline_runner, run_search_loop
from evomerge.search_session import RunStoppedError, SearchSession


def make_spec(storage, **options):
    options.setdefault("baselines", False)  # the fake scores below know candidates only
    config = EvolveConfig.model_validate(
        {
            "genome": {"models": ["/m/a", "/m/b"], "merge_method": "linear", "layer_granularity": 1},
            "tasks": ["t1", {"name": "t2", "weight": 2.0}],
        }
    )
    return RunSpec(
        config=config,
        options=RunOptions(popsize=4, **options),
        storage_path=str(storage),
        models=ModelFacts(architecture="LlamaForCausalLM", num_layers=2, dtype="float32"),
    )


def fake_score(vector):
    """A deterministic stand-in for lm-eval: peaks at weights (0.2, 0.8) per group."""
    v = np.abs(vector)
    return 1 - float(((v - np.tile([0.2, 0.8], 2)) ** 2).sum())


def outcome(vector, fail=False):
    if fail:
        return EvaluationOutcome(status="failed", error="ValueError: merge exploded", node="n", slot="s0")
    s = fake_score(np.array(vector))
    return EvaluationOutcome(
        status="ok",
        metrics={"t1": {"acc,none": s / 3}, "t2": {"acc,none": s / 3}},
        timings=Timings(merge=0.1, load=0.1, evaluate=0.5, total=0.8),
        node="n",
        slot="s0",
    )


def run(session, fail_when=lambda request: False, observers=()):
    """The search loop without Prefect or Ray, each candidate scored by ``fake_score`` in this
    process; ``observers`` hear of each generation."""

    def evaluate(request):
        return outcome(request.vector, fail_when(request))

    run_search_loop(session, inline_runner(session, evaluate), observers)
    return session


def test_budget_records_summary_and_best_config(tmp_path):
    session = run(SearchSession(make_spec(tmp_path, max_fevals=10, seed=1)))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["evaluations"] == 10 == len(list((tmp_path / "records").iterdir()))
    assert summary["generations"] == 2  # 4 + 4 told, the third generation cut after 2
    assert "inside generation 2" in summary["finished_reason"]
    best = max(session.records.values(), key=lambda r: r.score)
    assert summary["best_fitness"] == best.score
    assert f"key {best.key}" in (tmp_path / "best_config.yaml").read_text()
    assert summary["mean_seconds_per_candidate"]["total"] == pytest.approx(0.8)
    assert 0 < summary["mean_seconds_per_candidate"]["round_trip"] < 1


def test_starting_again_replays_without_evaluating_and_continues_identically(tmp_path):
    straight = run(SearchSession(make_spec(tmp_path / "a", max_fevals=16, seed=2)))
    half = run(SearchSession(make_spec(tmp_path / "b", max_fevals=8, seed=2)))
    resumed = SearchSession(make_spec(tmp_path / "b", max_fevals=16, seed=2))
    evaluated_again = []
    original = resumed.record_outcome
    resumed.record_outcome = lambda req, out, round_trip=0.0: (
        evaluated_again.append(req.key),
        original(req, out, round_trip),
    )[1]
    run(resumed)
    assert not set(evaluated_again) & set(half.records), "a recorded key was evaluated again"
    assert sorted(resumed.records) == sorted(straight.records)
    assert resumed.best.key == straight.best.key
    assert np.array_equal(resumed.searcher.mean, straight.searcher.mean)


def test_failed_candidates_are_recorded_and_ranked_last(tmp_path):
    session = run(SearchSession(make_spec(tmp_path, max_fevals=8, seed=3)), fail_when=lambda r: r.index == 1)
    failed = [r for r in session.records.values() if r.status == "failed"]
    assert len(failed) == 2 and all(r.error == "ValueError: merge exploded" and r.score is None for r in failed)
    log = json.loads((tmp_path / "checkpoints" / "00000.json").read_text())
    ok_scores = [s for k, s in zip(log["keys"], log["scores_told"], strict=True) if session.records[k].status == "ok"]
    assert log["scores_told"][1] == pytest.approx(min(ok_scores) - 1.0)


def test_a_generation_where_most_candidates_fail_stops_with_the_errors(tmp_path):
    with pytest.raises(RunStoppedError, match=r"3 of 4 candidates of generation 0 failed[\s\S]*merge exploded"):
        run(SearchSession(make_spec(tmp_path, max_fevals=8)), fail_when=lambda r: r.index != 0)
    assert len(list((tmp_path / "records").iterdir())) == 4, "the failures are recorded before stopping"


def test_a_metric_no_task_produces_stops_before_recording(tmp_path):
    session = SearchSession(make_spec(tmp_path, max_fevals=8))
    request = session.next_batch().to_evaluate[0]
    with pytest.raises(
        RunStoppedError, match="stopping at the first evaluation: task 't2' does not produce metric 'acc,none'"
    ):
        session.record_outcome(
            request, EvaluationOutcome(status="ok", metrics={"t1": {"acc,none": 0.5}, "t2": {"f1,none": 0.1}})
        )
    assert not (tmp_path / "records").exists()


def test_nan_metric_is_a_failed_candidate(tmp_path):
    session = SearchSession(make_spec(tmp_path, max_fevals=8))
    request = session.next_batch().to_evaluate[0]
    record = session.record_outcome(
        request, EvaluationOutcome(status="ok", metrics={"t1": {"acc,none": float("nan")}, "t2": {"acc,none": 0.5}})
    )
    assert record.status == "failed" and "not a finite number" in record.error


def test_another_search_on_the_same_path_is_refused(tmp_path):
    run(SearchSession(make_spec(tmp_path, max_fevals=4, seed=1)))
    with pytest.raises(StorageMismatchError, match="holds another search"):
        SearchSession(make_spec(tmp_path, max_fevals=4, seed=2))
    SearchSession(make_spec(tmp_path, max_fevals=40, seed=1))  # a larger budget continues it


def test_a_search_begun_with_the_old_default_searcher_keeps_its_fingerprint_and_is_continued_only_by_it(tmp_path):
    """0.2's default searcher was cma-es (sigma0 1/6), and its fingerprint had neither field
    set apart: a storage path it wrote keeps its fingerprint, and the new default (cma-es-box)
    refuses to continue it with a message that says how to."""
    from evomerge.core.records import canonical_json
    from evomerge.core.run_spec import _IN_FINGERPRINT_UNLESS, _NOT_IN_FINGERPRINT

    old = make_spec(tmp_path, max_fevals=8, seed=1, searcher="cma-es")
    assert old.options.sigma0 == 1 / 6
    # the fingerprint as 0.2 computed it: every search-shaping option but searcher (and those
    # added since, at their 0.2 behaviour: racing off)
    shaping = old.options.model_dump(mode="json", exclude=_NOT_IN_FINGERPRINT | set(_IN_FINGERPRINT_UNLESS))
    payload = {
        "config": old.config.model_dump(mode="json", exclude={"held_out_tasks"}),
        "options": shaping,
        "models": old.models.model_dump(mode="json"),
    }
    import hashlib

    assert old.fingerprint() == hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]
    run(SearchSession(old))
    with pytest.raises(StorageMismatchError, match="begun with --searcher cma-es .*add --searcher cma-es"):
        SearchSession(make_spec(tmp_path, max_fevals=8, seed=1))
    assert make_spec(tmp_path, seed=1).fingerprint() != old.fingerprint()
    SearchSession(make_spec(tmp_path, max_fevals=16, seed=1, searcher="cma-es"))  # continues it


def test_a_search_begun_with_one_box_searcher_is_continued_only_with_it(tmp_path):
    run(SearchSession(make_spec(tmp_path, max_fevals=8, seed=1, searcher="cma-es-box-mirrored-elitist")))
    with pytest.raises(
        StorageMismatchError,
        match=r"begun with --searcher cma-es-box-mirrored-elitist.*add --searcher cma-es-box-mirrored",
    ):
        SearchSession(make_spec(tmp_path, max_fevals=16, seed=1))
    SearchSession(make_spec(tmp_path, max_fevals=16, seed=1, searcher="cma-es-box-mirrored-elitist"))  # continues


def test_the_default_searcher_asks_inside_the_search_box(tmp_path):
    session = SearchSession(make_spec(tmp_path, max_fevals=24, seed=3))
    assert session.searcher.name == "cma-es-box"
    run(session)
    vectors = np.array([r.vector for r in session.records.values()])
    lower, upper = session.space.box()
    assert (vectors >= np.array(lower)).all() and (vectors <= np.array(upper)).all()


def test_the_same_search_on_s3_matches_the_local_one_and_resumes(tmp_path, s3_endpoint):
    import uuid

    from evomerge.backends.run_lease import RunLease
    from evomerge.backends.run_store import RunStore

    local = run(SearchSession(make_spec(tmp_path / "local", max_fevals=16, seed=7)))
    path = f"s3://evomerge-test/{uuid.uuid4().hex}"
    with RunLease(RunStore(path)):
        run(SearchSession(make_spec(path, max_fevals=8, seed=7)))
    resumed = run(SearchSession(make_spec(path, max_fevals=16, seed=7)))
    assert sorted(resumed.records) == sorted(local.records)
    assert {k: r.score for k, r in resumed.records.items()} == {k: r.score for k, r in local.records.items()}
    store = RunStore(path)
    assert len(store.fs.ls(store.path("records"))) == 16
    assert "best merge" in store.read_text("best_config.yaml")


def test_no_credential_reaches_what_a_run_writes(tmp_path, s3_endpoint, monkeypatch):
    import uuid

    from evomerge.backends.run_store import RunStore

    monkeypatch.setenv("WANDB_API_KEY", "sentinel-wandb-key-0123")
    path = f"s3://evomerge-test/{uuid.uuid4().hex}"
    run(SearchSession(make_spec(path, max_fevals=8, seed=1)))
    store = RunStore(path)
    files = store.fs.find(store.path(""))
    assert len(files) >= 10
    everything = b"".join(store.fs.cat_file(f) for f in files)
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"], "sentinel-wandb-key-0123"):
        assert secret.encode() not in everything


def test_runs_with_a_generation_budget_continue_one_search_exactly(tmp_path):
    """Scheduled long runs: each run evaluates its generations and pauses; the next one on the
    same storage path continues, and the whole equals one uninterrupted run."""
    straight = run(SearchSession(make_spec(tmp_path / "straight", max_fevals=16, seed=6)))
    storage = tmp_path / "scheduled"
    runs = []
    while True:
        session = run(SearchSession(make_spec(storage, max_fevals=16, seed=6, generations_per_run=1)))
        runs.append((session.progress.generations_this_run, session.paused))
        if not session.paused:
            break
    assert runs == [(1, True), (1, True), (1, True), (1, False)], "the 4th run spends the budget: done"
    assert json.loads((storage / "summary.json").read_text())["paused"] is False
    assert sorted(session.records) == sorted(straight.records)
    assert np.array_equal(session.searcher.mean, straight.searcher.mean)
    assert session.searcher.sigma == straight.searcher.sigma


def test_terminal_progress_shows_one_line_per_generation_only_on_a_terminal(tmp_path):
    import io

    from evomerge.terminal_progress import TerminalProgress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    session = SearchSession(make_spec(tmp_path, max_fevals=8, seed=1))
    run(session, observers=[TerminalProgress(session, tty), TerminalProgress(session, pipe)])
    lines = tty.getvalue().splitlines()
    assert len(lines) == 2 and pipe.getvalue() == ""
    assert lines[0].startswith("evomerge: generation 0: 4/8 evaluations, best fitness ")
    assert "generation mean" in lines[0] and "s elapsed" in lines[0] and "s left" in lines[0]
    assert "8/8 evaluations" in lines[1] and "~0 s left" in lines[1]


def test_a_search_that_only_asks_evaluated_merges_stops_converged_and_stays_stopped(tmp_path):
    """slerp whose best t sits past the clipping bounds: CMA-ES keeps asking vectors that decode
    to merges already evaluated. The run must stop (not loop until pycma's state turns NaN), and
    a resumed run must see the same."""
    config = EvolveConfig.model_validate(
        {"genome": {"models": ["/m/a", "/m/b"], "merge_method": "slerp", "layer_granularity": 1}, "tasks": ["t1"]}
    )
    spec = RunSpec(
        config=config,
        options=RunOptions(popsize=4, max_fevals=200, seed=0, baselines=False),
        storage_path=str(tmp_path),
        models=ModelFacts(architecture="LlamaForCausalLM", num_layers=2, dtype="float32"),
    )

    def clipped_peak(request):
        t = np.clip(np.array(request.vector), 0, 1)
        return EvaluationOutcome(status="ok", metrics={"t1": {"acc,none": 1 - float(((t - [1, 0]) ** 2).sum())}})

    session = SearchSession(spec)
    reason = run_search_loop(session, inline_runner(session, clipped_peak))
    assert reason.startswith("search converged: the last 10 generations"), reason
    assert session.evaluations < 200 and session.best.parameters == {"layers 0-0/t": 1.0, "layers 1-1/t": 0.0}
    resumed = SearchSession(spec)
    assert resumed.progress.idle_generations == 10 and resumed.should_stop() == reason
    assert resumed.search_finished, "a converged search gets its held-out scores like a spent one"


def test_failures_of_the_inputs_do_not_trap_the_path_and_retry_failed_continues_as_if_never_broken(tmp_path):
    """Every candidate of a generation failed (say, a broken model file, since repaired): the
    path is not 'done' with no best. --retry-failed moves the failed records and the checkpoints
    that told them aside (kept under quarantine/) and the search goes on exactly as a search that
    never saw the fault."""
    broken = tmp_path / "broken"
    session = SearchSession(make_spec(broken, max_fevals=8, seed=3, max_failed_fraction=1.0))
    run(session, fail_when=lambda request: request.generation == 1)
    assert session.best is not None  # generation 0 was fine
    # A path where every evaluation failed is not a finished search with a result:
    run(
        SearchSession(make_spec(tmp_path / "all-failed", max_fevals=4, seed=3, max_failed_fraction=1.0)), lambda r: True
    )
    again = SearchSession(make_spec(tmp_path / "all-failed", max_fevals=4, seed=3))
    assert again.search_finished
    with pytest.raises(RunStoppedError, match=r"all 4 evaluations failed, the first with ValueError: merge exploded"):
        again.check_some_candidate_scored()

    retried = SearchSession(make_spec(broken, max_fevals=8, seed=3, retry_failed=True))
    (note,) = retried.restore_notes
    assert "4 failed record(s) moved to quarantine/, and the checkpoints of generation 1 on (1)" in note
    assert sorted(p.name for p in (broken / "quarantine" / "checkpoints").iterdir()) == ["00001.json"]
    assert len(list((broken / "quarantine" / "records").iterdir())) == 4, "kept, not deleted"
    run(retried)
    clean = run(SearchSession(make_spec(tmp_path / "clean", max_fevals=8, seed=3)))
    assert {k: r.score for k, r in retried.records.items()} == {k: r.score for k, r in clean.records.items()}
    assert [json.loads(p.read_text())["scores_told"] for p in sorted((broken / "checkpoints").glob("*.json"))] == [
        json.loads(p.read_text())["scores_told"] for p in sorted((tmp_path / "clean" / "checkpoints").glob("*.json"))
    ]
