"""Servers evomerge starts listen on loopback only."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_private_ray_cluster_is_on_loopback():
    code = (
        "from evomerge.backends.ray_cluster import connect_ray, disconnect_ray\n"
        "started = connect_ray(None)\n"
        "import ray\n"
        "print(started, sorted({n['NodeManagerAddress'] for n in ray.nodes()}))\n"
        "disconnect_ray(started)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True ['127.0.0.1']"


def test_private_prefect_server_is_on_loopback(prefect_api):
    assert prefect_api.startswith("http://127.0.0.1:")
