"""Vector <-> mergekit configuration, for every method: round trips, layout, validity."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.config import MergeConfiguration

from evomerge.core.config import GenomeDefinition
from evomerge.core.search_space import SearchSpace

MODELS = ["/models/alpha", "/models/beta", "/models/gamma"]
BASE = "/models/base"

CASES = {
    "linear": dict(models=MODELS, merge_method="linear"),
    "task_arithmetic": dict(models=MODELS, merge_method="task_arithmetic", base_model=BASE),
    "ties": dict(models=MODELS, merge_method="ties", base_model=BASE),
    "dare_ties": dict(models=MODELS, merge_method="dare_ties", base_model=BASE),
    "slerp": dict(models=MODELS[:2], merge_method="slerp"),
    "ties_base_listed": dict(models=[*MODELS, BASE], merge_method="ties", base_model=BASE),
    "linear_filters": dict(models=MODELS, merge_method="linear", filters=["self_attn", "mlp"]),
    "dare_smooth": dict(models=MODELS, merge_method="dare_ties", base_model=BASE, smooth=True),
    "task_arithmetic_negative": dict(
        models=MODELS, merge_method="task_arithmetic", base_model=BASE, allow_negative_weights=True
    ),
    # the newer methods of the registry
    "dare_linear": dict(models=MODELS, merge_method="dare_linear", base_model=BASE),
    "breadcrumbs": dict(models=MODELS, merge_method="breadcrumbs", base_model=BASE),
    "breadcrumbs_ties": dict(models=MODELS, merge_method="breadcrumbs_ties", base_model=BASE),
    "della": dict(models=MODELS, merge_method="della", base_model=BASE),
    "della_linear_filters_smooth": dict(
        models=MODELS, merge_method="della_linear", base_model=BASE, filters=["mlp"], smooth=True
    ),
    "nuslerp": dict(models=MODELS[:2], merge_method="nuslerp", base_model=BASE),
    "nuslerp_without_base": dict(models=MODELS[:2], merge_method="nuslerp"),
    "multislerp": dict(models=MODELS, merge_method="multislerp", base_model=BASE),
    "multislerp_without_base": dict(models=MODELS, merge_method="multislerp"),
    "sce": dict(models=MODELS, merge_method="sce", base_model=BASE),
}


def make_space(case: str, granularity: int = 2, layers: int = 8) -> SearchSpace:
    return SearchSpace(GenomeDefinition(layer_granularity=granularity, **CASES[case]), layers, "float32")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("granularity", [0, 1, 2, 4])
def test_every_decoded_configuration_is_a_valid_mergekit_configuration(case, granularity):
    space = make_space(case, granularity)
    rng = np.random.default_rng(0)
    for x in [space.initial_point(), rng.normal(0.3, 0.5, space.dimension)]:
        config = space.decode(x)
        parsed = MergeConfiguration.model_validate(config)
        assert parsed.merge_method == config["merge_method"]


@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_encode_inverts_decode_on_canonical_vectors(case, data):
    space = make_space(case)
    x = np.array(data.draw(st.lists(st.floats(-3, 3), min_size=space.dimension, max_size=space.dimension)))
    canonical = space.canonical(x)
    assert np.array_equal(space.encode(space.decode(x)), canonical)
    # canonical vectors are fixed points: decoding them again gives the same configuration
    assert space.decode(canonical) == space.decode(x)


def test_dimensions_per_method():
    # 8 layers, granularity 2 -> 4 groups; 3 weighted models
    assert make_space("linear").dimension == 4 * 3
    assert make_space("task_arithmetic").dimension == 4 * 3
    assert make_space("ties").dimension == 4 * 3 * 2
    assert make_space("ties_base_listed").dimension == 4 * 3 * 2  # the base gets no parameters
    assert make_space("slerp").dimension == 4
    assert make_space("linear_filters").dimension == 4 * 3 * 3


def test_start_point_is_the_uniform_merge():
    assert make_space("linear").initial_point().tolist() == [1 / 3] * 12
    ties = make_space("ties")
    assert [c.parameter for c in ties.coordinates[:2]] == ["weight", "density"]
    assert ties.initial_point()[:2].tolist() == [1 / 3, 1.0]
    assert make_space("slerp").initial_point().tolist() == [0.5] * 4


def test_decoding_maps_follow_upstream():
    space = make_space("ties", granularity=0)
    x = np.array([-0.4, 1.7, 0.2, -0.3, 0.1, 0.5])  # (weight, density) x 3 models
    config = space.decode(x)
    params = [s.get("parameters") for s in config["slices"][0]["sources"]]
    assert params[0] == {"weight": 0.4, "density": 1.0}  # |w|; clip(|d|, 0, 1)
    assert params[1] == {"weight": 0.2, "density": 0.3}
    assert params[3] is None  # the base model: a source without parameters
    assert config["parameters"] == {"normalize": True, "int8_mask": True}
    negative = make_space("task_arithmetic_negative", granularity=0).decode(np.array([-0.4, 0.2, 0.1]))
    assert negative["slices"][0]["sources"][0]["parameters"] == {"weight": -0.4}


def test_layer_groups_and_readable_labels():
    space = make_space("linear", granularity=4)
    config = space.decode(space.initial_point())
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[0, 4], [4, 8]]
    assert space.labels()[:2] == ["layers 0-3/alpha/weight", "layers 0-3/beta/weight"]
    assert space.named_parameters(space.initial_point())["layers 4-7/gamma/weight"] == pytest.approx(1 / 3)


def test_slerp_interpolates_base_toward_the_other_model_per_group():
    space = make_space("slerp", granularity=4)
    config = space.decode(np.array([-0.2, 1.4]))
    assert config["base_model"] == "/models/alpha"
    assert [s["parameters"]["t"] for s in config["slices"]] == [0.0, 1.0]
    assert [src["model"] for src in config["slices"][0]["sources"]] == ["/models/alpha", "/models/beta"]


def test_filters_split_parameters_by_tensor_name():
    space = make_space("linear_filters", granularity=0)
    config = space.decode(np.arange(9) / 10)
    weight = config["slices"][0]["sources"][0]["parameters"]["weight"]
    assert weight == [{"filter": "self_attn", "value": 0.0}, {"filter": "mlp", "value": 0.1}, {"value": 0.2}]


def test_smooth_writes_gradients_per_model():
    space = make_space("dare_smooth", granularity=4)
    config = space.decode(space.initial_point())
    assert "slices" not in config
    assert config["models"][0]["parameters"]["weight"] == [pytest.approx(1 / 3)] * 2
    assert config["models"][-1] == {"model": BASE}


def test_granularity_must_divide_layers_with_a_fix():
    with pytest.raises(
        ValueError, match=r"does not divide the models' 8 layers; use 0 \(one group\) or one of \[1, 2, 4, 8\]"
    ):
        SearchSpace(GenomeDefinition(layer_granularity=3, **CASES["linear"]), 8)


def test_wrong_vector_length_and_nan_are_refused():
    space = make_space("linear")
    with pytest.raises(ValueError, match="expected a vector of 12"):
        space.decode(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        space.decode(np.full(12, np.nan))


def test_newer_methods_start_at_mergekits_defaults_with_uniform_weights():
    della = make_space("della")
    assert della.dimension == 4 * 3 * 3
    assert [c.parameter for c in della.coordinates[:3]] == ["weight", "density", "epsilon"]
    assert della.initial_point()[:3].tolist() == [1 / 3, 1.0, 0.15]
    assert della.canonical(della.initial_point())[:3].tolist() == [1 / 3, 1.0, 0.0]  # no pruning
    assert make_space("breadcrumbs").initial_point()[:3].tolist() == [1 / 3, 1.0, 0.01]
    assert make_space("dare_linear").initial_point()[:2].tolist() == [1 / 3, 1.0]
    assert make_space("nuslerp").initial_point().tolist() == [0.5] * 8
    assert make_space("multislerp_without_base").initial_point().tolist() == [1 / 3] * 12
    assert make_space("sce").initial_point().tolist() == [1.0] * 4
    assert della.domains()[:3] == [(0.0, None), (0.0, 1.0), (0.0, 0.5)]


def test_della_epsilon_is_capped_by_its_density():
    space = make_space("della", granularity=0)
    x = np.array([0.5, 0.9, 0.5, 0.5, -0.2, 0.7, 0.5, 1.0, 0.7])  # (weight, density, epsilon) x 3
    params = [s.get("parameters") for s in space.decode(x)["slices"][0]["sources"]]
    assert 0 < params[0]["epsilon"] < 0.1 and 0.9 + params[0]["epsilon"] < 1
    assert 0 < params[1]["epsilon"] < 0.2 and 0.2 - params[1]["epsilon"] > 0
    assert params[2]["epsilon"] == 0.0  # density 1: nothing is pruned, epsilon is unused
    assert space.named_parameters(x)["layers 0-7/alpha/epsilon"] == params[0]["epsilon"]


def test_method_wide_parameters_are_written_per_slice():
    config = make_space("sce", granularity=4).decode(np.array([0.3, -1.5]))
    assert [s["parameters"] for s in config["slices"]] == [{"select_topk": 0.3}, {"select_topk": 1.0}]
    assert all("parameters" not in src for s in config["slices"] for src in s["sources"])
    assert config["parameters"] == {"int8_mask": True}  # sce has no normalize
    assert make_space("sce").labels()[0] == "layers 0-1/select_topk"


def test_methods_without_normalize_write_none():
    config = make_space("nuslerp").decode(make_space("nuslerp").initial_point())
    assert "parameters" not in config and config["base_model"] == BASE
    assert [src["model"] for src in config["slices"][0]["sources"]] == [*MODELS[:2], BASE]
    assert config["slices"][0]["sources"][2] == {"model": BASE, "layer_range": [0, 2]}
