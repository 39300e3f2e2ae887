"""``--vllm --in-memory``: one resident engine, its weights swapped for each candidate
(``evomerge.backends.resident_engine``), on vLLM's CPU build (run in `.venv-vllm`, as
tests/test_vllm.py). Every score through the resident engine equals the score of a fresh engine
on the merged folder (``--vllm`` on disk) and of lm-eval's ``hf`` model on it.

Order matters in this process: an engine shut down tears down the parallel groups of any other
engine of the process, so every on-disk engine here is started and shut down (``reference``)
before the resident one starts, and the resident one lives until the process ends.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
from conftest import REPO

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

MULTISKILL = REPO / "examples" / "multiskill"
MODELS = {name: str(MULTISKILL / "models" / name) for name in ("base", "shift_expert", "rev_expert")}
SEED = 42
LIMIT = 48  # items per task: enough for scores that tell candidates apart, and quick
# A prompt prefix every item shares, 38 tokens: longer than a KV block of 32 tokens, so the prefix
# cache keeps it (the CPU build's default block, 128 tokens, is longer than these models' context;
# CUDA's default is 16).
PREAMBLE = "Shift each digit up by one; nine wraps to zero. "
BLOCK = {"block_size": 32}
STALE_TASK = "multiskill_shift_preamble"


def deterministic_methods() -> list[str]:
    from evomerge.core import merge_methods

    return [name for name, method in merge_methods.METHODS.items() if not method.random]


def candidate(method: str, seed: int) -> dict:
    """A random point of ``method``'s search space over the multi-skill models, decoded."""
    from evomerge.core import merge_methods
    from evomerge.core.config import EvolveConfig
    from evomerge.core.search_space import SearchSpace

    experts = [MODELS["shift_expert"], MODELS["rev_expert"]]
    genome: dict = {"merge_method": method, "layer_granularity": 2, "models": experts}
    base = merge_methods.METHODS[method].base
    if base == "unused":
        genome["models"] = [MODELS["base"], *experts]
    elif base in ("required", "optional"):
        genome["base_model"] = MODELS["base"]
    config = EvolveConfig.model_validate({"genome": genome, "tasks": ["multiskill_shift"]})
    space = SearchSpace(config.genome, 4, "float32")
    return space.decode(np.random.default_rng(seed).uniform(0.2, 0.8, space.dimension))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> str:
    """The multi-skill tasks, and one more: shift behind a long shared preamble."""
    import shutil

    import yaml

    folder = tmp_path_factory.mktemp("tasks")
    for path in (MULTISKILL / "tasks").glob("*.yaml"):
        shutil.copy(path, folder)
    shutil.copy(MULTISKILL / "tasks" / "utils.py", folder)
    text = (MULTISKILL / "tasks" / "multiskill_shift.yaml").read_text()
    task = yaml.safe_load(text.replace("!function utils.process_results", "UTILS"))
    task.update(task=STALE_TASK, description=PREAMBLE, process_results="UTILS")
    task["dataset_kwargs"]["data_files"]["validation"] = str(MULTISKILL / "tasks/data/shift_validation.jsonl")
    (folder / f"{STALE_TASK}.yaml").write_text(yaml.safe_dump(task).replace("UTILS", "!function utils.process_results"))
    return str(folder)


def evaluators(task_dir: str, *tasks: str, engine_args: dict | None = None):
    from evomerge.backends.evaluator_hf import HFEvaluator
    from evomerge.backends.evaluator_vllm import VLLMEvaluator
    from evomerge.core.config import TaskConfiguration
    from evomerge.core.records import EvaluationSettings

    settings = EvaluationSettings(tasks=[TaskConfiguration(name=t, metric="score,none") for t in tasks], limit=LIMIT)
    common = dict(device="cpu", batch_size=16, dtype="float32")
    return (
        VLLMEvaluator(settings, [task_dir], False, seed=SEED, engine_args=engine_args, **common),
        HFEvaluator(settings, [task_dir], False, **common),
    )


def scores(result) -> dict[str, float]:
    return {task: values["score,none"] for task, values in result.results.items()}


