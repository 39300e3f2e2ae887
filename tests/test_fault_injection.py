"""Real evomerge processes killed with SIGKILL at the worst moments, stopped with Ctrl-C, and slot
workers killed, hung and failing.

One search is interrupted six times in a row, each run inheriting what the previous one left:
Ctrl-C with candidates in flight (exit 130, lease released, a second run refused while the first
holds the path), SIGKILL at four fail points (after ``ask``, with candidates in flight, halfway
through a checkpoint write, right after ``tell``), and SIGKILL of a run with its own private
Prefect server (which must not outlive it). Every resumed run must evaluate no recorded key again and evaluate again
what was in flight; in the end the search must have lost nothing recorded and reached exactly the
reference search's trajectory (every asked vector, every told score, the step size and mean after
each generation) and result. The interrupted runs join the session's two-node Ray cluster; the
reference ran on its own private one.

With EVOMERGE_FAULT_REPORT=FILE, each case appends its measurements (evaluations in flight and
lost, duplicated, seconds from restart to the first new evaluation) to FILE as JSON lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import REFERENCE_SEARCH, REPO, evomerge_command, read_records, run_evomerge, shared_env, trajectory

pytestmark = pytest.mark.integration

# Baselines are off: the fail points strike the search (baselines are not part of it, and the
# reference scored them already).
SEARCH = (*REFERENCE_SEARCH, "--no-baselines")

# Hits are counted per process; every kill lands after a checkpoint, so resume has one to start
# from. Before them Ctrl-C, with each evaluation slowed to 3 s so that candidates are in flight
# when it comes; after them a kill of a run with a private Prefect server right after its first
# record; then the run that ends the search.
KILL_CHAIN = [
    ("after-ask", "after-ask@2=kill"),  # generation 1 asked, nothing dispatched yet
    ("in-flight", "after-record@2=kill"),  # 2 of generation 1's 4 recorded, others running
    ("checkpoint-write", "checkpoint-write@1=kill"),  # halfway through checkpoint 1's bytes
    ("after-tell", "after-tell@2=kill"),  # generation 1 replayed, generation 2 told, checkpoint 2 not written
]


def scores(storage: Path) -> dict[str, float | None]:
    return {r["key"]: r["score"] for r in read_records(storage)}


def keys_in(log: str, event: str) -> list[str]:
    """Keys of the log lines 'candidate G.I KEY started on ...' / '... KEY recorded: ...'."""
    out = []
    for line in log.splitlines():
        parts = line.split("evomerge - candidate ", 1)
        if len(parts) == 2 and f" {event}" in parts[1]:
            out.append(parts[1].split()[1])
    return out


def run_timed(command, env) -> tuple[int, str, float | None]:
    """Run to the end; returns (exit status, output, seconds to the first candidate started)."""
    started = time.monotonic()
    first_new = None
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if first_new is None and "evomerge - candidate " in line and " started on " in line:
            first_new = time.monotonic() - started
    process.wait(timeout=600)
    return process.returncode, "".join(lines), first_new


def report(case: str, **numbers) -> None:
    path = os.environ.get("EVOMERGE_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, **numbers}) + "\n")


def interrupt_with_ctrl_c(command, env, storage: Path) -> str:
    """Start a run, wait for its first new record, check that a second run on the same path is
    refused naming the first, press Ctrl-C; returns the run's output."""
    before = len(list((storage / "records").glob("*.json")))
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((storage / "records").glob("*.json"))) <= before:
        assert process.poll() is None, process.communicate()[0][-4000:]
        time.sleep(0.2)
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"in use by another evomerge run: pid {process.pid}" in second.stderr
    process.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    output = process.communicate(timeout=60)[0]
    stop_seconds = time.monotonic() - interrupted
    assert process.returncode == 130, output[-4000:]
    assert stop_seconds < 30, f"Ctrl-C took {stop_seconds:.1f} s"
    assert "run the same command again to continue" in output
    assert not (storage / "lease.json").exists(), "the lease is released on Ctrl-C"
    return output


