"""The bookkeeping of one generation, between ``ask`` and ``tell`` (pure).

``plan_generation`` turns asked vectors into the candidates that really need an evaluation:
equal merges share one key and one evaluation; keys that already have a record (from this run,
or from an earlier start on the same storage path) are not evaluated again; the evaluation
budget is never exceeded. When the budget ends inside a generation, only the first candidates
(in the order asked) are evaluated and the generation is not told to CMA-ES: the run ends there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from evomerge.core.fitness import scores_for_optimizer
from evomerge.core.records import CandidateRecord, CandidateRequest, EvaluationSettings, candidate_key
from evomerge.core.search_space import SearchSpace


@dataclass(frozen=True)
class GenerationPlan:
    generation: int
    vectors: np.ndarray  # every asked vector, in order
    keys: tuple[str, ...]  # the key of each asked vector
    to_evaluate: tuple[CandidateRequest, ...]  # new keys only, within the budget
    complete: bool  # False: the budget ran out, some keys will have no record

    def scores(self, records: Mapping[str, CandidateRecord]) -> list[float]:
        """One score per asked vector, failures replaced by the documented penalty."""
        if not self.complete:
            raise ValueError("an incomplete generation cannot be told to the optimizer")
        return scores_for_optimizer([records[k].score for k in self.keys])


def plan_generation(
    space: SearchSpace,
    settings: EvaluationSettings,
    generation: int,
    vectors: np.ndarray,
    known_keys: set[str] | frozenset[str],
    budget_left: int,
) -> GenerationPlan:
    keys: list[str] = []
    requests: list[CandidateRequest] = []
    planned: set[str] = set()
    complete = True
    for index, x in enumerate(vectors):
        merge_config = space.decode(x)
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
                generation=generation,
                index=index,
                vector=[float(v) for v in x],
                merge_config=merge_config,
            )
        )
    return GenerationPlan(generation, np.asarray(vectors), tuple(keys), tuple(requests), complete)


def best_record(records: Mapping[str, CandidateRecord] | list[CandidateRecord]) -> CandidateRecord | None:
    """The highest-scoring successful record; ties go to the earliest evaluated."""
    values = records.values() if isinstance(records, Mapping) else records
    ok = [r for r in values if r.status == "ok" and r.score is not None]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.score, -r.generation, -r.index))
