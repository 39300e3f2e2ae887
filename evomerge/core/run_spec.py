"""RunSpec: the validated, frozen description of a run that travels through every layer."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict

from evomerge.core.config import EvolveConfig
from evomerge.core.options import RunOptions
from evomerge.core.racing import DEFAULT_CONFIDENCE
from evomerge.core.records import EvaluationSettings, canonical_json
from evomerge.core.search_space import SearchSpace, default_popsize

# Options that do not change which candidates are asked or how they score: a run started again
# with other values of these continues the same search.
_NOT_IN_FINGERPRINT = {
    "max_fevals",
    "timeout",
    "batch_size",
    "num_gpus",
    "cpu_slots",
    "ray_address",
    "wandb",
    "wandb_project",
    "wandb_entity",
    "save_final_model",
    "slot_start_timeout",
    "max_failed_fraction",
    "reshard",
    "merge_cuda",
    "strategy",
    "in_memory",
    "task_search_path",
    "candidate_timeout",
    "worker_retries",
    "generations_per_run",
    # How many vectors were drawn ahead is in each checkpoint (``ahead``): a search may switch.
    "barrier_free",
    "retry_failed",  # replaces failed records by new ones of the same search
    "baselines",
    "fixed_baselines",
    "held_out_top",
    "max_items",  # a budget, like max_fevals
}
# Options added after evomerge 0.1 that shape the search, with the value that is 0.1's behaviour:
# in the fingerprint only when they differ from it, so that a storage path written before they
# existed keeps its fingerprint (and a search begun by 0.2 or older is never continued by
# another searcher).
_IN_FINGERPRINT_UNLESS: dict[str, Any] = {
    "searcher": "cma-es",
    "racing": False,
    "racing_confidence": DEFAULT_CONFIDENCE,  # a search without --racing never reads it
}


class ModelFacts(BaseModel):
    """What the source models share, read from their configs before any work starts."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    num_layers: int
    dtype: str


class RunSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    config: EvolveConfig
    options: RunOptions
    storage_path: str
    models: ModelFacts
    # The driver's current directory: lm-eval resolves relative data_files against the cwd, so
    # every slot works from here (a path every node sees, on a cluster).
    working_dir: str = "."
    # Whether some task is one of lm-eval's built-in ones: if not, every slot skips indexing
    # the thousands of built-in task files.
    include_default_tasks: bool = True

    @property
    def evaluation(self) -> EvaluationSettings:
        return EvaluationSettings.from_config(self.config, "vllm" if self.options.vllm else "hf")

    @property
    def held_out_evaluation(self) -> EvaluationSettings | None:
        """The held-out tasks' settings (same lm-eval settings), or None without held-out tasks."""
        if not self.config.held_out_tasks:
            return None
        return self.evaluation.model_copy(update={"tasks": self.config.held_out_tasks})

    def evaluation_for(self, held_out: bool) -> EvaluationSettings:
        if not held_out:
            return self.evaluation
        held_out_evaluation = self.held_out_evaluation
        if held_out_evaluation is None:
            raise ValueError("a held-out evaluation was asked for, but the config has no held_out_tasks")
        return held_out_evaluation

    def search_space(self) -> SearchSpace:
        return SearchSpace(self.config.genome, self.models.num_layers, dtype=self.models.dtype)

    def popsize(self) -> int:
        return self.options.popsize or default_popsize(self.search_space().dimension)

    def fingerprint(self) -> str:
        """Identifies the search: same fingerprint, same trajectory for the same scores."""
        shaping = self.options.model_dump(mode="json", exclude=_NOT_IN_FINGERPRINT | set(_IN_FINGERPRINT_UNLESS))
        shaping.update(
            {
                name: getattr(self.options, name)
                for name, legacy in _IN_FINGERPRINT_UNLESS.items()
                if getattr(self.options, name) != legacy
            }
        )
        payload = canonical_json(
            # Held-out tasks never reach CMA-ES: adding some continues the same search.
            {
                "config": self.config.model_dump(mode="json", exclude={"held_out_tasks"}),
                "options": shaping,
                "models": self.models.model_dump(mode="json"),
            }
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
