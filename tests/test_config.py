"""The mergekit-evolve YAML: accepted unchanged, and refused with a useful message when wrong."""

import pytest
from pydantic import ValidationError

from evomerge.core.config import EvolveConfig, GenomeDefinition, TaskConfiguration, benchmark_task_names


def genome(**overrides):
    values = {"models": ["/m/a", "/m/b"], "merge_method": "linear"}
    values.update(overrides)
    return values


def test_upstream_example_config_parses_with_upstream_defaults():
    config = EvolveConfig.model_validate(
        {
            "genome": {
                "models": ["/m/a", "/m/b", "/m/base"],
                "merge_method": "dare_ties",
                "base_model": "/m/base",
                "layer_granularity": 8,
                "normalize": True,
                "allow_negative_weights": True,
                "tokenizer_source": "base",
            },
            "tasks": ["short_task", {"name": "ppl_task", "weight": -0.5, "metric": "word_perplexity,none"}],
            "limit": 50,
            "num_fewshot": 2,
        }
    )
    assert config.tasks[0] == TaskConfiguration(name="short_task", weight=1.0, metric="acc,none")
    assert config.tasks[1].weight == -0.5
    assert config.apply_chat_template is False  # evomerge's documented default
    assert config.genome.filters is None and config.genome.smooth is False


@pytest.mark.parametrize(
    "genome_values, fragment",
    [
        (genome(merge_method="frankenmerge"), "unknown merge method 'frankenmerge'; use one of: linear"),
        (genome(merge_method="ties"), "needs genome.base_model"),
        (genome(merge_method="task_arithmetic"), "needs genome.base_model"),
        (genome(merge_method="slerp", models=["/a", "/b", "/c"]), "exactly two models, got 3"),
        (genome(merge_method="slerp", models=["/a"]), "exactly two models, got 1"),
        (genome(layer_granularity=-1), "layer_granularity"),
        (genome(models=[]), "genome.models is empty"),
        (genome(models=["/a", "/a"]), "lists a model twice"),
        (genome(merge_method="ties", models=["/base"], base_model="/base"), "only the base model"),
        (genome(layer_granularty=2), "layer_granularty: unknown key"),
        # the newer methods' needs, from the merge-method registry
        (genome(merge_method="model_stock", base_model="/c"), "'model_stock' cannot be searched: it takes no weights"),
        (genome(merge_method="karcher"), "'karcher' cannot be searched"),
        (genome(merge_method="sce"), "'sce' needs genome.base_model"),
        (genome(merge_method="della"), "'della' needs genome.base_model"),
        (genome(merge_method="nuslerp", models=["/a", "/b", "/c"]), "exactly two models besides the base model, got 3"),
        (
            genome(merge_method="nuslerp", models=["/a", "/c"], base_model="/c"),
            "exactly two models besides the base model, got 1",
        ),
        (genome(base_model="/c"), "'linear' merges the listed models and has no base model"),
        (genome(merge_method="sce", base_model="/c", filters=["mlp"]), "'sce' supports neither 'smooth' nor 'filters'"),
    ],
)
def test_genome_errors_name_the_field_and_the_fix(genome_values, fragment):
    with pytest.raises(ValidationError) as info:
        EvolveConfig.model_validate({"genome": genome_values, "tasks": ["t"]})
    text = str(info.value).replace("Extra inputs are not permitted", "unknown key")
    assert fragment.split(":")[0] in text
    if ":" not in fragment:
        assert fragment in text


def test_no_tasks_is_an_error_with_a_fix():
    with pytest.raises(ValidationError, match="add at least one lm-eval task"):
        EvolveConfig.model_validate({"genome": genome(), "tasks": []})


def test_unknown_top_level_key_is_an_error():
    with pytest.raises(ValidationError, match="taks"):
        EvolveConfig.model_validate({"genome": genome(), "tasks": ["t"], "taks": []})


def test_zero_weight_task_is_refused():
    with pytest.raises(ValidationError, match="weight 0"):
        TaskConfiguration(name="t", weight=0)


def test_slerp_with_base_plus_one_model_is_two_sources():
    g = GenomeDefinition.model_validate(genome(merge_method="slerp", models=["/a"], base_model="/b"))
    assert g.merge_method == "slerp"


def test_mapping_model_references_are_accepted_and_lora_refused():
    g = GenomeDefinition.model_validate(genome(models=[{"model": "/a"}, "/b"]))
    assert g.models == ["/a", "/b"]
    with pytest.raises(ValidationError, match="LoRA"):
        GenomeDefinition.model_validate(genome(models=[{"model": "/a", "lora": "/l"}, "/b"]))


def test_normalize_defaults_follow_upstream():
    assert GenomeDefinition(**genome()).effective_normalize is True
    assert GenomeDefinition(**genome(merge_method="task_arithmetic", base_model="/c")).effective_normalize is False
    assert (
        GenomeDefinition(**genome(merge_method="ties", base_model="/c", normalize=False)).effective_normalize is False
    )
    assert GenomeDefinition(**genome(merge_method="dare_ties", base_model="/c")).effective_normalize is True
    # newer methods: mergekit's defaults; none for methods without the option (normalize ignored)
    assert GenomeDefinition(**genome(merge_method="della", base_model="/c")).effective_normalize is True
    assert GenomeDefinition(**genome(merge_method="dare_linear", base_model="/c")).effective_normalize is False
    assert GenomeDefinition(**genome(merge_method="nuslerp", normalize=True)).effective_normalize is None


def test_benchmark_tasks_are_flagged_like_upstream():
    config = EvolveConfig.model_validate({"genome": genome(), "tasks": ["mmlu_college_math", "gsm8k_train", "my_task"]})
    assert benchmark_task_names(config) == ["mmlu_college_math"]


def test_held_out_tasks_are_optional_and_checked_like_tasks():
    plain = EvolveConfig.model_validate({"genome": genome(), "tasks": ["t"]})
    assert plain.held_out_tasks is None, "a mergekit-evolve config stays valid without the key"
    held = EvolveConfig.model_validate({"genome": genome(), "tasks": ["t"], "held_out_tasks": ["t_test"]})
    assert [t.name for t in held.held_out_tasks] == ["t_test"] and held.held_out_tasks[0].metric == "acc,none"
    with pytest.raises(ValidationError, match="held_out_tasks.*or remove the key"):
        EvolveConfig.model_validate({"genome": genome(), "tasks": ["t"], "held_out_tasks": []})
    with pytest.raises(ValidationError, match="listed twice"):
        EvolveConfig.model_validate({"genome": genome(), "tasks": ["t"], "held_out_tasks": ["u", "u"]})
