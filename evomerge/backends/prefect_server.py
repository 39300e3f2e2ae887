"""A private Prefect API server for one CLI run.

Tasks run in Ray worker processes; without a real API server each would start its own temporary
server on one SQLite file. With no ``PREFECT_API_URL`` set, the CLI starts Prefect's server app
(``prefect.server.api.server:create_app`` under uvicorn, UI included, as ``prefect server start``
runs it) on a free loopback port with its own PREFECT_HOME (so its database is private), and
stops it at exit. Set ``PREFECT_API_URL`` to use your own server (e.g. Postgres-backed) instead.

Start-up cost. A fresh database is migrated at start (about 7 s of a 14 s start on 2 cores), so
the first server on a machine leaves a snapshot of its freshly migrated, still empty database in
the user's cache (``~/.cache/evomerge``, one per Prefect version, written with SQLite's backup
API), and later servers start from a copy of it: about 6 s. A snapshot the server cannot start
from is deleted and the server started again on a fresh database.

``launch_prefect_server`` returns at once (the URL is known before the server answers), so the
caller can start Ray and the evaluation slots while the server boots; ``wait_ready`` then waits.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DATABASE = "prefect.db"
# Background services a private server for one run never needs: it has no deployments or
# schedules, no workers, no paused runs, no automations and no concurrency leases. Each polls the
# database on its own loop, CPU the evaluation slots need on a small machine. What the UI shows of
# the run (flow runs, task runs from their events, artifacts, logs) needs none of them.
UNUSED_BY_ONE_RUN = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "TRIGGERS")


class PrefectServerError(RuntimeError):
    pass


@dataclass
class PrefectServer:
    process: subprocess.Popen
    api_url: str
    ui_url: str
    home: str
    log_path: str
    from_template: bool  # started from a snapshot of a migrated database
    all_services: bool

    def wait_ready(self, timeout: float = 90.0) -> PrefectServer:
        """Block until the API answers; on the first server of a Prefect version, leave the
        snapshot of its freshly migrated database for the next ones."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrefectServerError(
                    f"the Prefect server exited with code {self.process.returncode}; its log:\n{_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        if not self.from_template:
                            _save_template(Path(self.home) / DATABASE)
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise PrefectServerError(f"the Prefect server did not answer within {timeout:.0f} s:\n{_tail(self.log_path)}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        # The server runs in its own process group (start_new_session): stop exactly that group.
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=5)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_prefect_server(
    host: str = "127.0.0.1", use_template: bool = True, all_services: bool = False
) -> PrefectServer:
    """Start the server process and return without waiting for it (see ``wait_ready``).
    ``all_services``: also the services one run does not use (a server that deployments and
    workers use, as in the tests of those)."""
    port = free_port(host)
    home = tempfile.mkdtemp(prefix="evomerge-prefect-")
    log_path = os.path.join(home, "server.log")
    template = _template_path()
    # The snapshot is of the default SQLite database; a server on another database starts as is.
    own_database = "PREFECT_API_DATABASE_CONNECTION_URL" in os.environ
    from_template = use_template and not own_database and template.is_file()
    if from_template:
        shutil.copyfile(template, os.path.join(home, DATABASE))
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        {
            "PREFECT_HOME": home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
            "PREFECT__SERVER_FINAL": "1",  # the app serves the UI, as `prefect server start` does
        }
    )
    if not all_services:
        env.update({f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in UNUSED_BY_ONE_RUN})
    command = [
        sys.executable,
        "-m",
        "evomerge.backends.orphan_guard",
        str(os.getpid()),
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    return PrefectServer(
        process, f"http://{host}:{port}/api", f"http://{host}:{port}", home, log_path, from_template, all_services
    )


def wait_until_ready(server: PrefectServer, timeout: float = 90.0) -> PrefectServer:
    """The launched server once it answers. A server that cannot start from the database
    snapshot is started again on a fresh database, and the snapshot forgotten."""
    try:
        return server.wait_ready(timeout)
    except PrefectServerError:
        if not server.from_template:
            raise
        _template_path().unlink(missing_ok=True)
        host = server.api_url.split("//", 1)[1].rsplit(":", 1)[0]
        return launch_prefect_server(host, use_template=False, all_services=server.all_services).wait_ready(timeout)


def start_prefect_server(host: str = "127.0.0.1", timeout: float = 90.0, all_services: bool = False) -> PrefectServer:
    """Start the server and wait until it answers."""
    return wait_until_ready(launch_prefect_server(host, all_services=all_services), timeout)


def _template_path() -> Path:
    # The version from the package metadata: importing prefect here would make it read its
    # settings before the caller has set PREFECT_API_URL.
    from importlib.metadata import version

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evomerge"
    return cache / f"prefect-{version('prefect')}-empty.db"


def _save_template(database: Path) -> None:
    """Snapshot a live, freshly migrated database (SQLite's backup API reads a consistent copy
    while the server has it open); written to a temporary file, then renamed into place."""
    target = _template_path()
    if target.exists() or not database.is_file():
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".db")
        os.close(fd)
        source, copy = sqlite3.connect(database), sqlite3.connect(tmp)
        try:
            source.backup(copy)
        finally:
            source.close()
            copy.close()
        os.replace(tmp, target)
    except (OSError, sqlite3.Error):  # a cache is an optimisation: never fail a run for it
        if "tmp" in locals() and os.path.exists(tmp):
            os.unlink(tmp)


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