def test_six_interruptions_of_one_search_lose_nothing_and_end_where_the_uninterrupted_one_did(
    reference_search, tmp_path, prefect_api, ray_cluster
):
    storage = tmp_path / "run"
    command = evomerge_command(reference_search.search_config, storage, *SEARCH, "--ray-address", ray_cluster.address)
    base_env = shared_env(prefect_api)
    private_env = {k: v for k, v in base_env.items() if k != "PREFECT_API_URL"}
    links = [("ctrl-c", dict(base_env, EVOMERGE_FAILPOINTS="slot-evaluate=sleep:3"))]
    links += [(point, dict(base_env, EVOMERGE_FAILPOINTS=armed)) for point, armed in KILL_CHAIN]
    links += [("private-server", dict(private_env, EVOMERGE_FAILPOINTS="after-record@1=kill")), (None, base_env)]
    kept: dict[str, bytes] = {}  # every record that existed at some interruption, as it was then
    pending: tuple[str, set[str], dict[str, bytes]] | None = None  # the last one, checked by the next run
    for point, env in links:
        if point == "ctrl-c":
            output = interrupt_with_ctrl_c(command, env, storage)
            status, first_start = 130, None
        else:
            status, output, first_start = run_timed(command, env)
        if pending is not None:
            # What the run after an interruption did: nothing recorded evaluated again, the lost ones again.
            killed_point, in_flight, recorded_before = pending
            started_after = keys_in(output, "started on")
            duplicated = set(started_after) & {name[: -len(".json")] for name in recorded_before}
            assert duplicated == set(), f"after the {killed_point} interruption a recorded key was evaluated again"
            assert in_flight <= set(started_after), "what was in flight is evaluated by the resumed run"
            if killed_point != "ctrl-c":
                assert "took over the stale lease" in output
            report(
                killed_point,
                in_flight=len(in_flight),
                lost=len(in_flight),
                duplicated=len(duplicated),
                recorded_before_kill=len(recorded_before),
                evaluated_after_restart=len(started_after),
                seconds_restart_to_first_new_evaluation=first_start,
            )
        if point is None:
            assert status == 0, output[-4000:]
            break
        if point != "ctrl-c":
            assert status == -signal.SIGKILL, f"{point}: {output[-4000:]}"
            assert (storage / "lease.json").exists(), "kill -9 leaves the lease of a dead process"
        recorded_before = {p.name: p.read_bytes() for p in (storage / "records").glob("*.json")}
        kept.update(recorded_before)
        in_flight = set(keys_in(output, "started on")) - {name[: -len(".json")] for name in recorded_before}
        if point in ("ctrl-c", "in-flight"):
            assert in_flight, "candidates were in flight when interrupted"
        if point == "checkpoint-write":
            assert list((storage / "checkpoints").glob(".tmp-*")), "killed with a half-written temp file"
            assert not (storage / "checkpoints" / "00001.json").exists()
        if point == "after-tell":
            assert not (storage / "checkpoints" / "00002.json").exists(), "killed before checkpoint 2"
        if point == "private-server":
            assert_private_server_died_with_its_driver(output)
        pending = (point, in_flight, recorded_before)

    for name, content in kept.items():
        assert (storage / "records" / name).read_bytes() == content, f"record {name} changed"
    assert trajectory(storage) == reference_search.trajectory, "resumed trajectory differs"
    assert scores(storage) == reference_search.scores
    summary = json.loads((storage / "summary.json").read_text())
    assert summary["evaluations"] == 16 and summary["best_key"] == reference_search.summary["best_key"]
    records = read_records(storage)
    assert {r["eval_node_id"] for r in records} == ray_cluster.node_ids, "both nodes of the cluster evaluated"

    # The Prefect server shows one subflow run per generation, named by its number, and the
    # candidates' placement tags.
    with httpx.Client(base_url=prefect_api, timeout=30) as client:
        names = {fr["name"] for fr in client.post("/flow_runs/filter", json={"limit": 200}).json()}
        assert {"generation-0", "generation-1", "generation-3"} <= names
        task_runs = client.post("/task_runs/filter", json={"limit": 200}).json()
        tags = {tag for tr in task_runs for tag in tr["tags"]}
        assert {"strategy:pool", "slot:slot-0", "slot:slot-1"} <= tags


