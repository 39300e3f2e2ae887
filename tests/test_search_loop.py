"""Between ask and tell: dedupe, skip recorded keys, never exceed the budget."""

import numpy as np
import pytest

from evomerge.core.config import GenomeDefinition, TaskConfiguration
from evomerge.core.records import CandidateRecord, EvaluationSettings
from evomerge.core.search_loop import best_record, plan_generation
from evomerge.core.search_space import SearchSpace

SPACE = SearchSpace(GenomeDefinition(models=["/a", "/b"], merge_method="linear"), 4)
SETTINGS = EvaluationSettings(tasks=[TaskConfiguration(name="t")])


def record(key, score, generation=0, index=0, status="ok"):
    return CandidateRecord(
        key=key, generation=generation, index=index, vector=[0.0, 0.0], parameters={},
        merge_config={}, status=status, score=score,
    )


def test_equal_merges_share_one_key_and_one_evaluation():
    # |x| decoding: (0.3, -0.2) and (-0.3, 0.2) are the same merge
    X = np.array([[0.3, -0.2], [-0.3, 0.2], [0.5, 0.5]])
    plan = plan_generation(SPACE, SETTINGS, 0, X, frozenset(), budget_left=10)
    assert plan.keys[0] == plan.keys[1] != plan.keys[2]
    assert [r.index for r in plan.to_evaluate] == [0, 2]
    assert plan.complete


def test_recorded_keys_are_not_evaluated_again():
    X = np.array([[0.3, 0.2], [0.5, 0.5]])
    first = plan_generation(SPACE, SETTINGS, 0, X, frozenset(), budget_left=10)
    again = plan_generation(SPACE, SETTINGS, 0, X, frozenset({first.keys[0]}), budget_left=10)
    assert [r.index for r in again.to_evaluate] == [1]


def test_budget_is_never_exceeded_and_cuts_the_generation():
    X = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    plan = plan_generation(SPACE, SETTINGS, 4, X, frozenset(), budget_left=2)
    assert [r.index for r in plan.to_evaluate] == [0, 1]
    assert not plan.complete
    with pytest.raises(ValueError, match="incomplete"):
        plan.scores({})


def test_key_depends_on_evaluation_settings():
    X = np.array([[0.3, 0.2]])
    other = EvaluationSettings(tasks=[TaskConfiguration(name="t")], limit=10)
    a = plan_generation(SPACE, SETTINGS, 0, X, frozenset(), 1).keys[0]
    b = plan_generation(SPACE, other, 0, X, frozenset(), 1).keys[0]
    assert a != b


def test_scores_follow_asked_order_with_failure_penalty():
    X = np.array([[0.1, 0.2], [0.3, 0.4], [0.1, 0.2]])
    plan = plan_generation(SPACE, SETTINGS, 0, X, frozenset(), 10)
    k0, k1 = plan.keys[0], plan.keys[1]
    records = {k0: record(k0, None, status="failed"), k1: record(k1, 0.25)}
    assert plan.scores(records) == [pytest.approx(-0.75), 0.25, pytest.approx(-0.75)]


def test_best_record_prefers_score_then_earliest():
    records = [record("a", 0.5, 1, 0), record("b", 0.7, 2, 3), record("c", 0.7, 1, 5), record("d", None, 0, 0, "failed")]
    assert best_record(records).key == "c"
    assert best_record([record("d", None, status="failed")]) is None
