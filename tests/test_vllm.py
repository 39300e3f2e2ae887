"""--vllm for real, on vLLM's CPU build (tests marked vllm run in `.venv-vllm`, built by
`./dev setup-vllm`; `./dev test` runs them after the others). A search through the real flow
and Ray slots, with each strategy, scores every candidate with an engine of its own, exactly as
hf does."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
from conftest import REPO, run_evomerge

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

CONFIG = REPO / "examples" / "multiskill" / "config.yml"
SEARCH = (
    "--task-search-path",
    str(REPO / "examples" / "multiskill" / "tasks"),
    "--max-fevals",
    "4",
    "--popsize",
    "4",
    "--no-baselines",
    "--no-save-final-model",
)


def scores_by_merge(storage) -> dict[str, float]:
    records = [json.loads(p.read_text()) for p in (storage / "records").glob("*.json")]
    assert records and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    return {json.dumps(r["merge_config"], sort_keys=True): r["score"] for r in records}


def vllm_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "VLLM" in line]


@pytest.fixture(scope="module")
def hf_scores(tmp_path_factory):
    """The same search with lm-eval's hf model, in the same environment."""
    storage = tmp_path_factory.mktemp("hf") / "run"
    result = run_evomerge(CONFIG, storage, *SEARCH)
    assert result.returncode == 0, result.stderr[-5000:]
    return scores_by_merge(storage)


# serial scores through the same merge task and slot call as buffered (which adds the lookahead);
# it ran by hand with the same result (README), and is left out to keep CI under 20 minutes.
@pytest.mark.parametrize("strategy", ["pool", "buffered"])
def test_a_vllm_search_scores_every_candidate_as_hf_does_and_leaves_no_engine_behind(strategy, hf_scores, tmp_path):
    """The multi-skill example, 4 candidates on 2 slots, on disk, per strategy (an engine per
    candidate folder, in the slot's process): every score equals hf's for the same candidate."""
    assert importlib.util.find_spec("vllm"), "run in ./dev setup-vllm's environment (./dev test does)"
    before = vllm_processes()
    result = run_evomerge(CONFIG, tmp_path / "vllm", *SEARCH, "--vllm", "--strategy", strategy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert scores_by_merge(tmp_path / "vllm") == hf_scores
    assert vllm_processes() == before, "an engine process outlived its run"
