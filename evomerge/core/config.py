"""The ``mergekit-evolve`` YAML configuration, accepted unchanged.

Field names, defaults and shorthands follow ``mergekit.evo.config`` (0.1.5) so that an existing
config file works as is. Two deliberate differences, both documented in the README:

- ``apply_chat_template`` defaults to ``False`` (upstream ``True``): tiny or base models have no
  chat template, and a silent template changes scores.
- Unknown keys are errors (upstream ignores them): a misspelt ``layer_granularty`` would otherwise
  silently search a different space.

Every validator raises ``ValueError`` so that pydantic's message names the field, and each
message says how to fix the problem.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from evomerge.core import merge_methods

# Upstream refuses these as objectives unless --i-understand-the-depths-of-the-evils-i-am-unleashing
# is given: optimising a merge directly against a public benchmark's test set games it.
BENCHMARK_PREFIXES = (
    "mmlu",
    "hendrycks",
    "agieval",
    "gsm8k",
    "hellaswag",
    "winogrande",
    "arc_",
    "ai2_arc",
    "truthfulqa",
    "bigbench",
    "piqa",
    "openbookqa",
    "leaderboard",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenomeDefinition(_Strict):
    """``genome:`` — which models are merged, how, and at what granularity the recipe varies."""

    models: list[str]
    merge_method: str
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = 0
    normalize: bool | None = None
    allow_negative_weights: bool = False
    # Upstream: one extra parameter set per tensor-name filter (e.g. ["self_attn", "mlp"]).
    filters: list[str] | None = None
    # Upstream: per-model parameter gradients across layers instead of discrete slices.
    smooth: bool = False

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_strings(cls, value: Any) -> Any:
        # mergekit accepts {model: ..., lora: ...} mappings too; evomerge keeps the string form.
        if isinstance(value, list):
            return [_model_reference_string(v) for v in value]
        return value

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_as_string(cls, value: Any) -> str | None:
        return None if value is None else _model_reference_string(value)

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        merge_methods.get(value)  # a ValueError naming the methods that can be searched
        return value

    @field_validator("layer_granularity")
    @classmethod
    def _non_negative_granularity(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 (one group for all layers) or a positive number of layers per group")
        return value

    @model_validator(mode="after")
    def _method_requirements(self) -> GenomeDefinition:
        if not self.models:
            raise ValueError("genome.models is empty; list the fine-tuned models to merge")
        if len(set(self.models)) != len(self.models):
            raise ValueError("genome.models lists a model twice; list each model once")
        method = self.method
        name = method.name
        if method.base == "required" and self.base_model is None:
            raise ValueError(
                f"merge_method {name!r} needs genome.base_model (the model the "
                "fine-tunes were trained from); add it, or use merge_method 'linear'"
            )
        if method.base == "unused" and self.base_model not in (None, *self.models):
            raise ValueError(
                f"merge_method {name!r} merges the listed models and has no base model; "
                "add genome.base_model to genome.models, or remove it"
            )
        _check_count(method, self.sources, method.sources, "models")
        others = self.non_base_models
        if method.non_base[0] >= 1 and not others:
            raise ValueError("genome.models holds only the base model; list the fine-tuned models to merge")
        _check_count(method, others, method.non_base, "models besides the base model")
        if len(self.sources) < 2:
            raise ValueError(
                f"merge_method {name!r} would merge one model ({self.sources[0]}) with nothing: "
                "the budget would score that one model again and again. List at least two models "
                "(genome.models, plus genome.base_model where the method takes one)"
            )
        if method.per_group and (self.smooth or self.filters):
            raise ValueError(
                f"merge_method {name!r} supports neither 'smooth' nor 'filters' (it searches "
                f"one {', '.join(p.name for p in method.per_group)} per layer group); remove them"
            )
        return self

    @property
    def method(self) -> merge_methods.MergeMethod:
        """The merge method's registry entry."""
        return merge_methods.METHODS[self.merge_method]

    @property
    def effective_base_model(self) -> str | None:
        """The base the merge uses: genome.base_model; for slerp, else the first model."""
        if self.method.base == "first_model":
            return self.base_model or self.models[0]
        return self.base_model

    @property
    def sources(self) -> list[str]:
        """Every model the merge reads, each once: the models, then the base if not listed."""
        base = self.effective_base_model
        return [*self.models, *([base] if base is not None and base not in self.models else [])]

    @property
    def non_base_models(self) -> list[str]:
        """The models merged into the base (for a method without a base: every model)."""
        if self.method.base == "unused":
            return list(self.models)
        base = self.effective_base_model
        return [m for m in self.sources if m != base]

    @property
    def effective_normalize(self) -> bool | None:
        """The registry's default unless set: upstream's (true for linear, ties and dare_ties;
        false for task_arithmetic), else mergekit's (true for della); None for methods without
        the option (genome.normalize is then ignored, as upstream did)."""
        default = self.method.normalize_default
        if default is None:
            return None
        return default if self.normalize is None else self.normalize


