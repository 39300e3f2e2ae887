"""The private Prefect server: started from a snapshot of a migrated database after the first
start, falls back to a fresh one when the snapshot is unusable, runs only the services one run
needs, and serves API and UI on loopback."""

import httpx
import pytest

from evomerge.backends.prefect_server import UNUSED_BY_ONE_RUN, _template_path, start_prefect_server

pytestmark = pytest.mark.integration


def services(server) -> dict:
    settings = httpx.get(f"{server.api_url}/admin/settings", timeout=30).json()
    return {
        name: value.get("enabled") for name, value in settings["server"]["services"].items() if isinstance(value, dict)
    }


def test_a_snapshot_of_the_first_servers_database_starts_the_next_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    started = []
    try:
        first = start_prefect_server()
        started.append(first)
        assert not first.from_template and _template_path().is_file()
        second = start_prefect_server()
        started.append(second)
        assert second.from_template
        assert httpx.get(second.ui_url, timeout=30).status_code == 200, "the UI is served"
        run = httpx.post(f"{second.api_url}/flows/", json={"name": "x"}, timeout=30)
        assert run.status_code in (200, 201), "the copied database takes writes"
        assert second.api_url.startswith("http://127.0.0.1:")
        enabled = services(second)
        assert all(enabled[name.lower()] is False for name in UNUSED_BY_ONE_RUN)
        assert enabled["task_run_recorder"] and enabled["event_persister"], "what the UI shows of a run"

        _template_path().write_bytes(b"not a database")
        third = start_prefect_server(all_services=True)
        started.append(third)
        assert not third.from_template, "an unusable snapshot is dropped, the server starts fresh"
        assert _template_path().read_bytes()[:16] == b"SQLite format 3\x00", "and a good one replaces it"
        assert all(services(third)[name.lower()] for name in UNUSED_BY_ONE_RUN)
    finally:
        for server in started:
            server.stop()
