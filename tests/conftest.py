"""Shared fixtures: tiny models built offline, the example's lm-eval tasks, a Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Never reach for the Hugging Face Hub: everything is built or shipped locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray clusters the tests start (ray.cluster_utils.Cluster) take 127.0.0.1 as their node address,
# so every server they run listens on loopback; read when ray is first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "examples" / "tiny" / "tasks"
sys.path.insert(0, str(REPO / "examples" / "tiny"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base, shift_expert, rev_expert: tiny Llama models (quick build, about 10 s)."""
    from make_models import build_example

    return build_example(tmp_path_factory.mktemp("models"), quick=True)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect server on loopback (every service on: deployments and workers use it),
    shared by the tests that do not test the CLI's own."""
    from evomerge.backends.prefect_server import start_prefect_server

    server = start_prefect_server(all_services=True)
    yield server.api_url
    server.stop()


def write_config(path: Path, models: dict[str, Path], **overrides) -> Path:
    import yaml

    config = {
        "genome": {
            "models": [str(models["shift_expert"]), str(models["rev_expert"])],
            "base_model": str(models["base"]),
            "merge_method": "task_arithmetic",
            "layer_granularity": 2,
        },
        "tasks": [{"name": "tiny_shift"}, {"name": "tiny_rev"}],
        "limit": 24,
    }
    for key, value in overrides.items():
        if key == "genome":
            config["genome"].update(value)
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def evomerge_command(config: Path, storage: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "evomerge.cli", str(config), "--storage-path", str(storage),
        "--task-search-path", str(TASKS_DIR), "--cpu-slots", "2", *extra,
    ]


def run_evomerge(config, storage, *extra, env=None, timeout=600):
    return subprocess.run(
        evomerge_command(config, storage, *extra), cwd=REPO, env=env or os.environ.copy(),
        capture_output=True, text=True, timeout=timeout,
    )


def read_records(storage: Path, folder: str = "records") -> list[dict]:
    """Records of a local storage path: ``records`` (candidates), ``baselines`` or ``held_out``."""
    return [json.loads(p.read_text()) for p in sorted((storage / folder).glob("*.json"))]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto_server) on 127.0.0.1, with a bucket ``evomerge-test``."""
    import subprocess
    import time

    import httpx

    from evomerge.backends.prefect_server import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("evomerge-test")
    yield url
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.terminate()
    server.wait(timeout=10)