_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def _check_count(
    method: merge_methods.MergeMethod,
    models: list[str],
    bounds: tuple[int, int | None],
    what: str,
) -> None:
    low, high = bounds
    if low <= len(models) and (high is None or len(models) <= high):
        return
    if low == high:
        needed = f"exactly {_COUNT_WORDS.get(low, low)}"
    elif high is not None and len(models) > high:
        needed = f"at most {_COUNT_WORDS.get(high, high)}"
    else:
        needed = f"at least {_COUNT_WORDS.get(low, low)}"
    raise ValueError(
        f"merge_method {method.name!r} needs {needed} {what}, got {len(models)} "
        f"({', '.join(models)}); {method.count_hint or 'change genome.models'}"
    )


class TaskConfiguration(_Strict):
    """One lm-eval task of the fitness. A bare string is shorthand for ``{name: ...}``."""

    name: str
    weight: float = 1.0
    metric: str = "acc,none"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value

    @field_validator("weight")
    @classmethod
    def _finite_nonzero_weight(cls, value: float) -> float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        if value == 0:
            raise ValueError("a task with weight 0 adds nothing to the fitness; remove it")
        return value


class EvolveConfig(_Strict):
    """The whole YAML file: ``genome``, ``tasks`` and optional lm-eval settings.

    ``held_out_tasks`` is evomerge's one addition (optional; a file without it is still a valid
    ``mergekit-evolve`` config): tasks the search never sees, on which the baselines and the
    best candidates are scored again, so that a user sees how much of a win is selection noise.
    """

    genome: GenomeDefinition
    tasks: list[TaskConfiguration]
    held_out_tasks: list[TaskConfiguration] | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = True

    @field_validator("tasks", "held_out_tasks")
    @classmethod
    def _some_tasks(cls, value: list[TaskConfiguration] | None, info: ValidationInfo) -> list[TaskConfiguration] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                f"no tasks: add at least one lm-eval task under '{info.field_name}:' "
                "(e.g. '- name: my_task' with an optional 'metric' and 'weight')"
                + (", or remove the key" if info.field_name == "held_out_tasks" else "")
            )
        seen: set[tuple[str, str]] = set()
        for task in value:
            key = (task.name, task.metric)
            if key in seen:
                raise ValueError(f"task {task.name!r} with metric {task.metric!r} is listed twice")
            seen.add(key)
        return value

    @field_validator("limit")
    @classmethod
    def _positive_limit(cls, value: int | float | None) -> int | float | None:
        if value is not None and value <= 0:
            raise ValueError("must be positive (a number of items, or a fraction below 1)")
        return value

    @field_validator("num_fewshot")
    @classmethod
    def _non_negative_fewshot(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError("must be 0 or a positive number of few-shot examples (or left out: each task's own)")
        return value

    @field_validator("shuffle")
    @classmethod
    def _no_shuffle(cls, value: bool) -> bool:
        if value:
            raise ValueError("'shuffle: true' is not available yet in evomerge (upstream never used it); remove it")
        return value


def benchmark_task_names(config: EvolveConfig) -> list[str]:
    """Tasks that upstream refuses without its explicit opt-in flag."""
    return [t.name for t in config.tasks if t.name.startswith(BENCHMARK_PREFIXES) and not t.name.endswith("_train")]


def _model_reference_string(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) <= {"model", "lora", "override_architecture"}:
        if value.get("lora") or value.get("override_architecture"):
            raise ValueError(
                "LoRA and override_architecture model references are not available yet in "
                "evomerge; merge the adapter into its model first and list that folder"
            )
        return _model_reference_string(value["model"])
    raise ValueError(f"a model reference must be a path or Hub id string, got {value!r}")
