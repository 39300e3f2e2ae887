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


def test_a_snapshot_of_a_migrated_database_starts_the_next_servers_and_a_bad_one_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _template_path().parent.mkdir(parents=True)
    _template_path().write_bytes(b"not a database")
    started = []
    try:
        first = start_prefect_server(all_services=True)
        started.append(first)
        assert not first.from_template, "an unusable snapshot is dropped, the server starts fresh"
        assert _template_path().read_bytes()[:16] == b"SQLite format 3\x00", "and a good one replaces it"
        assert all(services(first)[name.lower()] for name in UNUSED_BY_ONE_RUN)

        second = start_prefect_server()
        started.append(second)
        assert second.from_template
        assert second.api_url.startswith("http://127.0.0.1:")
        assert httpx.get(second.ui_url, timeout=30).status_code == 200, "the UI is served"
        created = httpx.post(f"{second.api_url}/flows/", json={"name": "x"}, timeout=30)
        assert created.status_code in (200, 201), "the copied database takes writes"
        enabled = services(second)
        assert all(enabled[name.lower()] is False for name in UNUSED_BY_ONE_RUN)
        assert enabled["task_run_recorder"] and enabled["event_persister"], "what the UI shows of a run"
    finally:
        for server in started:
            server.stop()