@pytest.fixture(scope="module")
def reference(task_dir, tmp_path_factory):
    """For each deterministic method, a candidate merged on disk (mergekit's run_merge) and its
    scores with a fresh engine on that folder (--vllm on disk) and with hf; and the preamble
    task's scores of two candidates. All engines here are shut down before the resident one."""
    assert importlib.util.find_spec("vllm"), "run in ./dev setup-vllm's environment (./dev test does)"
    from evomerge.backends.merger_disk import DiskMerger
    from evomerge.core.options import RunOptions

    merger = DiskMerger(RunOptions(seed=SEED), use_cuda=False)
    on_disk, with_vllm, with_hf = {}, {}, {}
    vllm_evaluator, hf_evaluator = evaluators(task_dir, "multiskill_shift", "multiskill_rev")
    for i, method in enumerate(deterministic_methods()):
        config = candidate(method, seed=i)
        folder = tmp_path_factory.mktemp(method)
        merger.merge(copy.deepcopy(config), str(folder))
        on_disk[method] = config
        with_vllm[method] = scores(vllm_evaluator.evaluate(str(folder)))
        with_hf[method] = scores(hf_evaluator.evaluate(str(folder)))
    _, stale_hf = evaluators(task_dir, STALE_TASK)
    preamble = {}
    for method in ("task_arithmetic", "linear"):
        folder = tmp_path_factory.mktemp(f"preamble-{method}")
        merger.merge(copy.deepcopy(on_disk[method]), str(folder))
        preamble[method] = scores(stale_hf.evaluate(str(folder)))
    return on_disk, with_vllm, with_hf, preamble


@pytest.fixture(scope="module")
def resident(reference, task_dir):
    """One engine on the base model, for the rest of this process (see the module's docstring)."""
    from evomerge.backends.merger_memory import InMemoryMerger
    from evomerge.backends.resident_engine import ResidentEngine

    merger = InMemoryMerger([MODELS["shift_expert"], MODELS["rev_expert"]], base_model=MODELS["base"])
    evaluator, _ = evaluators(task_dir, "multiskill_shift", "multiskill_rev", STALE_TASK, engine_args=BLOCK)
    return ResidentEngine(merger, MODELS["base"], evaluator, SEED)


def test_every_deterministic_method_scores_in_the_resident_engine_as_on_disk_and_with_hf(reference, resident, task_dir):
    on_disk, with_vllm, with_hf = reference[:3]
    evaluator, _ = evaluators(task_dir, "multiskill_shift", "multiskill_rev")
    in_memory = {}
    for method, config in on_disk.items():
        resident.merge(config)
        in_memory[method] = scores(evaluator.score(resident.lm))
    assert in_memory == with_vllm
    assert in_memory == with_hf
    assert len({tuple(s.values()) for s in in_memory.values()}) > len(in_memory) // 2  # candidates differ


def test_a_swap_and_a_swap_back_give_the_first_candidates_exact_generations(reference, resident):
    from vllm import SamplingParams

    on_disk = reference[0]
    lines = (MULTISKILL / "tasks/data/rev_validation.jsonl").read_text().splitlines()[:40]
    prompts = [line.split('"prompt": "')[1].split('"')[0] for line in lines]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)

    def generations() -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in resident.engine.generate(prompts, greedy, use_tqdm=False)]

    resident.merge(on_disk["task_arithmetic"])
    first = generations()
    resident.merge(on_disk["linear"])
    other = generations()
    resident.merge(on_disk["task_arithmetic"])
    assert generations() == first
    assert other != first  # the swap did change the model


def test_a_stale_prefix_cache_cannot_change_a_score(reference, resident, task_dir, monkeypatch):
    """Every prompt of the preamble task starts with the same block. After each swap the score is
    the candidate's own (hf's on its merged folder); the control, a swap that keeps the prefix
    cache, scores the candidate with the previous weights' keys and values of that block."""
    on_disk, preamble = reference[0], reference[3]
    evaluator, _ = evaluators(task_dir, STALE_TASK)
    for method in ("task_arithmetic", "linear", "task_arithmetic"):
        resident.merge(on_disk[method])
        assert scores(evaluator.score(resident.lm)) == preamble[method]
    monkeypatch.setattr(resident.engine, "reset_prefix_cache", lambda *args, **kwargs: True)
    resident.merge(on_disk["linear"])  # the cache holds task_arithmetic's preamble block
    assert scores(evaluator.score(resident.lm)) != preamble["linear"], "the control shows no stale cache"


def test_a_merge_that_would_leave_engine_weights_unwritten_is_refused(reference, resident, monkeypatch):
    """The engine must be given every tensor it loaded (vLLM itself only logs a warning, and the
    tensor keeps the previous candidate's values). A merge planned without one is refused before
    anything is loaded, naming it."""
    names, tensors = resident.merger.merge_stream(reference[0]["linear"], seed=SEED)
    monkeypatch.setattr(resident.merger, "merge_stream", lambda *a, **k: (names - {"model.norm.weight"}, tensors))
    loads = []
    monkeypatch.setattr(resident.engine, "collective_rpc", lambda *a, **k: loads.append(a))
    with pytest.raises(ValueError, match="not written: model.norm.weight"):
        resident.merge(reference[0]["linear"])
    assert loads == []
