"""Shared fixtures: tiny models built offline, the example's lm-eval tasks, a Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for every run of the test session that is not about starting one: two
    nodes on this machine (Ray's own test cluster, loopback, one CPU each), so every such run also
    places its two slots on two nodes. Runs join it with ``--ray-address``, as they would join a
    real cluster. Idle workers are kept, as a private cluster of the CLI keeps them."""
    from ray.cluster_utils import Cluster

    keep_idle = {"idle_worker_killing_time_threshold_ms": 3_600_000}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": keep_idle}
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    node_ids = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
    assert len(node_ids) == 2
    yield SimpleNamespace(address=cluster.address, node_ids=node_ids)
    cluster.shutdown()


# The tiny example's tasks are one split each, so the held-out tasks of the reference search are
# the same tasks with other weights: enough to check the plumbing (separate keys, records, scores).
HELD_OUT = [{"name": "tiny_rev"}, {"name": "tiny_shift", "weight": 0.5}]
REFERENCE_SEARCH = ("--max-fevals", "16", "--popsize", "4", "--seed", "7")


@pytest.fixture(scope="session")
def reference_search(tiny_models, tmp_path_factory):
    """The search every end-to-end, fault-injection and deployment test compares with: the
    ``evomerge`` command exactly as a user runs it (its own private Prefect server and Ray
    cluster, baselines, held-out tasks), 16 evaluations. Tests read its storage path; one that
    writes works on a copy.

    ``search_config`` is the same search without held-out tasks (not part of the search's
    fingerprint, so the same search), for runs that must not spend evaluations on them."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "config.yml", tiny_models, held_out_tasks=HELD_OUT)
    storage = tmp / "run"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = run_evomerge(config, storage, *REFERENCE_SEARCH, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads((storage / "summary.json").read_text())
    return SimpleNamespace(
        config=config,
        search_config=write_config(tmp / "search_config.yml", tiny_models),
        storage=storage,
        result=result,
        summary=summary,
        trajectory=trajectory(storage),
        scores={r["key"]: r["score"] for r in read_records(storage)},
    )


def trajectory(storage: Path) -> list:
    """Every asked vector, told score, step size and mean, from the checkpoints on disk."""
    out = []
    for path in sorted((storage / "checkpoints").glob("*.json")):
        cp = json.loads(path.read_text())
        out.append([cp[k] for k in ("generation", "keys", "vectors", "scores_told", "sigma_after", "mean_after")])
    return out


def shared_env(prefect_api: str, **extra: str) -> dict[str, str]:
    """The environment of a CLI run on the session's Prefect server."""
    return dict(os.environ, PREFECT_API_URL=prefect_api, **extra)


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
        sys.executable,
        "-m",
        "evomerge.cli",
        str(config),
        "--storage-path",
        str(storage),
        "--task-search-path",
        str(TASKS_DIR),
        "--cpu-slots",
        "2",
        *extra,
    ]


def run_evomerge(config, storage, *extra, env=None, timeout=600):
    return subprocess.run(
        evomerge_command(config, storage, *extra),
        cwd=REPO,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
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
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
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
