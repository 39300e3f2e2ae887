"""`prefect deployment run evolve/main` end to end: a real Prefect server, the project's
prefect.yaml deployed with `prefect deploy`, a process work pool and worker, triggered runs that
must reach Completed and leave the search in their storage path; and scheduled long runs, each
with a generation budget, continuing one search exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from conftest import REPO, TASKS_DIR, read_records, write_config

pytestmark = pytest.mark.integration

POOL = "evomerge-process"  # the pool prefect.yaml names


def prefect(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def deployed(prefect_api):
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", env=env)
    prefect("--no-prompt", "deploy", "--all", env=env)
    return env


def deployment_run(env: dict, api: str, **parameters) -> dict:
    """`prefect deployment run evolve/main --param ...`, then one worker pass; the run's final state."""
    args = [a for k, v in parameters.items() for a in ("--param", f"{k}={json.dumps(v)}")]
    triggered = prefect("deployment", "run", "evolve/main", *args, env=env)
    flow_run_id = triggered.stdout.split("UUID:", 1)[1].split()[0] if "UUID:" in triggered.stdout else None
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--run-once"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = worker.communicate(timeout=600)[0]
    finally:
        if worker.poll() is None:
            worker.kill()
    with httpx.Client(base_url=api, timeout=30) as client:
        if flow_run_id:
            run = client.get(f"/flow_runs/{flow_run_id}").json()
        else:
            run = client.post("/flow_runs/filter", json={
                "deployments": {"name": {"any_": ["main"]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 1,
            }).json()[0]
    assert run["state_type"] == "COMPLETED", output[-5000:]
    return run


def trajectory(storage):
    return [[cp[k] for k in ("keys", "vectors", "scores_told", "sigma_after", "mean_after")]
            for cp in (json.loads(p.read_text()) for p in sorted((storage / "checkpoints").glob("*.json")))]


def test_deployment_runs_continue_one_search_exactly(deployed, tiny_models, tmp_path, prefect_api):
    config = write_config(tmp_path / "config.yml", tiny_models)
    common = {"config": str(config), "task_search_path": [str(TASKS_DIR)], "max_fevals": 8, "popsize": 4,
              "seed": 11, "cpu_slots": 2, "save_final_model": False}

    whole = tmp_path / "whole"
    deployment_run(deployed, prefect_api, storage_path=str(whole), **common)
    records = read_records(whole)
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    assert json.loads((whole / "summary.json").read_text())["evaluations"] == 8

    # A scheduled long run: each flow run has a budget of one generation and resumes the last.
    scheduled = tmp_path / "scheduled"
    deployment_run(deployed, prefect_api, storage_path=str(scheduled), generations_per_run=1, **common)
    first = json.loads((scheduled / "summary.json").read_text())
    assert first["paused"] is True and first["evaluations"] == 4
    deployment_run(deployed, prefect_api, storage_path=str(scheduled), generations_per_run=1, **common)
    second = json.loads((scheduled / "summary.json").read_text())
    assert second["paused"] is False and second["evaluations"] == 8
    assert trajectory(scheduled) == trajectory(whole)
    assert {r["key"]: r["score"] for r in read_records(scheduled)} == {r["key"]: r["score"] for r in records}