def assert_private_server_died_with_its_driver(output: str) -> None:
    """The orphan guard stops the CLI's private Prefect server within seconds of a kill -9."""
    ui = next(line for line in output.splitlines() if "Prefect UI at" in line)
    health = ui.split("Prefect UI at ")[1].split()[0] + "/api/health"
    for _ in range(40):
        try:
            httpx.get(health, timeout=1)
            time.sleep(0.5)
        except httpx.HTTPError:
            return
    pytest.fail("the private Prefect server outlived its killed driver")


def test_a_killed_a_failing_and_a_hanging_slot_worker_each_cost_at_most_their_candidate(
    reference_search, tmp_path, prefect_api, ray_cluster
):
    """Three faults in one run, each striking one candidate: candidate 0.1's worker is killed
    mid-evaluation (Ray restarts it; the candidate is retried and scores as in the reference),
    candidate 0.2's evaluator raises (recorded as failed, told as its generation's worst minus 1),
    candidate 0.3 hangs (failed at --candidate-timeout, its worker killed and restarted)."""
    (tmp_path / "once").mkdir()
    faults = "slot-evaluate:0.1=kill,slot-evaluate:0.2=raise,slot-evaluate:0.3=hang"
    env = shared_env(prefect_api, EVOMERGE_FAILPOINTS=faults, EVOMERGE_FAILPOINT_DIR=str(tmp_path / "once"))
    storage = tmp_path / "run"
    result = run_evomerge(
        reference_search.search_config,
        storage,
        "--max-fevals",
        "8",
        "--popsize",
        "4",
        "--seed",
        "7",
        "--no-baselines",
        "--candidate-timeout",
        "10",
        "--ray-address",
        ray_cluster.address,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "once").iterdir()) == [
        "slot-evaluate:0.1",
        "slot-evaluate:0.2",
        "slot-evaluate:0.3",
    ], "every fault fired once"
    records = {(r["generation"], r["index"]): r for r in read_records(storage)}
    assert len(records) == 8

    killed = records[(0, 1)]
    assert killed["status"] == "ok" and killed["attempts"] == 2
    assert killed["worker_deaths"][0].startswith(("ActorDiedError", "ActorUnavailableError"))
    assert killed["score"] == reference_search.scores[killed["key"]], "a retried candidate scores as if never killed"
    assert all(r["attempts"] == 1 for k, r in records.items() if k != (0, 1))

    failing = records[(0, 2)]
    assert failing["status"] == "failed" and failing["error"].startswith(
        "RuntimeError: fail point slot-evaluate:0.2 fired"
    )
    told = json.loads((storage / "checkpoints" / "00000.json").read_text())["scores_told"]
    ok_scores = [r["score"] for (g, _), r in records.items() if g == 0 and r["status"] == "ok"]
    assert told[2] == min(ok_scores) - 1, "failed: told as the generation's worst minus 1"

    assert told[3] == told[2], "both failures of the generation rank last, alike"

    hanging = records[(0, 3)]
    assert hanging["status"] == "failed" and "timed out after 10 s (--candidate-timeout)" in hanging["error"]
    assert sorted(k for k, r in records.items() if r["status"] == "failed") == [(0, 2), (0, 3)]
    # The restarted workers took candidates again: both slots scored candidates of generation 1.
    assert {r["slot"] for (g, _), r in records.items() if g == 1 and r["status"] == "ok"} == {"slot-0", "slot-1"}
