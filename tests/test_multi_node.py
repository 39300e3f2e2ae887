"""Two Ray nodes on one machine (Ray's own test cluster): every slot is used, and a candidate's
merge and evaluation happen on the node its slot is on. The run joins the cluster with
``--ray-address``, as it would join a real one."""

from __future__ import annotations

import os

import pytest

from conftest import read_records, run_evomerge, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    node_ids = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
    assert len(node_ids) == 2
    yield cluster.address, node_ids
    cluster.shutdown()


def run_on_two_nodes(address, node_ids, config, storage, env, *extra):
    result = run_evomerge(config, storage, "--max-fevals", "8", "--popsize", "4", "--seed", "2",
                          "--ray-address", address, *extra, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_records(storage)
    assert len(records) == 8 and all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    assert {r["eval_node_id"] for r in records} == node_ids, "both nodes evaluated candidates"
    assert all(r["merge_node_id"] == r["eval_node_id"] for r in records), "merged where evaluated"
    by_slot = {}
    for r in records:
        by_slot.setdefault(r["slot"], set()).add(r["eval_node_id"])
    assert set(by_slot) == {"slot-0", "slot-1"} and all(len(n) == 1 for n in by_slot.values())
    return records


@pytest.fixture(scope="module")
def pool_run(two_nodes, tiny_models, tmp_path_factory, prefect_api):
    tmp = tmp_path_factory.mktemp("pool")
    config = write_config(tmp / "config.yml", tiny_models)
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    records = run_on_two_nodes(*two_nodes, config, tmp / "run", env)
    return config, {r["key"]: r["score"] for r in records}


@pytest.mark.parametrize("mode", ["in-memory", "serial", "buffered"])
def test_every_strategy_uses_every_slot_keeps_candidates_on_one_node_and_scores_like_pool(
    two_nodes, pool_run, tmp_path, prefect_api, mode
):
    config, pool_scores = pool_run
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    extra = ["--in-memory"] if mode == "in-memory" else ["--strategy", mode]
    records = run_on_two_nodes(*two_nodes, config, tmp_path / "run", env, *extra)
    if mode == "in-memory":
        assert all(r["timings"]["load"] == 0.0 for r in records), "in memory: nothing loaded per candidate"
    else:
        assert all(r["timings"]["merge"] > 0 and r["timings"]["load"] > 0 for r in records)
    # task_arithmetic is deterministic: the same seed reaches the same candidates and scores.
    assert {r["key"]: r["score"] for r in records} == pool_scores
