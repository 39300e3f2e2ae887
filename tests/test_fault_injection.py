"""Real evomerge processes killed with SIGKILL at the worst moments, slot workers killed and hung.

Each kill point is armed through a fail point (evomerge/failpoints.py) in an otherwise normal CLI
run; the same command is then run again. One search is killed at four points in a row, each
resumed run inheriting what the previous kill left. Every resumed run must evaluate no recorded
key again and re-evaluate what was in flight; in the end the search must have lost nothing
recorded and reached exactly the uninterrupted run's trajectory (every asked vector, every told
score, the step size and mean after each generation) and result.

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

import pytest

from conftest import REPO, evomerge_command, read_records, run_evomerge, write_config

pytestmark = pytest.mark.integration

# Baselines are off: the fail points strike the search, and a once-only fail point in a slot
# must hit a candidate.
# Baselines are off: the fail points strike the search, and a once-only fail point in a slot
# must hit a candidate.
ARGS = ("--max-fevals", "16", "--popsize", "4", "--seed", "7", "--no-baselines")
SHORT = ("--max-fevals", "8", "--popsize", "4", "--seed", "7", "--no-baselines")  # the reference's first two generations

# One search, killed four times in a row, each run resuming the last one's leftovers. Hits are
# counted per process; every kill lands after a checkpoint, so resume has one to start from.
KILL_CHAIN = [
    ("after-ask", "after-ask@2=kill"),  # generation 1 asked, nothing dispatched yet
    ("in-flight", "after-record@2=kill"),  # 2 of generation 1's 4 recorded, others running
    ("checkpoint-write", "checkpoint-write@1=kill"),  # halfway through checkpoint 1's bytes
    ("after-tell", "after-tell@2=kill"),  # generation 1 replayed, generation 2 told, checkpoint 2 not written
]


def trajectory(storage: Path) -> list:
    out = []
    for path in sorted((storage / "checkpoints").glob("*.json")):
        cp = json.loads(path.read_text())
        out.append([cp[k] for k in ("generation", "keys", "vectors", "scores_told", "sigma_after", "mean_after")])
    return out


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
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
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


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory, prefect_api):
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "config.yml", tiny_models)
    storage = tmp / "run"
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    result = run_evomerge(config, storage, *ARGS, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(trajectory(storage)) == 4
    summary = json.loads((storage / "summary.json").read_text())
    return {"config": config, "storage": storage, "trajectory": trajectory(storage), "scores": scores(storage),
            "best_key": summary["best_key"]}


def test_kill_9_of_the_driver_four_times_then_the_same_command_finishes_the_same_run(reference, tmp_path, prefect_api):
    storage = tmp_path / "run"
    base_env = dict(os.environ, PREFECT_API_URL=prefect_api)
    kept: dict[str, bytes] = {}  # every record that existed at some kill, as it was then
    pending: tuple[str, set[str], dict[str, bytes]] | None = None  # the last kill, checked by the next run
    for point, armed in [*KILL_CHAIN, (None, None)]:
        env = dict(base_env, **({"EVOMERGE_FAILPOINTS": armed} if armed else {}))
        status, output, first_start = run_timed(evomerge_command(reference["config"], storage, *ARGS), env)
        if pending is not None:
            # What the run after a kill did: nothing recorded evaluated again, the lost ones again.
            killed_point, in_flight, recorded_before = pending
            started_after = keys_in(output, "started on")
            duplicated = set(started_after) & {name[: -len(".json")] for name in recorded_before}
            assert duplicated == set(), f"after the {killed_point} kill a recorded key was evaluated again"
            assert in_flight <= set(started_after), "what was in flight is evaluated by the resumed run"
            assert "took over the stale lease" in output
            report(killed_point, in_flight=len(in_flight), lost=len(in_flight), duplicated=len(duplicated),
                   recorded_before_kill=len(recorded_before), evaluated_after_restart=len(started_after),
                   seconds_restart_to_first_new_evaluation=first_start)
        if point is None:
            assert status == 0, output[-4000:]
            break
        assert status == -signal.SIGKILL, f"{point}: {output[-4000:]}"
        recorded_before = {p.name: p.read_bytes() for p in (storage / "records").glob("*.json")}
        kept.update(recorded_before)
        in_flight = set(keys_in(output, "started on")) - {name[: -len(".json")] for name in recorded_before}
        if point == "in-flight":
            assert in_flight, "candidates were in flight when killed"
        if point == "checkpoint-write":
            assert list((storage / "checkpoints").glob(".tmp-*")), "killed with a half-written temp file"
            assert not (storage / "checkpoints" / "00001.json").exists()
        if point == "after-tell":
            assert not (storage / "checkpoints" / "00002.json").exists(), "killed before checkpoint 2"
        assert (storage / "lease.json").exists(), "kill -9 leaves the lease of a dead process"
        pending = (point, in_flight, recorded_before)

    for name, content in kept.items():
        assert (storage / "records" / name).read_bytes() == content, f"record {name} changed"
    assert trajectory(storage) == reference["trajectory"], "resumed trajectory differs"
    assert scores(storage) == reference["scores"]
    summary = json.loads((storage / "summary.json").read_text())
    assert summary["evaluations"] == 16 and summary["best_key"] == reference["best_key"]


def test_a_slot_worker_killed_mid_evaluation_is_replaced_and_its_candidate_retried(reference, tmp_path, prefect_api):
    (tmp_path / "once").mkdir()
    env = dict(os.environ, PREFECT_API_URL=prefect_api, EVOMERGE_FAILPOINTS="slot-evaluate=kill",
               EVOMERGE_FAILPOINT_DIR=str(tmp_path / "once"))
    storage = tmp_path / "run"
    result = run_evomerge(reference["config"], storage, *SHORT, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "once" / "slot-evaluate").exists(), "the fail point fired"
    records = read_records(storage)
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    assert sorted(r["attempts"] for r in records) == [1] * 7 + [2]
    (retried,) = [r for r in records if r["attempts"] == 2]
    assert retried["generation"] == 0
    assert retried["worker_deaths"][0].startswith(("ActorDiedError", "ActorUnavailableError"))
    assert trajectory(storage) == reference["trajectory"][:2], "a retried candidate changes nothing"


def test_a_hanging_candidate_is_failed_at_its_timeout_and_the_run_goes_on(reference, tmp_path, prefect_api):
    (tmp_path / "once").mkdir()
    env = dict(os.environ, PREFECT_API_URL=prefect_api, EVOMERGE_FAILPOINTS="slot-evaluate=hang",
               EVOMERGE_FAILPOINT_DIR=str(tmp_path / "once"))
    storage = tmp_path / "run"
    started = time.monotonic()
    result = run_evomerge(reference["config"], storage, *SHORT, "--candidate-timeout", "10", env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_records(storage)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == 8 and len(failed) == 1
    assert "timed out after 10 s (--candidate-timeout)" in failed[0]["error"]
    assert failed[0]["generation"] == 0
    # The restarted worker took candidates again after the timeout.
    later = [r for r in records if r["generation"] > 0]
    assert {r["slot"] for r in later} == {"slot-0", "slot-1"}
    assert elapsed < 300


def test_a_failing_evaluator_is_recorded_and_the_run_goes_on(reference, tmp_path, prefect_api):
    (tmp_path / "once").mkdir()
    env = dict(os.environ, PREFECT_API_URL=prefect_api, EVOMERGE_FAILPOINTS="slot-evaluate=raise",
               EVOMERGE_FAILPOINT_DIR=str(tmp_path / "once"))
    storage = tmp_path / "run"
    result = run_evomerge(reference["config"], storage, "--max-fevals", "4", "--popsize", "4", "--seed", "7", "--no-baselines", env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_records(storage)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == 4 and len(failed) == 1
    assert failed[0]["error"].startswith("RuntimeError: fail point slot-evaluate fired")
    told = json.loads((storage / "checkpoints" / "00000.json").read_text())["scores_told"]
    ok_scores = [r["score"] for r in records if r["status"] == "ok"]
    assert min(told) == min(ok_scores) - 1, "failed: told as the generation's worst minus 1"
