"""Between ask and tell: dedupe, skip recorded keys, never exceed the budget."""

import pytest

from evomerge.core.batch_plan import best_record, plan_batch
from evomerge.core.config import GenomeDefinition, TaskConfiguration
from evomerge.core.records import CandidateRecord, EvaluationSettings
from evomerge.core.search_space import SearchSpace
from evomerge.core.searcher import Suggestion

SPACE = SearchSpace(GenomeDefinition(models=["/a", "/b"], merge_method="linear"), 4)
SETTINGS = EvaluationSettings(tasks=[TaskConfiguration(name="t")])


def suggestions(vectors, generation=0):
    return [Suggestion(10 * generation + i, generation, i, tuple(v)) for i, v in enumerate(vectors)]


def record(key, score, generation=0, index=0, status="ok"):
    return CandidateRecord(
        key=key,
        generation=generation,
        index=index,
        vector=[0.0, 0.0],
        parameters={},
        merge_config={},
        status=status,
        score=score,
    )


def test_equal_merges_share_one_key_and_one_evaluation():
    # |x| decoding: (0.3, -0.2) and (-0.3, 0.2) are the same merge
    plan = plan_batch(SPACE, SETTINGS, suggestions([[0.3, -0.2], [-0.3, 0.2], [0.5, 0.5]]), frozenset(), budget_left=10)
    assert plan.keys[0] == plan.keys[1] != plan.keys[2]
    assert [r.index for r in plan.to_evaluate] == [0, 2]
    assert plan.suggestion_ids_by_key() == {plan.keys[0]: [0, 1], plan.keys[2]: [2]}
    assert plan.complete


def test_recorded_keys_are_not_evaluated_again():
    batch = suggestions([[0.3, 0.2], [0.5, 0.5]])
    first = plan_batch(SPACE, SETTINGS, batch, frozenset(), budget_left=10)
    again = plan_batch(SPACE, SETTINGS, batch, {first.keys[0]: record(first.keys[0], 0.1)}, budget_left=10)
    assert [r.index for r in again.to_evaluate] == [1]


def test_budget_is_never_exceeded_and_leaves_the_batch_incomplete():
    plan = plan_batch(SPACE, SETTINGS, suggestions([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], 4), frozenset(), budget_left=2)
    assert [r.index for r in plan.to_evaluate] == [0, 1] and [r.generation for r in plan.to_evaluate] == [4, 4]
    assert not plan.complete


def test_key_depends_on_evaluation_settings():
    batch = suggestions([[0.3, 0.2]])
    other = EvaluationSettings(tasks=[TaskConfiguration(name="t")], limit=10)
    assert (
        plan_batch(SPACE, SETTINGS, batch, frozenset(), 1).keys != plan_batch(SPACE, other, batch, frozenset(), 1).keys
    )


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="asked nothing"):
        plan_batch(SPACE, SETTINGS, [], frozenset(), 1)


def test_best_record_prefers_score_then_earliest():
    records = [
        record("a", 0.5, 1, 0),
        record("b", 0.7, 2, 3),
        record("c", 0.7, 1, 5),
        record("d", None, 0, 0, "failed"),
    ]
    assert best_record(records).key == "c"
    assert best_record([record("d", None, status="failed")]) is None
