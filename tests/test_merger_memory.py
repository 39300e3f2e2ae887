"""The in-memory merger against mergekit's own on-disk merge (``run_merge``, as DiskMerger calls it).

The experts of the tiny example only differ from the base inside the decoder layers (their
embeddings, norms and lm_head were frozen), which would make every check of the tensors outside the
layer blocks vacuous. The fixture therefore perturbs those tensors in copies of the experts, so
that "embeddings take the first slice's parameters" and the like are actually tested.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.backends.merger_disk import DiskMerger
from evomerge.backends.merger_memory import InMemoryMerger, MergeStats
from evomerge.core import merge_methods
from evomerge.core.config import EvolveConfig
from evomerge.core.options import RunOptions
from evomerge.core.search_space import SearchSpace

NUM_LAYERS = 4
OUTSIDE_LAYERS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
# Every searchable method, random ones included: in memory they draw what run_merge draws.
METHODS = tuple(merge_methods.METHODS)
SEED = RunOptions().seed  # DiskMerger(RunOptions()) seeds run_merge with it


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory) -> dict[str, str]:
    """base as built; copies of the experts whose embeddings, norms and lm_head differ from base."""
    root = tmp_path_factory.mktemp("perturbed")
    paths = {"base": str(tiny_models["base"])}
    for seed, name in enumerate(("shift_expert", "rev_expert"), start=1):
        out = root / name
        shutil.copytree(tiny_models[name], out)
        state = load_file(out / "model.safetensors")
        generator = torch.Generator().manual_seed(seed)
        for key, value in state.items():
            if ".layers." not in key or "norm" in key:
                state[key] = value + 0.05 * torch.randn(value.shape, generator=generator)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        paths[name] = str(out)
    scaled = root / "base_scaled"  # colinear with base, tensor by tensor
    shutil.copytree(tiny_models["base"], scaled)
    state = load_file(scaled / "model.safetensors")
    save_file(
        {k: 1.5 * v for k, v in state.items()},
        scaled / "model.safetensors",
        metadata={"format": "pt"},
    )
    paths["base_scaled"] = str(scaled)
    return paths


@pytest.fixture(scope="module")
def merger(sources) -> InMemoryMerger:
    return InMemoryMerger([sources["shift_expert"], sources["rev_expert"]], base_model=sources["base"])


@pytest.fixture(scope="module")
def disk_merger() -> DiskMerger:
    return DiskMerger(RunOptions(), use_cuda=False)


@pytest.fixture
def resident(sources):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(sources["base"]).eval()


def make_space(sources, method: str, granularity: int, dtype: str = "float32", **genome) -> SearchSpace:
    experts = [sources["shift_expert"], sources["rev_expert"]]
    spec = {"merge_method": method, "layer_granularity": granularity, **genome}
    base = merge_methods.METHODS[method].base
    if base == "unused":
        spec.setdefault("models", [sources["base"], *experts])
    else:
        spec.setdefault("models", experts)
    if base in ("required", "optional"):
        spec.setdefault("base_model", sources["base"])
    config = EvolveConfig.model_validate({"genome": spec, "tasks": ["tiny_shift"]})
    return SearchSpace(config.genome, NUM_LAYERS, dtype)


def sample_configs(space: SearchSpace, n: int = 2, seed: int = 0) -> list[dict]:
    """The start point and random vectors (negatives and values above 1 exercise the clipping)."""
    rng = np.random.default_rng(seed)
    vectors = [space.initial_point()] + [rng.normal(0.4, 0.5, space.dimension) for _ in range(n - 1)]
    return [space.decode(x) for x in vectors]


def merge_on_disk(disk_merger: DiskMerger, config: dict, out: Path) -> dict[str, torch.Tensor]:
    disk_merger.merge(copy.deepcopy(config), str(out))
    return load_file(out / "model.safetensors")


def assert_identical(mine: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(mine) == set(reference)
    different = [
        name
        for name in reference
        if mine[name].dtype != reference[name].dtype or not torch.equal(mine[name], reference[name])
    ]
    assert not different, f"{len(different)} tensors differ from mergekit's, e.g. {different[:3]}"


# --- exactness against run_merge ------------------------------------------------------------------
@pytest.mark.parametrize("granularity", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_mergekit_on_disk_bit_for_bit(method, granularity, sources, merger, disk_merger, tmp_path):
    space = make_space(sources, method, granularity)
    for i, config in enumerate(sample_configs(space, n=3, seed=granularity)):
        reference = merge_on_disk(disk_merger, config, tmp_path / f"c{i}")
        assert_identical(merger.merged_tensors(config, seed=SEED), reference)


VARIANTS = {
    # gradients over layers (smooth) and per-filter values, as the search space writes them
    "ties_smooth": {"method": "ties", "granularity": 2, "smooth": True},
    "task_arithmetic_smooth_filters": {
        "method": "task_arithmetic",
        "granularity": 1,
        "smooth": True,
        "filters": ["self_attn"],
    },
    "linear_filters": {"method": "linear", "granularity": 2, "filters": ["self_attn", "mlp"]},
    "ties_filters": {"method": "ties", "granularity": 2, "filters": ["mlp"]},
    "task_arithmetic_negative_weights": {
        "method": "task_arithmetic",
        "granularity": 2,
        "allow_negative_weights": True,
    },
    "slerp_one_group": {"method": "slerp", "granularity": 0},
    # bfloat16 merges (the search space's default dtype): sources cast first, as mergekit does
    "linear_bf16": {"method": "linear", "granularity": 2, "dtype": "bfloat16"},
    "ties_bf16": {"method": "ties", "granularity": 1, "dtype": "bfloat16"},
    "slerp_bf16": {"method": "slerp", "granularity": 1, "dtype": "bfloat16"},
    "dare_ties_bf16": {"method": "dare_ties", "granularity": 2, "dtype": "bfloat16"},
    "della_filters": {"method": "della", "granularity": 2, "filters": ["mlp"]},
    "breadcrumbs_smooth": {"method": "breadcrumbs", "granularity": 2, "smooth": True},
    "nuslerp_without_base": {"method": "nuslerp", "granularity": 2, "base_model": None},
    "multislerp_without_base": {"method": "multislerp", "granularity": 2, "base_model": None},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_filters_gradients_and_bf16_also_match_exactly(variant, sources, merger, disk_merger, tmp_path):
    options = dict(VARIANTS[variant])
    space = make_space(
        sources,
        options.pop("method"),
        options.pop("granularity"),
        options.pop("dtype", "float32"),
        **options,
    )
    for i, config in enumerate(sample_configs(space, n=2, seed=7)):
        reference = merge_on_disk(disk_merger, config, tmp_path / f"c{i}")
        assert_identical(merger.merged_tensors(config, seed=SEED), reference)


def test_slerp_of_colinear_tensors_interpolates_linearly(sources, disk_merger, tmp_path):
    # base and 1.5 * base: every pair of tensors is colinear, so mergekit falls back to lerp
    merger = InMemoryMerger([sources["base"], sources["base_scaled"]])
    config = {
        "merge_method": "slerp",
        "base_model": sources["base"],
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": sources["base"], "layer_range": [0, 4]},
                    {"model": sources["base_scaled"], "layer_range": [0, 4]},
                ],
                "parameters": {"t": 0.3},
            }
        ],
    }
    merged = merger.merged_tensors(config)
    assert_identical(merged, merge_on_disk(disk_merger, config, tmp_path / "colinear"))
    base = load_file(Path(sources["base"]) / "model.safetensors")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 1.15 * base[name])


def test_tensors_outside_the_layers_follow_the_first_and_last_slice(sources, merger, disk_merger, tmp_path):
    """Embeddings: first slice; final norm and lm_head: last slice; with gradients, all three
    take the gradient's FIRST value (mergekit evaluates them at t = 0)."""
    space = make_space(sources, "task_arithmetic", 2)
    config = space.decode(np.array([0.2, 0.9, 0.7, 0.3]))
    reference = merge_on_disk(disk_merger, config, tmp_path / "slices")
    # every slice with the first slice's parameters, or with the last slice's
    first, last = copy.deepcopy(config), copy.deepcopy(config)
    first["slices"][1]["sources"] = [
        {**s, "layer_range": [2, 4]} for s in copy.deepcopy(config["slices"][0]["sources"])
    ]
    last["slices"][0]["sources"] = [{**s, "layer_range": [0, 2]} for s in copy.deepcopy(config["slices"][1]["sources"])]
    with_first, with_last = merger.merged_tensors(first), merger.merged_tensors(last)
    assert torch.equal(with_first["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
    assert not torch.equal(with_last["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
    for name in ("model.norm.weight", "lm_head.weight"):
        assert torch.equal(with_last[name], reference[name])
        assert not torch.equal(with_first[name], reference[name])

    smooth = make_space(sources, "task_arithmetic", 2, smooth=True).decode(np.array([0.2, 0.9, 0.7, 0.3]))
    reference = merge_on_disk(disk_merger, smooth, tmp_path / "smooth")
    for index, matches in ((0, True), (-1, False)):
        scalar = copy.deepcopy(smooth)
        for entry in scalar["models"]:
            if "parameters" in entry:
                entry["parameters"]["weight"] = entry["parameters"]["weight"][index]
        merged = merger.merged_tensors(scalar)
        for name in OUTSIDE_LAYERS:
            assert torch.equal(merged[name], reference[name]) is matches, (index, name)


# --- the resident model ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"])
def test_resident_model_scores_like_a_reload_of_the_disk_merge(
    method, sources, merger, disk_merger, resident, tmp_path
):
    from transformers import LlamaForCausalLM

    config = sample_configs(make_space(sources, method, 2), n=2, seed=3)[1]
    merge_on_disk(disk_merger, config, tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    pointers = {name: p.data_ptr() for name, p in resident.named_parameters()}

    stats = merger.merge_into(config, resident, seed=SEED)

    assert isinstance(stats, MergeStats)
    assert stats.tensors == len(pointers) and stats.bytes_written == sum(
        p.numel() * p.element_size() for p in resident.parameters()
    )
    assert stats.bytes_read >= stats.bytes_written and stats.seconds > 0
    assert {name: p.data_ptr() for name, p in resident.named_parameters()} == pointers  # in place
    merged_state = resident.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(merged_state[name], tensor), name
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 150, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(resident(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_a_second_merge_leaves_no_trace_of_the_first(sources, merger, disk_merger, resident, tmp_path):
    a = sample_configs(make_space(sources, "ties", 1), n=2, seed=11)[1]
    b = sample_configs(make_space(sources, "slerp", 2), n=2, seed=12)[1]
    reference = merge_on_disk(disk_merger, b, tmp_path / "b")
    merger.merge_into(a, resident)
    merger.merge_into(b, resident)
    state = resident.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def test_tied_embeddings_follow_the_merged_embedding_table(tiny_models, disk_merger, tmp_path):
    """SmolLM2-style models store no lm_head: mergekit skips it, and the resident model's tied
    lm_head is the merged embed_tokens, as after a reload."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"vocab_size": 265, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = LlamaConfig(**shape, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    paths = {}
    for name in ("base", "a", "b"):
        if name != "base":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tiny_models["base"]) / f, tmp_path / name)
        paths[name] = str(tmp_path / name)
    genome = {
        "models": [paths["a"], paths["b"]],
        "base_model": paths["base"],
        "merge_method": "ties",
    }
    space = SearchSpace(
        EvolveConfig.model_validate({"genome": {**genome, "layer_granularity": 1}, "tasks": ["t"]}).genome,
        2,
        "float32",
    )
    merge = sample_configs(space, n=2, seed=4)[1]
    merge_on_disk(disk_merger, merge, tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    resident = LlamaForCausalLM.from_pretrained(paths["base"]).eval()
    assert resident.lm_head.weight is resident.model.embed_tokens.weight

    InMemoryMerger([paths["a"], paths["b"]], base_model=paths["base"]).merge_into(merge, resident)

    ids = torch.tensor([[1, 5, 9, 30, 200, 7]])
    with torch.no_grad():
        assert torch.equal(resident(input_ids=ids).logits, reloaded(input_ids=ids).logits)


# --- random methods: seeded as run_merge seeds them ----------------------------------------------
def dense_enough_to_drop(sources, method: str) -> dict:
    """A configuration whose densities are well below 1 in every group: most entries are drawn."""
    space = make_space(sources, method, 2)
    x = np.array([0.4 if c.parameter == "density" else 0.6 for c in space.coordinates])
    return space.decode(x)


@pytest.mark.parametrize("method", [m for m in METHODS if merge_methods.METHODS[m].random])
def test_random_methods_draw_what_run_merge_draws_for_the_seed(method, sources, merger, tmp_path):
    config = dense_enough_to_drop(sources, method)
    for seed in (3, 4):
        disk = DiskMerger(RunOptions(seed=seed), use_cuda=False)
        reference = merge_on_disk(disk, config, tmp_path / str(seed))
        assert_identical(merger.merged_tensors(config, seed=seed), reference)
    # the seed matters, and the caller's generator is left as it was
    state = torch.random.get_rng_state()
    first, second = merger.merged_tensors(config, seed=3), merger.merged_tensors(config, seed=4)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_random_merge_into_the_resident_model_is_repeatable(sources, merger, resident):
    config = dense_enough_to_drop(sources, "dare_ties")
    expected = merger.merged_tensors(config, seed=3)
    merger.merge_into(config, resident, seed=3)
    assert_identical(resident.state_dict(), expected)


# --- refusals -------------------------------------------------------------------------------------
def test_what_cannot_be_merged_exactly_is_refused_before_any_write(sources, merger, resident):
    before = {k: v.clone() for k, v in resident.state_dict().items()}
    config = sample_configs(make_space(sources, "linear", 2), n=1)[0]

    with pytest.raises(ValueError, match="frankenmerge"):
        merger.merge_into({**config, "merge_method": "frankenmerge"}, resident)
    with pytest.raises(ValueError, match="requires a base"):  # mergekit's own check
        merger.merge_into({**config, "merge_method": "ties"}, resident)
    with pytest.raises(ValueError, match="tokenizer_source"):
        merger.merge_into({**config, "tokenizer_source": "base"}, resident)
    partial = copy.deepcopy(config)
    partial["slices"] = partial["slices"][:1]  # layers 0-1 only: layers 2-3 would keep old values
    with pytest.raises(ValueError, match="does not write these tensors.*layers.2"):
        merger.merge_into(partial, resident)
    stranger = copy.deepcopy(config)
    stranger["slices"][0]["sources"][0]["model"] = "/nowhere/model"
    with pytest.raises(ValueError, match="has not loaded"):
        merger.merge_into(stranger, resident)

    for name, tensor in resident.state_dict().items():
        assert torch.equal(tensor, before[name]), name
