"""The search-quality benchmark's parts (benchmarks/search_quality.py): the planted problems are
what they claim (each recipe gives the hidden model back; the uniform merge does not), and the
reading of upstream's pycma log and of a search's best within a budget is right. The benchmark
itself (minutes per system) is run by hand; its table is in the README."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS / "planted"))
sys.path.insert(0, str(BENCHMARKS))

import problems as planted  # noqa: E402
import search_quality  # noqa: E402
import upstream  # noqa: E402

from evomerge.backends.merger_memory import InMemoryMerger  # noqa: E402
from evomerge.core.config import GenomeDefinition  # noqa: E402
from evomerge.core.search_space import SearchSpace  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return root, planted.build(root)


def _merge(problem_name: str, root: Path, vector_of) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    problem = planted.BY_NAME[problem_name]
    import yaml

    genome = GenomeDefinition.model_validate(
        yaml.safe_load((root / "configs" / f"{problem_name}.yml").read_text())["genome"]
    )
    space = SearchSpace(genome, problem.num_layers)
    config = space.decode(vector_of(space, problem))
    resident = AutoModelForCausalLM.from_pretrained(str(root / "models" / f"original_{problem.num_layers}")).eval()
    InMemoryMerger.from_config(config).merge_into(config, resident)
    return resident


@pytest.mark.parametrize(
    "name",
    ["linear-2", "linear-3", "task_arithmetic-3", "ties-2", "slerp-2", "linear-3-layers", "task_arithmetic-3-layers"],
)
def test_each_recipe_restores_the_hidden_model_and_the_uniform_merge_does_not(built, name):
    root, _ = built
    problem = planted.BY_NAME[name]
    items = [json.loads(line) for line in (root / "tasks" / f"{problem.task}.jsonl").read_text().splitlines()]
    assert len(items) == planted.ITEMS
    restored = _merge(name, root, lambda space, problem: planted.optimum_vector(problem, space))
    assert planted.agreement(restored, items) >= 0.99  # bfloat16 task vectors may flip one
    uniform = _merge(name, root, lambda space, problem: space.initial_point())
    assert planted.agreement(uniform, items) < 0.7


def test_configs_are_mergekit_evolve_configs_both_tools_read(built):
    import yaml

    from evomerge.core.config import EvolveConfig

    _, configs = built
    assert set(configs) == {p.name for p in planted.PROBLEMS}
    for path in configs.values():
        raw = yaml.safe_load(path.read_text())
        assert raw["apply_chat_template"] is False  # upstream's default would need a chat template
        EvolveConfig.model_validate(raw)
    dimensions = {
        p.name: SearchSpace(
            EvolveConfig.model_validate(yaml.safe_load(configs[p.name].read_text())).genome, p.num_layers
        ).dimension
        for p in planted.PROBLEMS
    }
    assert all(2 <= d <= 8 for n, d in dimensions.items() if not planted.BY_NAME[n].high_dimensional)
    assert dimensions["linear-3-layers"] >= 24 and dimensions["task_arithmetic-3-layers"] >= 24


def test_upstreams_best_at_a_budget_is_read_from_its_fit_dat(tmp_path):
    fit = tmp_path / "fit.dat"
    # pycma's format: a header of % lines, then iteration, evaluations, sigma, axis ratio,
    # best-ever f, best f of the iteration, median, worst (f = -score)
    fit.write_text(
        '% # columns="iteration, evaluation, sigma, axis ratio, bestever, best, median, worst"\n'
        "1 8 0.17 1.0 -0.40 -0.40 -0.35 -0.30\n"
        "2 16 0.18 1.1 -0.55 -0.55 -0.36 -0.30\n"
        "3 24 0.20 1.2 -0.55 -0.50 -0.37 -0.31\n"
    )
    assert upstream.best_at(fit, [8, 20, 24]) == {8: 0.40, 20: 0.55, 24: 0.55}
    assert upstream.sigmas(fit) == [0.17, 0.18, 0.20]


def test_the_best_within_a_budget_counts_the_first_evaluations_only():
    scores = [0.3, None, 0.5, 0.9, 0.4]
    assert search_quality.best_within(scores, 2) == 0.3
    assert search_quality.best_within(scores, 3) == 0.5
    assert search_quality.best_within(scores, 10) == 0.9
    assert np.isnan(search_quality.best_within([None], 1))


def test_the_lockstep_board_holds_each_candidate_until_every_running_one_reached_its_stage():
    """benchmarks/lockstep_racing.py: a candidate that asks for the others after its first stage
    waits until the generation's other running candidates published theirs; one that finished
    (or stopped) no longer holds anyone back."""
    import threading

    from lockstep_racing import LockstepBoard

    board = LockstepBoard()
    board.begin(["a", "b", "c"])
    board.publish(0, "a", {"t": [1.0]})
    seen: dict[str, dict] = {}
    waiting = threading.Thread(target=lambda: seen.update(a=board.others(0, "a")))
    waiting.start()
    board.publish(0, "b", {"t": [0.0]})
    waiting.join(timeout=0.3)
    assert waiting.is_alive(), "a went on before c published its first stage"
    board.done("c")  # c failed before its first stage
    waiting.join(timeout=5)
    assert not waiting.is_alive()
    assert seen["a"] == {"b": {"t": [0.0]}}
    board.publish(0, "b", {"t": [0.0, 1.0]})  # b, one stage ahead, waits for a's second stage
    ahead = threading.Thread(target=lambda: seen.update(b=board.others(0, "b")))
    ahead.start()
    ahead.join(timeout=0.3)
    assert ahead.is_alive()
    board.publish(0, "a", {"t": [1.0, 1.0]})
    ahead.join(timeout=5)
    assert seen["b"] == {"a": {"t": [1.0, 1.0]}}


def test_the_landscape_slices_go_through_the_optimum_and_shares_are_of_the_draws(built, monkeypatch):
    """benchmarks/planted_landscape.py: along each coordinate, the value the optimum has scores
    what the optimum scores; the shares count the first-generation draws (a few here)."""
    import os

    import planted_landscape

    monkeypatch.chdir(os.getcwd())  # the benchmark's slot worker changes into the run's folder
    root, _ = built
    out = planted_landscape.landscape("task_arithmetic-2", root, samples=4, seed=0, slices=True)
    assert out["optimum"] >= 0.99 and out["uniform"] < 0.7
    problem = planted.BY_NAME["task_arithmetic-2"]
    worker = search_quality._worker(root / "configs" / "task_arithmetic-2.yml", root)
    optimum = planted.optimum_vector(problem, worker.spec.search_space())
    assert len(out["slices"]) == len(optimum) == out["dimension"]
    for value, row in zip(optimum, out["slices"].values(), strict=True):
        assert row[planted_landscape.SLICE_VALUES.index(value)] == out["optimum"]
        assert min(row) < out["optimum"]  # each coordinate matters on this problem
    assert out["near"] in {k / 4 for k in range(5)} and out["better"] >= out["near"]
    assert out["chance_in_48"] == 1 - (1 - out["near"]) ** 48
