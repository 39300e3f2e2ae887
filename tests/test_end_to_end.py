"""The ``evomerge`` command end to end: tiny models, real lm-eval tasks, a real Prefect server,
a Ray cluster. These are the checks a user would make of a finished run: the session's reference
search (its own private server and Ray, as a user runs it; conftest.py), and runs joining the
session's server and two-node cluster. Interrupted runs: tests/test_fault_injection.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import HELD_OUT, REFERENCE_SEARCH, REPO, TASKS_DIR, read_records, run_evomerge, shared_env, write_config

pytestmark = pytest.mark.integration


def lm_eval_scores(model_path: Path, limit: int) -> dict[str, float]:
    """Score a model folder the way a user would check a merge: plain lm-eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_path), "dtype": "float32"},
        device="cpu",
        tasks=["tiny_shift", "tiny_rev"],
        batch_size=16,
        limit=limit,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
    )
    return {task: out["results"][task]["acc,none"] for task in ("tiny_shift", "tiny_rev")}


PARENTS = ["parent base", "parent shift_expert", "parent rev_expert"]


@pytest.fixture(scope="module")
def finished_run(reference_search):
    return {"config": reference_search.config, "storage": reference_search.storage, "result": reference_search.result}


def test_the_run_spends_exactly_its_budget_and_reports_it(finished_run):
    storage = finished_run["storage"]
    summary = json.loads((storage / "summary.json").read_text())
    records = read_records(storage)
    assert summary["evaluations"] == 16 == len(records)
    assert summary["generations"] == 4
    assert len({r["key"] for r in records}) == 16
    assert "evaluations spent : 16 of 16" in finished_run["result"].stdout
    assert "Prefect UI at http://127.0.0.1:" in finished_run["result"].stdout


def test_the_summary_says_how_busy_the_run_kept_its_slots(finished_run):
    """slot-busy / (slots x search wall), recomputed here from the records' own timings."""
    summary = json.loads((finished_run["storage"] / "summary.json").read_text())
    records = read_records(finished_run["storage"])
    start = min(r["finished_at"] - r["timings"]["round_trip"] for r in records)
    wall = max(r["finished_at"] for r in records) - start
    busy = sum(r["timings"]["total"] for r in records)
    slots = {r["slot"] for r in records}
    assert slots == {"slot-0", "slot-1"}
    assert summary["slot_utilization"] == pytest.approx(busy / (2 * wall))
    assert 0 < summary["slot_utilization"] < 1, "a synchronous run idles its slots at generation ends"


def test_every_record_holds_what_a_user_needs(finished_run):
    records = read_records(finished_run["storage"])
    for r in records:
        assert r["status"] == "ok", r["error"]
        metrics = {t: r["metrics"][t]["acc,none"] for t in ("tiny_shift", "tiny_rev")}
        assert r["score"] == pytest.approx(sum(metrics.values()))
        assert len(r["vector"]) == 4 and len(r["parameters"]) == 4
        assert r["merge_config"]["merge_method"] == "task_arithmetic"
        t = r["timings"]
        assert t["merge"] > 0 and t["load"] > 0 and t["evaluate"] > 0 and t["total"] >= t["merge"] + t["evaluate"]
        assert r["slot"] in {"slot-0", "slot-1"} and r["node"]
    assert {r["slot"] for r in records} == {"slot-0", "slot-1"}, "both slots did work"
    assert sorted((r["generation"], r["index"]) for r in records) == [(g, i) for g in range(4) for i in range(4)]


