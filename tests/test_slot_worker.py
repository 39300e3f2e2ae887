"""SlotWorker without Ray: a real mergekit merge and a real lm-eval run; failures are data."""

from pathlib import Path

import numpy as np
import pytest
from conftest import TASKS_DIR, write_config

from evomerge.backends.prepare import build_options, prepare_run
from evomerge.backends.slot_worker import SlotWorker
from evomerge.core.records import CandidateRequest, candidate_key


@pytest.fixture(scope="module")
def worker_and_spec(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    config = write_config(tmp / "c.yml", tiny_models, limit=16)
    spec = prepare_run(str(config), str(tmp / "store"), build_options(task_search_path=[str(TASKS_DIR)]))
    return SlotWorker(spec, "slot-test"), spec


def request_for(spec, x, index=0):
    config = spec.search_space().decode(np.asarray(x))
    return CandidateRequest(
        key=candidate_key(config, spec.evaluation), generation=0, index=index, vector=list(x), merge_config=config
    )


def test_a_candidate_is_merged_scored_and_cleaned_up(worker_and_spec):
    worker, spec = worker_and_spec
    outcome = worker.run(request_for(spec, [0.5, 0.5, 0.5, 0.5]))
    assert outcome.status == "ok", outcome.error
    assert set(outcome.metrics) == {"tiny_shift", "tiny_rev"}
    assert 0.0 <= outcome.metrics["tiny_rev"]["acc,none"] <= 1.0
    assert outcome.timings.merge > 0 and outcome.timings.load > 0 and outcome.timings.evaluate > 0
    assert outcome.slot == "slot-test"
    assert not list((Path(worker.store.root) / "merged").glob("*")), "the merged folder is deleted"


def test_scoring_is_repeatable_with_reused_task_objects(worker_and_spec):
    worker, spec = worker_and_spec
    first = worker.run(request_for(spec, [0.3, 0.9, 0.1, 0.6]))
    second = worker.run(request_for(spec, [0.3, 0.9, 0.1, 0.6]))
    assert first.metrics == second.metrics


def test_scoring_a_candidate_starts_no_process_and_leaves_lm_eval_as_it_was(worker_and_spec, monkeypatch):
    """lm-eval's simple_evaluate describes the machine after every call (``pip list``, ``git
    describe``: 1.5 s of CPU); the search skips that report, and only for its own calls."""
    import subprocess

    import lm_eval.evaluator

    worker, spec = worker_and_spec
    started = []
    real_init = subprocess.Popen.__init__

    def recording_init(self, *args, **kwargs):
        started.append(args[0] if args else kwargs.get("args"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording_init)
    report = lm_eval.evaluator.add_env_info
    outcome = worker.run(request_for(spec, [0.4, 0.6, 0.4, 0.6]))
    assert outcome.status == "ok" and started == []
    assert lm_eval.evaluator.add_env_info is report


def test_a_broken_candidate_fails_without_raising(worker_and_spec):
    worker, spec = worker_and_spec
    request = request_for(spec, [0.5, 0.5, 0.5, 0.5])
    broken = dict(request.merge_config, base_model="/nonexistent/model")
    outcome = worker.run(request.model_copy(update={"merge_config": broken}))
    assert outcome.status == "failed"
    assert outcome.error


def test_a_metric_no_task_produces_stops_the_run_at_the_first_outcome(tiny_models, tmp_path):
    from evomerge.search_session import RunStoppedError, SearchSession

    config = write_config(
        tmp_path / "c.yml", tiny_models, limit=4, tasks=[{"name": "tiny_rev", "metric": "exact_match,none"}]
    )
    # The runtime check, for tasks whose YAML lists no metrics: tiny_rev's lists acc, so the
    # check before any work (tests/test_validation.py) is skipped here to reach this one.
    options = build_options(task_search_path=[str(TASKS_DIR)])
    spec = prepare_run(str(config), str(tmp_path / "s"), options, check_task_names=False)
    request = request_for(spec, [0.5] * 4)
    outcome = SlotWorker(spec, "s").run(request)
    assert outcome.status == "ok" and "exact_match,none" not in outcome.metrics["tiny_rev"]
    with pytest.raises(
        RunStoppedError, match="task 'tiny_rev' does not produce metric 'exact_match,none'; it produces acc,none. Set"
    ):
        SearchSession(spec).record_outcome(request, outcome)
    assert not (tmp_path / "s" / "records").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear", "slerp", "della"])
def test_in_memory_scores_equal_on_disk_scores(tiny_models, tmp_path, method):
    """--in-memory merges into a resident model and scores it through one HFLM: the same metrics
    as mergekit's folder reloaded by lm-eval, random methods too (della: seeded with the run's
    seed in memory as run_merge is on disk)."""
    genome = {"merge_method": method}
    if method in ("linear", "slerp"):
        genome["models"] = [str(tiny_models["shift_expert"]), str(tiny_models["rev_expert"])]
        genome["base_model"] = str(tiny_models["shift_expert"]) if method == "slerp" else None
    config = write_config(tmp_path / "c.yml", tiny_models, limit=16, genome=genome)
    options = dict(task_search_path=[str(TASKS_DIR)])
    on_disk = prepare_run(str(config), str(tmp_path / "disk"), build_options(**options))
    in_memory = prepare_run(str(config), str(tmp_path / "mem"), build_options(in_memory=True, **options))
    disk_worker, memory_worker = SlotWorker(on_disk, "d"), SlotWorker(in_memory, "m")
    rng = np.random.default_rng(0)
    for index in range(3):
        x = rng.uniform(0.05, 0.95, on_disk.search_space().dimension)
        expected = disk_worker.run(request_for(on_disk, x, index))
        got = memory_worker.run(request_for(in_memory, x, index))
        assert expected.status == got.status == "ok", (expected.error, got.error)
        assert got.metrics == expected.metrics
        assert got.timings.load == 0.0, "nothing is loaded per candidate"
