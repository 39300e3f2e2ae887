"""The demo's example (examples/layered): its config validates as shipped, its task vectors lie
where its README says, and per-layer structure pays on it: the recipe that takes each skill's
layers from its expert beats every fixed setting --fixed-baselines scores (real merges, real
lm-eval, on part of the validation items)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO

EXAMPLE = REPO / "examples" / "layered"
TASKS = REPO / "examples" / "multiskill" / "tasks"
ITEMS_PER_TASK = 60


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    from evomerge.backends.prepare import build_options, prepare_run

    return prepare_run(
        str(EXAMPLE / "config.yml"),
        str(tmp_path_factory.mktemp("storage")),
        build_options(task_search_path=[str(TASKS)], fixed_baselines=True),
    )


def test_the_config_validates_as_shipped(spec):
    assert spec.models.num_layers == 4 and spec.search_space().dimension == 8
    assert [t.name for t in spec.config.held_out_tasks] == ["multiskill_shift_test", "multiskill_rev_test"]
    assert spec.include_default_tasks is False


def test_each_expert_changed_only_the_attention_and_mlp_weights_of_every_decoder_layer():
    from safetensors.torch import load_file

    base = load_file(REPO / "examples" / "multiskill" / "models" / "base" / "model.safetensors")
    for expert in ("shift_expert", "rev_expert"):
        tensors = load_file(EXAMPLE / "models" / expert / "model.safetensors")
        assert tensors.keys() == base.keys()
        changed = {name for name in base if not np.array_equal(tensors[name].numpy(), base[name].numpy())}
        in_layers = {name for name in base if name.startswith("model.layers.") and "norm" not in name}
        assert changed == in_layers, f"{expert}: {sorted(changed ^ in_layers)[:3]}"


def test_taking_each_skill_from_its_experts_layers_beats_every_fixed_setting(spec):
    """rev_expert's layers 0-1 and shift_expert's layers 2-3 (weights 1 there, 0 elsewhere)
    against the uniform merge and each one-weight-per-model setting of --fixed-baselines, every
    merge made by the in-memory merger and scored by lm-eval on the first items of both
    validation tasks."""
    from evomerge.backends.evaluator_hf import HFEvaluator
    from evomerge.backends.resident_model import ResidentModel
    from evomerge.core.references import fixed_weight_points

    space = spec.search_space()
    settings = spec.evaluation.model_copy(update={"limit": ITEMS_PER_TASK})
    evaluator = HFEvaluator(settings, [str(TASKS)], False, batch_size=64, dtype="float32")
    resident = ResidentModel(spec, device="cpu", batch_size=64)

    def fitness(x) -> float:
        resident.merge(space.decode(x))
        results = evaluator.score(resident.lm).results
        return float(np.mean([results[t.name]["score,none"] for t in spec.config.tasks]))

    # the search vector: per layer, the weight of shift_expert then of rev_expert
    per_layer = np.array([0, 1, 0, 1, 1, 0, 1, 0], dtype=float)
    assert space.labels()[:2] == ["layers 0-0/shift_expert/weight", "layers 0-0/rev_expert/weight"]
    fixed = {label: fitness(x) for label, x in [("uniform merge", space.initial_point()), *fixed_weight_points(space)]}
    assert len(fixed) == 16
    recipe = fitness(per_layer)
    best_label, best = max(fixed.items(), key=lambda item: item[1])
    assert recipe > best + 0.05, f"per-layer {recipe:.4f}, best fixed {best_label} {best:.4f}"
