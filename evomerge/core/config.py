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

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

MergeMethod = Literal["linear", "task_arithmetic", "ties", "dare_ties", "slerp"]
MERGE_METHODS: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")
METHODS_NEEDING_BASE = ("task_arithmetic", "ties", "dare_ties")

# Upstream refuses these as objectives unless --i-understand-the-depths-of-the-evils-i-am-unleashing
# is given: optimising a merge directly against a public benchmark's test set games it.
BENCHMARK_PREFIXES = (
    "mmlu", "hendrycks", "agieval", "gsm8k", "hellaswag", "winogrande", "arc_", "ai2_arc",
    "truthfulqa", "bigbench", "piqa", "openbookqa", "leaderboard",
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
    def _models_as_strings(cls, value):
        # mergekit accepts {model: ..., lora: ...} mappings too; evomerge keeps the string form.
        if isinstance(value, list):
            return [_model_reference_string(v) for v in value]
        return value

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_as_string(cls, value):
        return None if value is None else _model_reference_string(value)

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in MERGE_METHODS:
            raise ValueError(
                f"unknown merge method {value!r}; use one of: {', '.join(MERGE_METHODS)}"
            )
        return value

    @field_validator("layer_granularity")
    @classmethod
    def _non_negative_granularity(cls, value: int) -> int:
        if value < 0:
            raise ValueError(
                "must be 0 (one group for all layers) or a positive number of layers per group"
            )
        return value

    @model_validator(mode="after")
    def _method_requirements(self) -> GenomeDefinition:
        if not self.models:
            raise ValueError("genome.models is empty; list the fine-tuned models to merge")
        if len(set(self.models)) != len(self.models):
            raise ValueError("genome.models lists a model twice; list each model once")
        if self.merge_method in METHODS_NEEDING_BASE and self.base_model is None:
            raise ValueError(
                f"merge_method {self.merge_method!r} needs genome.base_model (the model the "
                "fine-tunes were trained from); add it, or use merge_method 'linear'"
            )
        if self.merge_method == "slerp":
            sources = list(self.models)
            if self.base_model is not None and self.base_model not in sources:
                sources.append(self.base_model)
            if len(sources) != 2:
                raise ValueError(
                    f"merge_method 'slerp' interpolates exactly two models, got {len(sources)} "
                    f"({', '.join(sources)}); list two models, or use 'linear' or 'task_arithmetic'"
                )
            if self.smooth or self.filters:
                raise ValueError("merge_method 'slerp' supports neither 'smooth' nor 'filters'")
        weighted = [m for m in self.models if m != self.base_model]
        if self.merge_method != "slerp" and not weighted:
            raise ValueError(
                "genome.models holds only the base model; list the fine-tuned models to merge"
            )
        return self

    @property
    def effective_normalize(self) -> bool:
        """Upstream default: normalize for linear, ties and dare_ties; not for task_arithmetic."""
        if self.normalize is not None:
            return self.normalize
        return self.merge_method in ("linear", "ties", "dare_ties")


class TaskConfiguration(_Strict):
    """One lm-eval task of the fitness. A bare string is shorthand for ``{name: ...}``."""

    name: str
    weight: float = 1.0
    metric: str = "acc,none"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
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
    def _some_tasks(cls, value: list[TaskConfiguration] | None, info) -> list[TaskConfiguration] | None:
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
    def _positive_limit(cls, value):
        if value is not None and value <= 0:
            raise ValueError("must be positive (a number of items, or a fraction below 1)")
        return value

    @field_validator("shuffle")
    @classmethod
    def _no_shuffle(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "'shuffle: true' is not available yet in evomerge (upstream never used it); remove it"
            )
        return value


def benchmark_task_names(config: EvolveConfig) -> list[str]:
    """Tasks that upstream refuses without its explicit opt-in flag."""
    return [
        t.name
        for t in config.tasks
        if t.name.startswith(BENCHMARK_PREFIXES) and not t.name.endswith("_train")
    ]


def _model_reference_string(value) -> str:
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
