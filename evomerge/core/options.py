"""Run options: every ``mergekit-evolve`` command-line option, plus evomerge's own.

Declared once, here: the CLI's options (``evomerge.cli``) and the ``evolve`` flow's parameters
(hence the deployment's) are generated from this model's fields (name, type, default,
description, and ``cli(...)`` metadata for aliases and flag style). Upstream names keep their
meaning; where upstream had an awkward name, evomerge adds a clearer one and keeps the old one as
an alias on the command line (``--random-seed`` = ``--seed``, ``--force-population-size`` =
``--popsize``).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.core.racing import DEFAULT_CONFIDENCE

Strategy = Literal["pool", "buffered", "serial"]
SearcherName = Literal["cma-es-box", "cma-es-box-mirrored-elitist", "cma-es", "random"]
# Each searcher's initial step size when --sigma0 is not given, as a fraction of a parameter's
# range (a weight's, density's or t's [0, 1]). cma-es keeps upstream's 1/6 (and so the fingerprint
# of every search begun before cma-es-box existed). For cma-es-box, 0.5 closed the largest mean
# share of the uniform-to-optimum gap at 48 evaluations, with the best worst case, of 1/6, 0.3,
# 0.4 and 0.5 (five planted problems, three seeds; README, "Search quality").
DEFAULT_SIGMA0: dict[str, float] = {
    "cma-es-box-mirrored-elitist": 0.5,
    "cma-es-box": 0.5,
    "cma-es": 1 / 6,
    "random": 1 / 6,
}
FlagStyle = Literal["pair", "single"]


def cli(*aliases: str, flag: FlagStyle = "pair", name: str | None = None) -> dict[str, Any]:
    """Command-line metadata of an option: extra spellings, the style of a boolean (``pair``:
    ``--x/--no-x`` as upstream declares most; ``single``: ``--x`` only) and, where upstream
    spelled it otherwise, the option's own name on the command line."""
    return {"cli": {"aliases": list(aliases), "flag": flag, "name": name}}


# Options whose feature is planned but not built: selecting one fails before any work starts.
NOT_AVAILABLE_YET: dict[str, str] = {
    "load_in_8bit": "--load-in-8bit is not available yet; leave it off",
    "load_in_4bit": "--load-in-4bit is not available yet; leave it off",
}