def test_best_config_is_the_best_record_and_mergekit_reproduces_its_score(finished_run, tmp_path):
    storage = finished_run["storage"]
    records = read_records(storage)
    # Ties go to the earliest evaluated (keys, hence the order records are read in, hash the
    # models' paths: a plain max() picked another of two tied records in some runs).
    best = max(records, key=lambda r: (r["score"], -r["generation"], -r["index"]))
    summary = json.loads((storage / "summary.json").read_text())
    assert summary["best_fitness"] == best["score"]
    assert summary["best_metrics"]["tiny_rev"]["acc,none"] == best["metrics"]["tiny_rev"]["acc,none"]
    config = yaml.safe_load((storage / "best_config.yaml").read_text())
    assert config == best["merge_config"]

    out = tmp_path / "merged"
    mergekit = Path(sys.executable).with_name("mergekit-yaml")
    done = subprocess.run([str(mergekit), str(storage / "best_config.yaml"), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = lm_eval_scores(out, limit=24)
    assert scores == {t: best["metrics"][t]["acc,none"] for t in ("tiny_shift", "tiny_rev")}
    # --save-final-model (upstream default) merged the same config
    assert (storage / "final_model" / "config.json").exists()


def test_baselines_are_scored_first_kept_apart_and_equal_plain_lm_eval(finished_run, tiny_models):
    storage = finished_run["storage"]
    baselines = read_records(storage, "baselines")
    assert sorted(r["label"] for r in baselines) == sorted([*PARENTS, "uniform merge"])
    assert all(r["kind"] == "baseline" and r["status"] == "ok" for r in baselines)
    candidates = read_records(storage)
    assert max(r["finished_at"] for r in baselines) < min(r["finished_at"] for r in candidates), "before the search"
    summary = json.loads((storage / "summary.json").read_text())
    assert summary["evaluations"] == 16, "baselines are not counted in --max-fevals"
    assert summary["best_key"] in {r["key"] for r in candidates}, "a baseline is never the best config"
    by_label = {r["label"]: r for r in baselines}
    # A parent's baseline is the parent itself: plain lm-eval on its folder gives the same numbers.
    assert lm_eval_scores(tiny_models["rev_expert"], limit=24) == {
        t: by_label["parent rev_expert"]["metrics"][t]["acc,none"] for t in ("tiny_shift", "tiny_rev")
    }
    comparison = summary["comparison"]
    parents = {label: by_label[label]["score"] for label in PARENTS}
    assert comparison["best_parent"] == max(parents, key=parents.get)
    assert comparison["gain_over_best_parent"] == pytest.approx(summary["best_fitness"] - max(parents.values()))


def test_held_out_scores_of_the_best_candidates_and_the_baselines(finished_run):
    from evomerge.core.config import TaskConfiguration
    from evomerge.core.references import paired_difference

    storage = finished_run["storage"]
    held = read_records(storage, "held_out")
    candidates = {r["key"]: r for r in read_records(storage)}
    top3 = sorted(candidates.values(), key=lambda r: (-r["score"], r["generation"], r["index"]))[:3]
    assert {r["search_key"] for r in held if r["kind"] == "candidate"} == {r["key"] for r in top3}
    assert sorted(r["label"] for r in held if r["kind"] == "baseline") == sorted([*PARENTS, "uniform merge"])
    for r in held:
        assert r["held_out"] and r["status"] == "ok" and r["key"] not in candidates
        rev, shift = r["metrics"]["tiny_rev"]["acc,none"], r["metrics"]["tiny_shift"]["acc,none"]
        assert r["score"] == pytest.approx(rev + 0.5 * shift), "weighted by held_out_tasks"
        assert len(r["item_scores"]["tiny_rev"]) == 24 and sum(r["item_scores"]["tiny_rev"]) / 24 == pytest.approx(rev)
    # The report and the summary compare the best candidate with every baseline item by item.
    summary = json.loads((storage / "summary.json").read_text())["comparison"]
    by_search_key = {r["search_key"]: r for r in held}
    best = by_search_key[top3[0]["key"]]
    tasks = [TaskConfiguration(**t) for t in HELD_OUT]
    baseline_keys = {r["label"]: r["search_key"] for r in held if r["kind"] == "baseline"}
    for label, numbers in summary["held_out_vs_baselines"].items():
        expected = paired_difference(best["item_scores"], by_search_key[baseline_keys[label]]["item_scores"], tasks)
        assert numbers["difference"] == pytest.approx(expected.difference)
        assert numbers["standard_error"] == pytest.approx(expected.standard_error)
    assert set(summary["held_out_vs_baselines"]) == set(baseline_keys)
    differences = {label: numbers["difference"] for label, numbers in summary["held_out_vs_baselines"].items()}
    assert differences[summary["closest_baseline_held_out"]] == min(differences.values())

    done = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "report", str(storage)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (storage / "report.md").read_text()
    assert report.strip() in done.stdout
    for label in ["evolved (best)", *PARENTS, "uniform merge"]:
        assert f"| {label} |" in report
    assert f"{summary['held_out_vs_baselines']['parent base']['difference']:+.4f}" in report
    assert (storage / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scratch_merges_are_deleted(finished_run):
    merged = finished_run["storage"] / "merged"
    assert not merged.exists() or not any(merged.iterdir())


def test_generation_logs_hold_the_told_scores(finished_run):
    storage = finished_run["storage"]
    records = {r["key"]: r for r in read_records(storage)}
    for n in range(4):
        log = json.loads((storage / "checkpoints" / f"{n:05d}.json").read_text())
        assert log["scores_told"] == [records[k]["score"] for k in log["keys"]]


def test_same_command_again_continues_without_reevaluating(finished_run, tmp_path, prefect_api, ray_cluster):
    """A finished run started again spends nothing: every key already has a record."""
    storage = tmp_path / "run"
    shutil.copytree(finished_run["storage"], storage)
    before = {p.name: p.stat().st_mtime_ns for p in (storage / "records").iterdir()}
    result = run_evomerge(
        finished_run["config"],
        storage,
        *REFERENCE_SEARCH,
        "--ray-address",
        ray_cluster.address,
        env=shared_env(prefect_api),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in (storage / "records").iterdir()}
    assert after == before
    assert "evaluations spent : 16 of 16" in result.stdout


def test_another_search_on_the_same_path_is_refused(finished_run):
    result = run_evomerge(finished_run["config"], finished_run["storage"], "--max-fevals", "16", "--seed", "4")
    assert result.returncode == 2, "refused before any work, like other bad input"
    assert "Prefect" not in result.stdout
    assert "holds another search" in result.stderr and "Use a new --storage-path" in result.stderr


def test_a_run_on_s3_storage(tiny_models, tmp_path, prefect_api, s3_endpoint, ray_cluster):
    """Records, best config, summary and final model on a real S3 API (moto_server, loopback),
    with --racing: the slots on two nodes share the run's racing board (a Ray actor; a slot never
    needs the storage's credentials) and their records say how far each candidate was scored."""
    import s3fs

    config = write_config(tmp_path / "config.yml", tiny_models)
    storage = "s3://evomerge-test/e2e-run"
    env = shared_env(prefect_api, WANDB_API_KEY="sentinel-wandb-key-4567")
    result = run_evomerge(
        config,
        storage,
        "--max-fevals",
        "4",
        "--popsize",
        "4",
        "--racing",
        "--ray-address",
        ray_cluster.address,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert len(fs.ls(f"{storage}/records")) == 4
    # 4 candidates x 2 tasks x 24 items (the config's limit); the board has each candidate's scores.
    summary = json.loads(fs.cat_file(f"{storage}/summary.json"))
    assert summary["items_full"] == 4 * 48 and 0 < summary["items_scored"] <= summary["items_full"]
    assert "items scored      :" in result.stdout
    races = [json.loads(fs.cat_file(p))["race"] for p in fs.ls(f"{storage}/records")]
    assert sum(r["items_scored"] for r in races) == summary["items_scored"]
    assert all(r["items_full"] == 48 and len(r["item_scores"]["tiny_rev"]) >= 3 for r in races)

    # The checkpoint is published as Prefect artifacts; no credential is in them, in the logs
    # or in any file of the run.
    with httpx.Client(base_url=prefect_api, timeout=30) as client:
        artifacts = client.post("/artifacts/filter", json={"limit": 200}).json()
    fingerprint = json.loads(fs.cat_file(f"{storage}/run.json"))["fingerprint"]
    mine = {a["key"]: a for a in artifacts if a["key"] and fingerprint in a["key"]}
    assert set(mine) == {
        f"evomerge-{fingerprint}-{what}"
        for what in ("candidates", "best-config", "progress", "baselines", "comparison", "fitness-plot")
    }
    assert mine[f"evomerge-{fingerprint}-fitness-plot"]["data"].startswith(
        "![fitness over evaluations](data:image/png;base64,"
    )
    assert "| uniform merge |" in mine[f"evomerge-{fingerprint}-comparison"]["data"]
    table = mine[f"evomerge-{fingerprint}-candidates"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert len(table) == 4 and {"fitness", "tiny_shift acc,none", "tiny_rev acc,none", "slot"} <= set(table[0])
    assert "```yaml" in mine[f"evomerge-{fingerprint}-best-config"]["data"]
    assert mine[f"evomerge-{fingerprint}-progress"]["data"] == 100.0
    written = b"".join(fs.cat_file(f) for f in fs.find(storage) if "final_model/" not in f)
    shown = (result.stdout + result.stderr + json.dumps(artifacts)).encode()
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"], "sentinel-wandb-key-4567"):
        assert secret.encode() not in written and secret.encode() not in shown
    summary = json.loads(fs.cat_file(f"{storage}/summary.json"))
    assert summary["evaluations"] == 4
    assert yaml.safe_load(fs.cat_file(f"{storage}/best_config.yaml"))["merge_method"] == "task_arithmetic"
    assert fs.exists(f"{storage}/final_model/model.safetensors")
    assert not fs.exists(f"{storage}/lease.json")
