"""From suggestions to the candidates that really need an evaluation (pure).

``plan_batch`` decodes each suggestion and keys it by its merge configuration and evaluation
settings: equal merges share one key and one evaluation; keys that already have a record (from
this run, or from an earlier start on the same storage path) are not evaluated again; the
evaluation budget is never exceeded. When the budget ends inside a batch, only the first
candidates (in the order asked) are evaluated and the batch is not complete: the searcher never
hears of it, and the run ends there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from evomerge.core.records import CandidateRecord, CandidateRequest, EvaluationSettings, candidate_key
from evomerge.core.search_space import SearchSpace
from evomerge.core.searcher import Suggestion


@dataclass(frozen=True)
class BatchPlan:
    generation: int
    suggestions: tuple[Suggestion, ...]  # every asked suggestion, in order
    keys: tuple[str, ...]  # the candidate key of each suggestion
    to_evaluate: tuple[CandidateRequest, ...]  # new keys only, within the budget
    complete: bool  # False: the budget ran out, some keys will have no record

    def suggestion_ids_by_key(self) -> dict[str, list[int]]:
        ids: dict[str, list[int]] = {}
        for suggestion, key in zip(self.suggestions, self.keys, strict=True):
            ids.setdefault(key, []).append(suggestion.id)
        return ids


def plan_batch(
    space: SearchSpace,
    settings: EvaluationSettings,
    suggestions: Sequence[Suggestion],
    known_keys: set[str] | frozenset[str] | Mapping[str, object],
    budget_left: int,
) -> BatchPlan:
    if not suggestions:
        raise ValueError("an empty batch: the searcher asked nothing")
    keys: list[str] = []
    requests: list[CandidateRequest] = []
    planned: set[str] = set()
    complete = True
    for suggestion in suggestions:
        merge_config = space.decode(suggestion.vector)
        key = candidate_key(merge_config, settings)
        keys.append(key)
        if key in known_keys or key in planned:
            continue
        if len(requests) >= budget_left:
            complete = False
            continue
        planned.add(key)
        requests.append(
            CandidateRequest(
                key=key,
                generation=suggestion.generation,
                index=suggestion.index,
                vector=list(suggestion.vector),
                merge_config=merge_config,
            )
        )
    return BatchPlan(suggestions[0].generation, tuple(suggestions), tuple(keys), tuple(requests), complete)


def best_record(records: Mapping[str, CandidateRecord] | Sequence[CandidateRecord]) -> CandidateRecord | None:
    """The highest-scoring successful record scored on every item; ties go to the earliest
    evaluated."""
    values = records.values() if isinstance(records, Mapping) else records
    ok = [r for r in values if r.status == "ok" and r.score is not None and r.fully_scored]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.score, -r.generation, -r.index))
