"""A private Prefect API server for one CLI run.

Tasks run in Ray worker processes; without a real API server each would start its own temporary
server on one SQLite file. With no ``PREFECT_API_URL`` set, the CLI starts ``prefect server start``
on a free loopback port with its own PREFECT_HOME (so its database is private), and stops it at
exit. Set ``PREFECT_API_URL`` to use your own server (e.g. Postgres-backed) instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass


class PrefectServerError(RuntimeError):
    pass


@dataclass
class PrefectServer:
    process: subprocess.Popen
    api_url: str
    ui_url: str
    home: str
    log_path: str

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


def start_prefect_server(host: str = "127.0.0.1", timeout: float = 90.0) -> PrefectServer:
    port = free_port(host)
    home = tempfile.mkdtemp(prefix="evomerge-prefect-")
    log_path = os.path.join(home, "server.log")
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        {
            "PREFECT_HOME": home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
        }
    )
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    command = [
        sys.executable, "-m", "evomerge.backends.orphan_guard", str(os.getpid()),
        prefect if os.path.exists(prefect) else "prefect", "server", "start",
        "--host", host, "--port", str(port),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    server = PrefectServer(process, f"http://{host}:{port}/api", f"http://{host}:{port}", home, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrefectServerError(
                f"prefect server exited with code {process.returncode}; its log:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{server.api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise PrefectServerError(f"prefect server did not answer within {timeout:.0f} s:\n{_tail(log_path)}")


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
