"""--vllm for real, on vLLM's CPU build (tests marked vllm run in `.venv-vllm`, built by
`./dev setup-vllm`; `./dev test` runs them after the others). A search through the real flow
and Ray slots scores every candidate exactly as hf does: on disk with each strategy (an engine
per candidate), and in memory (one resident engine per slot, its weights swapped) on the
two-node test cluster with a slot worker killed under its engine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time

import pytest
from conftest import REPO, read_records, run_evomerge

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

CONFIG = REPO / "examples" / "multiskill" / "config.yml"
TASKS = REPO / "examples" / "multiskill" / "tasks"
SEARCH = (
    "--task-search-path",
    str(TASKS),
    "--max-fevals",
    "4",
    "--popsize",
    "4",
    "--no-baselines",
    "--no-save-final-model",
)


def assert_scored_as_hf_scores_them(storage, hf_slot) -> None:
    """Every candidate of the run: recorded ok, with the metrics an hf slot gives the same merge
    (hence the same fitness, and the same search)."""
    records = read_records(storage)
    assert len(records) == 4 and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    for record in records:
        assert record["metrics"] == hf_slot(record), f"candidate {record['generation']}.{record['index']}"


def engine_processes() -> set[str]:
    """Processes that hold an engine: vLLM's own, and the slot actors' (an in-process engine)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if "VLLM" in line or "SlotWorker" in line}


def assert_no_engine_outlived_its_run(before: set[str]) -> None:
    for _ in range(20):  # Ray reaps a killed actor's process within moments
        if engine_processes() <= before:
            return
        time.sleep(0.5)
    assert engine_processes() <= before, "an engine's process outlived its run"


# Each on-disk candidate scored on the held-out tasks starts an engine: one is enough to test it.
ON_DISK = (*SEARCH, "--held-out-top", "1")


@pytest.fixture(scope="module")
def hf_slot(tmp_path_factory):
    """The reference: a slot of the same run with lm-eval's hf model, in this process; the
    metrics it gives a record's merge (each merge scored once)."""
    from evomerge.backends.prepare import build_options, prepare_run
    from evomerge.backends.slot_worker import SlotWorker
    from evomerge.core.records import CandidateRequest

    options = build_options(task_search_path=[str(TASKS)], cpu_slots=1)
    slot = SlotWorker(prepare_run(str(CONFIG), str(tmp_path_factory.mktemp("hf")), options), "hf")
    metrics: dict[str, dict] = {}

    def score(record: dict) -> dict:
        if record["key"] not in metrics:
            request = CandidateRequest(
                key=record["key"], generation=0, index=0, vector=[], merge_config=record["merge_config"]
            )
            outcome = slot.run(request)
            assert outcome.status == "ok", outcome.error
            metrics[record["key"]] = outcome.metrics
        return metrics[record["key"]]

    return score


# serial scores through the same merge task and slot call as buffered (which adds the lookahead);
# it ran by hand with the same result (README), and is left out to keep CI under 20 minutes.
@pytest.mark.parametrize("strategy", ["pool", "buffered"])
def test_a_vllm_search_scores_every_candidate_as_hf_does_and_leaves_no_engine_behind(
    strategy, hf_slot, ray_cluster, tmp_path
):
    """The multi-skill example, 4 candidates on 2 slots (the two-node test cluster), on disk, per
    strategy (an engine per candidate folder, in the slot's process): every score equals hf's
    for the same candidate."""
    assert importlib.util.find_spec("vllm"), "run in ./dev setup-vllm's environment (./dev test does)"
    before = engine_processes()
    storage = tmp_path / "vllm"
    result = run_evomerge(
        CONFIG, storage, *ON_DISK, "--vllm", "--strategy", strategy, "--ray-address", ray_cluster.address
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert_scored_as_hf_scores_them(storage, hf_slot)
    held_out = read_records(storage, "held_out")
    assert held_out and all(r["status"] == "ok" for r in held_out), "the best candidate scored on the held-out tasks"
    assert_no_engine_outlived_its_run(before)


def test_an_in_memory_vllm_search_on_two_nodes_scores_as_hf_through_a_killed_slot_worker(
    hf_slot, ray_cluster, tmp_path
):
    """--vllm --in-memory on the two-node test cluster: each slot starts one engine and swaps
    every candidate's weights into it. Candidate 0.1's worker is killed (SIGKILL, engine and
    all) when it starts; Ray restarts the actor, which starts a new engine, and the candidate is
    retried there. Every score equals hf's on disk; both nodes scored; no slot process is left."""
    (tmp_path / "once").mkdir()
    env = dict(os.environ, EVOMERGE_FAILPOINTS="slot-evaluate:0.1=kill", EVOMERGE_FAILPOINT_DIR=str(tmp_path / "once"))
    before = engine_processes()
    storage = tmp_path / "run"
    result = run_evomerge(
        CONFIG, storage, *SEARCH, "--vllm", "--in-memory", "--ray-address", ray_cluster.address, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (tmp_path / "once" / "slot-evaluate:0.1").exists(), "the worker was killed"
    assert_scored_as_hf_scores_them(storage, hf_slot)
    records = {(r["generation"], r["index"]): r for r in read_records(storage)}
    killed = records[(0, 1)]
    assert killed["attempts"] == 2 and killed["worker_deaths"][0].startswith(
        ("ActorDiedError", "ActorUnavailableError")
    )
    assert all(r["attempts"] == 1 for key, r in records.items() if key != (0, 1))
    assert {r["eval_node_id"] for r in records.values()} == ray_cluster.node_ids
    assert all(r["timings"]["load"] == 0 for r in records.values()), (
        "scored by the resident engine, not a loaded folder"
    )
    output = result.stdout + result.stderr
    assert output.count("ResidentEngine shut down") == 2, "each slot shut its engine down before it was killed"
    assert_no_engine_outlived_its_run(before)
