"""What is stored for each candidate, and how a candidate is named.

A candidate's key is a hash of its decoded merge configuration plus the evaluation settings, so
equal work has one key: a key with a record is never evaluated again (within a generation, across
generations, or when a run is started again on the same storage path).
"""

from __future__ import annotations

import hashlib
import json
import traceback
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evomerge.core.config import EvolveConfig, TaskConfiguration
from evomerge.core.fitness import NonFiniteMetricError, weighted_score

RECORD_FORMAT_VERSION = 1


class EvaluationSettings(BaseModel):
    """Everything besides the merge that changes a candidate's score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[TaskConfiguration]
    limit: int | float | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = True
    backend: Literal["hf", "vllm"] = "hf"

    @classmethod
    def from_config(cls, config: EvolveConfig, backend: str = "hf") -> EvaluationSettings:
        return cls(
            tasks=config.tasks,
            limit=config.limit,
            num_fewshot=config.num_fewshot,
            apply_chat_template=config.apply_chat_template,
            fewshot_as_multiturn=config.fewshot_as_multiturn,
            backend=backend,
        )

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(t.name for t in self.tasks))


def canonical_json(value: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, floats as Python's shortest round-trip repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def candidate_key(merge_config: dict[str, Any], settings: EvaluationSettings) -> str:
    payload = canonical_json({"merge": merge_config, "evaluation": settings.model_dump(mode="json")})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def error_summary(exc: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message (at file:line)``: what a record keeps of an error. An
    error that wraps the one raised elsewhere (Ray's ``RayTaskError``, whose own first line is
    only the task's name) is summarized by that one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return error_summary(cause, limit)
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}{where}"[:limit]


# What a record is: a candidate CMA-ES asked for, or a baseline (a parent model, the uniform
# merge) scored for comparison. Only candidates are told to CMA-ES or count in the budget.
RecordKind = Literal["candidate", "baseline"]


class CandidateRequest(BaseModel):
    """One candidate to merge and score: what a slot needs, nothing more."""

    model_config = ConfigDict(frozen=True)

    key: str
    generation: int
    index: int
    vector: list[float]
    merge_config: dict[str, Any]
    kind: RecordKind = "candidate"
    label: str = ""  # a baseline's name ("parent shift_expert", "uniform merge")
    held_out: bool = False  # scored on the config's held_out_tasks instead of its tasks
    search_key: str = ""  # held out: the key of the same merge scored on the search's tasks


class Timings(BaseModel):
    """Seconds spent on one candidate, as measured in the slot that ran it."""

    merge: float = 0.0
    load: float = 0.0
    evaluate: float = 0.0
    total: float = 0.0  # the whole call in the slot, including cleanup
    # From submission by the generation flow to the result back in it: ``round_trip - total``
    # is the orchestration's share (Prefect task run, Ray scheduling, transfers).
    round_trip: float = 0.0


class RaceResult(BaseModel):
    """``--racing``: how far a candidate was scored, in the run's fixed order of items
    (``evomerge.core.racing``). Its record's metrics and score are means over the items scored."""

    items_scored: int
    items_full: int  # what scoring every item would have been
    beaten_by: list[str] = Field(default_factory=list)  # the keys that beat it where it stopped
    # Each task's configured metric per item, in the race order: what later candidates of the
    # generation are compared with.
    item_scores: dict[str, list[float]] = Field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        """Out of its generation's parents with confidence before its last stage."""
        return self.items_scored < self.items_full


class EvaluationOutcome(BaseModel):
    """What a slot returns for a candidate: metrics, or the error that stopped it."""

    status: Literal["ok", "failed"]
    metrics: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    error: str | None = None
    timings: Timings = Field(default_factory=Timings)
    node: str = ""  # host name of the evaluating node
    slot: str = ""
    # Ray node ids of where the merge and the evaluation ran (one host can run several nodes).
    merge_node_id: str = ""
    eval_node_id: str = ""
    attempts: int = 1  # >1: the slot's worker died under it and it was run again
    worker_deaths: list[str] = Field(default_factory=list)  # how each earlier attempt ended
    # Held-out scoring only: each task's metric per item, in lm-eval's document order, so that
    # two models can be compared item by item (paired standard errors).
    item_scores: dict[str, list[float]] = Field(default_factory=dict)
    race: RaceResult | None = None  # --racing: how far it was scored


class CandidateRecord(BaseModel):
    """The stored, write-once record of one evaluated candidate."""

    format_version: int = RECORD_FORMAT_VERSION
    key: str
    generation: int
    index: int
    vector: list[float]
    parameters: dict[str, float]
    merge_config: dict[str, Any]
    status: Literal["ok", "failed"]
    metrics: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    score: float | None = None
    error: str | None = None
    timings: Timings = Field(default_factory=Timings)
    node: str = ""
    slot: str = ""
    merge_node_id: str = ""
    eval_node_id: str = ""
    attempts: int = 1
    worker_deaths: list[str] = Field(default_factory=list)
    finished_at: float = 0.0
    kind: RecordKind = "candidate"
    label: str = ""
    held_out: bool = False
    search_key: str = ""
    item_scores: dict[str, list[float]] = Field(default_factory=dict)
    race: RaceResult | None = None

    @property
    def fully_scored(self) -> bool:
        """Scored on every item (always, unless --racing stopped it early): only such a record
        can be the best, or be scored on the held-out tasks."""
        return self.race is None or not self.race.stopped

    @classmethod
    def from_outcome(
        cls,
        request: CandidateRequest,
        outcome: EvaluationOutcome,
        tasks: list[TaskConfiguration],
        parameters: dict[str, float],
        round_trip: float,
        finished_at: float,
    ) -> CandidateRecord:
        """The record of a scored request; the fitness is computed here, once.

        A NaN or infinite metric fails the candidate; a metric that no task produces is a
        configuration error (``MissingMetricError``), raised for the caller to stop the run.
        """
        score, status, error = None, outcome.status, outcome.error
        if status == "ok":
            try:
                score = weighted_score(outcome.metrics, tasks)
            except NonFiniteMetricError as exc:
                status, error = "failed", str(exc)
        return cls(
            **request.model_dump(include=_FROM_REQUEST),
            **outcome.model_dump(include=_FROM_OUTCOME),
            parameters=parameters,
            status=status,
            score=score,
            error=error,
            timings=outcome.timings.model_copy(update={"round_trip": round_trip}),
            finished_at=finished_at,
        )


# What a record keeps of its request and of its outcome as they are.
_FROM_REQUEST = {"key", "generation", "index", "vector", "merge_config", "kind", "label", "held_out", "search_key"}
_FROM_OUTCOME = {
    "metrics",
    "node",
    "slot",
    "merge_node_id",
    "eval_node_id",
    "attempts",
    "worker_deaths",
    "item_scores",
    "race",
}