class RunOptions(BaseModel):
    """What the user chose on the command line (or as deployment parameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- mergekit-evolve options, same names and defaults -----------------------------------
    max_fevals: int = Field(100, description="Evaluation budget: candidates scored, at most.")
    vllm: bool = Field(False, description="Score with lm-eval's vllm backend.")
    strategy: Strategy = Field("pool", description="Evaluation scheduling strategy.", json_schema_extra=cli("-s"))
    in_memory: bool = Field(False, description="Merge in memory into a resident model.")
    num_gpus: int | None = Field(None, description="GPU slots to use (default: every GPU of the cluster).")
    merge_cuda: bool = Field(True, description="Merge on the GPU when there is one.")
    trust_remote_code: bool = Field(False, description="Let transformers run code shipped with a model.")
    allow_crimes: bool = Field(False, description="Let mergekit merge unlike architectures.")
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,  # numpy's and pycma's seeds; torch's too
        description="Seed of the searcher and of every random choice of the run.",
        json_schema_extra=cli("--random-seed"),
    )
    batch_size: int | None = Field(None, description="lm-eval batch size (default: auto on GPU, 16 on CPU).")
    sigma0: float | None = Field(
        None,
        description="Initial CMA-ES step size, in units of a parameter's [0, 1] range (default: "
        "0.5 with the box searchers, upstream's 1/6 with cma-es).",
    )
    wandb: bool = Field(False, description="Log to Weights & Biases.")
    wandb_project: str | None = Field(None, description="Weights & Biases project.")
    wandb_entity: str | None = Field(None, description="Weights & Biases entity.")
    task_search_path: list[str] = Field(default_factory=list, description="Folder of lm-eval task YAMLs (repeatable).")
    allow_benchmark_tasks: bool = Field(
        False,
        description="Allow public benchmarks as objectives.",
        json_schema_extra=cli(flag="single", name="--i-understand-the-depths-of-the-evils-i-am-unleashing"),
    )
    save_final_model: bool = Field(True, description="Merge the best config into STORAGE_PATH/final_model at the end.")
    reshard: bool = Field(
        True, description="Accepted for compatibility; changes nothing (mergekit reads shards lazily)."
    )
    timeout: float | None = Field(None, description="Wall-time budget in seconds; no new generation starts after it.")
    load_in_8bit: bool = Field(False, description="Not available yet.", json_schema_extra=cli(flag="single"))
    load_in_4bit: bool = Field(False, description="Not available yet.", json_schema_extra=cli(flag="single"))
    popsize: int | None = Field(
        None,
        description="Population size (default: CMA-ES's 4 + 3 ln n).",
        json_schema_extra=cli("--force-population-size"),
    )

    # --- evomerge's own ---------------------------------------------------------------------
    searcher: SearcherName = Field(
        "cma-es-box",
        description="What proposes candidates: cma-es-box (CMA-ES whose suggestions are clipped "
        "into each parameter's range, so a weight of exactly 0 or a density of exactly 1 is "
        "reachable), cma-es-box-mirrored-elitist (the same with some of each generation's samples "
        "mirrored through the mean and the best so far asked again; better on the benchmark's "
        "24-parameter problem, not on the small ones), cma-es (0.2's and upstream's: unbounded, "
        "decoded with abs and clip), or random (uniform in the same ranges, a baseline).",
    )
    ray_address: str | None = Field(None, description="Existing Ray cluster to use (default: start a local one).")
    cpu_slots: int | None = Field(
        None, description="Evaluation slots on a machine without GPUs (default: one per CPU)."
    )
    max_failed_fraction: float = Field(
        0.5, description="Stop the run when more than this fraction of a generation fails."
    )
    slot_start_timeout: float = Field(
        # Placing a slot includes starting its worker (torch, lm-eval's tasks, with --in-memory
        # the sources and the resident model): on a 2-core machine at load 8 that took over
        # 120 s, and a run that gives up here loses its whole start.
        600.0,
        description="Seconds to wait for Ray to place and start the evaluation slots.",
    )
    candidate_timeout: float = Field(
        3600.0,
        description="Seconds one candidate's merge and evaluation may take; past it the candidate "
        "is failed and its slot's worker restarted.",
    )
    generations_per_run: int | None = Field(
        None,
        description="Generations this run evaluates before it stops cleanly; the same command "
        "(or the next scheduled flow run) continues the search.",
    )
    worker_retries: int = Field(
        2, description="Times a candidate is retried when its slot's worker process dies under it."
    )
    barrier_free: bool = Field(
        False,
        description="Never let a slot wait for the end of a generation: while a generation's last "
        "candidates run, idle slots evaluate candidates of the next one, drawn ahead from the "
        "current distribution (one evaluate flow run for the whole search instead of one per "
        "generation).",
    )
    retry_failed: bool = Field(
        False,
        description="Evaluate again the candidates (and baselines) whose records say they failed, "
        "after their cause was fixed (a broken model file, a task): their records are moved to "
        "quarantine/, and the checkpoints from the first generation that told a failure are set "
        "aside, so the search goes on from there with the new scores.",
        json_schema_extra=cli(flag="single"),
    )
    racing: bool = Field(
        False,
        description="Score each candidate in stages (1/8, 1/4, 1/2, then all of each task's items, in one "
        "random order shared by every candidate) and stop one as soon as enough candidates of its "
        "generation beat it on the same items with --racing-confidence that it cannot be among the "
        "generation's parents; it is told to the searcher with its score on the items it scored. "
        "Needs tasks whose metric is a mean over items.",
        json_schema_extra=cli(flag="single"),
    )
    racing_confidence: float = Field(
        DEFAULT_CONFIDENCE,
        description="With --racing: the one-sided confidence that another candidate is better on the "
        "same items (paired) before it counts against a candidate.",
    )
    max_items: int | None = Field(
        None,
        description="With --racing: a second budget, in items scored over the whole search (each task "
        "item one candidate scored); no new candidate starts once it is spent.",
    )
    baselines: bool = Field(
        True,
        description="Score each parent model and the uniform merge before the search (not counted in --max-fevals).",
    )
    fixed_baselines: bool = Field(
        False,
        description="With --baselines: also score one weight per model, the same in every layer group, "
        "from 0.5, 0.75, 1.0, 1.25 (every combination for up to two models, else the same weight for "
        "all; methods whose weights are not normalized, e.g. task_arithmetic): the fixed settings a "
        "user would try by hand.",
    )
    held_out_top: int = Field(
        3,
        description="With held_out_tasks in the config: how many of the best candidates are "
        "scored on them at the end (besides the baselines).",
    )

    @field_validator("max_fevals")
    @classmethod
    def _positive_budget(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 evaluation")
        return value

    @model_validator(mode="before")
    @classmethod
    def _searcher_sigma0(cls, values: Any) -> Any:
        """An unset --sigma0 is the searcher's own default (an explicit one is the user's)."""
        if isinstance(values, dict) and values.get("sigma0") is None:
            searcher = values.get("searcher") or cls.model_fields["searcher"].default
            values = {**values, "sigma0": DEFAULT_SIGMA0.get(searcher, 1 / 6)}
        return values

    @field_validator("sigma0")
    @classmethod
    def _positive_sigma(cls, value: float | None) -> float | None:
        if value is None or not 0 < value < float("inf"):
            raise ValueError("must be a positive, finite step size, e.g. 0.1667")
        return value

    @field_validator("popsize")
    @classmethod
    def _popsize_at_least_two(cls, value: int | None) -> int | None:
        if value is not None and value < 2:
            raise ValueError("must be at least 2 (CMA-ES ranks candidates against each other)")
        return value

    @field_validator("batch_size", "num_gpus", "cpu_slots", "generations_per_run", "held_out_top", "max_items")
    @classmethod
    def _positive_count(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("worker_retries")
    @classmethod
    def _retries(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value

    @field_validator("timeout", "candidate_timeout", "slot_start_timeout")
    @classmethod
    def _positive_timeout(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError("must be a positive number of seconds")
        return value

    @field_validator("racing_confidence")
    @classmethod
    def _confidence(cls, value: float) -> float:
        if not 0.5 <= value < 1:
            raise ValueError("must be at least 0.5 and below 1, e.g. 0.95")
        return value

    @field_validator("max_failed_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError("must be between 0 and 1")
        return value

    @model_validator(mode="after")
    def _exclusive_quantization(self) -> RunOptions:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("choose one of --load-in-8bit and --load-in-4bit, not both")
        if self.max_items is not None and not self.racing:
            raise ValueError("--max-items is a budget of --racing runs; add --racing, or use --max-fevals alone")
        if self.in_memory and self.strategy != "pool":
            raise ValueError(
                f"--in-memory merges inside the slot that scores the candidate (--strategy pool); "
                f"--strategy {self.strategy} merges in separate tasks through disk. Choose one"
            )
        return self

    def unavailable_features(self) -> list[str]:
        """Messages for every chosen option whose feature is not built yet."""
        chosen = [name for name in ("load_in_8bit", "load_in_4bit") if getattr(self, name)]
        return [NOT_AVAILABLE_YET[name] for name in chosen]


def option_defaults() -> dict[str, Any]:
    """Every option's default, as the flow and the CLI show it (a list option: None)."""
    return {
        name: None if field.default_factory is not None else field.default
        for name, field in RunOptions.model_fields.items()
    }


def option_parameters() -> list[inspect.Parameter]:
    """The options as keyword parameters (the evolve flow's signature, hence the deployment's
    parameter schema)."""
    return [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=RunOptions.model_fields[name].annotation
        )
        for name, default in option_defaults().items()
    ]


def options_from_parameters(values: dict[str, Any]) -> dict[str, Any]:
    """Flow or CLI values -> RunOptions input: a list option given as None (or an empty tuple,
    from a repeatable CLI option) means "none given"."""
    return {
        k: (list(v) if isinstance(v, (list, tuple)) else v)
        for k, v in values.items()
        if not (v is None and RunOptions.model_fields[k].default_factory is not None)
    }
