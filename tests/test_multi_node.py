"""Two Ray nodes on one machine (the session's cluster, Ray's own test cluster): every strategy
uses every slot, and a candidate's merge and evaluation happen on the node its slot is on. The
runs join the cluster with ``--ray-address``, as they would join a real one; and a cluster
started with ``ray start --head`` is joined and left running."""

from __future__ import annotations

import os

import pytest
from conftest import read_records, run_evomerge, shared_env, write_config

pytestmark = pytest.mark.integration


def run_on_two_nodes(cluster, config, storage, env, *extra, baselines=False):
    """A --barrier-free search of 6 on the two nodes: every record ok, both nodes and both slots
    used, each candidate merged where it was evaluated, and a slot started a candidate of
    generation 1 before generation 0 was told (checkpoint ``ahead``). With ``baselines``, the
    parents and the uniform merge are scored first, a batch of the synchronous ``evaluate`` flow,
    and are placed the same way."""
    import json

    result = run_evomerge(
        config,
        storage,
        "--max-fevals",
        "6",
        "--popsize",
        "4",
        "--seed",
        "2",
        *(() if baselines else ("--no-baselines",)),
        "--barrier-free",
        "--ray-address",
        cluster.address,
        *extra,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_records(storage)
    assert len(records) == 6 and all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    assert {r["eval_node_id"] for r in records} == cluster.node_ids, "both nodes evaluated candidates"
    scored_first = read_records(storage, "baselines")
    assert len(scored_first) == (
        4 if baselines else 0
    )  # 3 parents (base too), 1 uniform and all(r["status"] == "ok" for r in scored_first)
    assert all(r["merge_node_id"] == r["eval_node_id"] for r in records + scored_first), "merged where evaluated"
    by_slot = {}
    for r in records + scored_first:
        by_slot.setdefault(r["slot"], set()).add(r["eval_node_id"])
    assert set(by_slot) == {"slot-0", "slot-1"} and all(len(n) == 1 for n in by_slot.values())
    first = json.loads((storage / "checkpoints" / "00000.json").read_text())
    assert first["ahead"] >= 1, "a slot took a candidate of generation 1 before generation 0 was told"
    ahead = [r for r in records if r["generation"] == 1 and r["index"] < first["ahead"]]
    gen0_told_at = max(r["finished_at"] for r in records if r["generation"] == 0)
    assert any(r["finished_at"] - r["timings"]["round_trip"] < gen0_told_at for r in ahead)
    summary = json.loads((storage / "summary.json").read_text())
    assert summary["evaluations"] == 6 and 0 < summary["slot_utilization"] <= 1
    assert_one_generations_subflow_with_tables(storage, env["PREFECT_API_URL"], baselines)
    return records


def assert_one_generations_subflow_with_tables(storage, prefect_api, baselines):
    """One flow run for the generations (after the baselines' own batch, if scored); each told
    generation's table is still published."""
    import json

    import httpx

    fingerprint = json.loads((storage / "run.json").read_text())["fingerprint"]
    with httpx.Client(base_url=prefect_api, timeout=30) as client:
        (evolve_run,) = client.post(
            "/flow_runs/filter", json={"flow_runs": {"name": {"any_": [f"evolve-{storage}"]}}}
        ).json()
        subflows = client.post(
            "/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [evolve_run["id"]]}}}
        ).json()
        tables = client.post(
            "/artifacts/filter", json={"artifacts": {"key": {"any_": [f"evomerge-{fingerprint}-candidates"]}}}
        ).json()
    assert evolve_run["state_type"] == "COMPLETED"
    assert sorted(r["name"] for r in subflows) == (["baselines"] if baselines else []) + ["generations"]
    assert tables, "each told generation's candidates table"


@pytest.fixture(scope="module")
def in_memory_pool_run(ray_cluster, tiny_models, tmp_path_factory, prefect_api):
    """The pool strategy with --in-memory: each slot merges into its resident model."""
    tmp = tmp_path_factory.mktemp("pool")
    config = write_config(tmp / "config.yml", tiny_models)
    records = run_on_two_nodes(ray_cluster, config, tmp / "run", shared_env(prefect_api), "--in-memory")
    assert all(r["timings"]["load"] == 0.0 for r in records), "in memory: nothing loaded per candidate"
    return config, records


# Every strategy, each without the generation barrier (the synchronous pool strategy runs on
# these two nodes in every other CLI test of the session, which joins them).
@pytest.mark.parametrize("strategy", ["pool", "serial", "buffered"])
def test_every_strategy_on_disk_uses_both_nodes_without_a_barrier_and_scores_like_in_memory(
    ray_cluster, in_memory_pool_run, tmp_path, prefect_api, strategy
):
    config, in_memory = in_memory_pool_run
    # serial and buffered also score the baselines: the synchronous flow of their strategy.
    records = run_on_two_nodes(
        ray_cluster,
        config,
        tmp_path / "run",
        shared_env(prefect_api),
        "--strategy",
        strategy,
        baselines=strategy != "pool",
    )
    assert all(r["timings"]["merge"] > 0 and r["timings"]["load"] > 0 for r in records)
    # task_arithmetic is deterministic and the in-memory merge is mergekit's own: the same seed
    # asks the same generation 0 (and the same first vectors drawn ahead; later ones depend on
    # when results arrived), and a candidate asked by both scores the same.
    scores, in_memory_scores = ({r["key"]: r["score"] for r in rs} for rs in (records, in_memory))
    common = scores.keys() & in_memory_scores.keys()
    assert {r["key"] for r in records if r["generation"] == 0} <= common
    assert {k: scores[k] for k in common} == {k: in_memory_scores[k] for k in common}


@pytest.fixture(scope="module")
def ray_start_head(tmp_path_factory):
    """A cluster started the way an operator starts one: `ray start --head` (on loopback).

    ``--block`` keeps ``ray start`` in the foreground as the parent of the processes it starts;
    it runs in its own session, so the test stops exactly those (never `ray stop`, which stops
    every Ray process on the machine)."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from evomerge.backends.prefect_server import free_port

    port = free_port()
    log_path = tmp_path_factory.mktemp("ray-start") / "ray-start.log"
    ray = Path(sys.executable).with_name("ray")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                str(ray),
                "start",
                "--head",
                "--block",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--num-cpus",
                "2",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"),
        )
    deadline = time.monotonic() + 120
    while "block forever" not in log_path.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    yield f"127.0.0.1:{port}", process
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)  # `ray start` drains for up to 30 s; nothing here needs draining
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_cluster_started_with_ray_start_head_is_joined_and_left_running(
    ray_start_head, tiny_models, tmp_path, prefect_api
):
    import json
    import subprocess
    import sys

    address, process = ray_start_head
    config = write_config(tmp_path / "config.yml", tiny_models)
    # `ray start` turns on token authentication; Ray sends the token (~/.ray/auth_token) to an
    # explicit address only when told to.
    env = dict(os.environ, PREFECT_API_URL=prefect_api, RAY_AUTH_MODE="token")
    result = run_evomerge(
        config,
        tmp_path / "run",
        "--max-fevals",
        "4",
        "--popsize",
        "4",
        "--no-baselines",
        "--ray-address",
        address,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_records(tmp_path / "run")
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert process.poll() is None, "evomerge leaves a cluster it did not start running"
    nodes = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes()]))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nodes.returncode == 0, nodes.stderr[-2000:]
    assert {r["eval_node_id"] for r in records} <= set(json.loads(nodes.stdout.strip().splitlines()[-1]))
