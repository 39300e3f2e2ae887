import math

import pytest

from evomerge.core.config import TaskConfiguration
from evomerge.core.fitness import (
    MissingMetricError,
    NonFiniteMetricError,
    scores_for_optimizer,
    too_many_failures,
    weighted_score,
)

TASKS = [TaskConfiguration(name="a"), TaskConfiguration(name="b", weight=-0.5, metric="ppl,none")]


def test_weighted_sum_with_negative_weight_for_lower_is_better():
    results = {"a": {"acc,none": 0.75, "alias": "a"}, "b": {"ppl,none": 4.0}}
    assert weighted_score(results, TASKS) == pytest.approx(0.75 - 2.0)


def test_missing_metric_names_the_task_and_what_it_produces():
    with pytest.raises(MissingMetricError, match=r"task 'b' does not produce metric 'ppl,none'; it produces acc,none"):
        weighted_score({"a": {"acc,none": 1.0}, "b": {"acc,none": 0.1, "acc_stderr,none": 0.0}}, TASKS)
    with pytest.raises(MissingMetricError, match="no results for task 'b'"):
        weighted_score({"a": {"acc,none": 1.0}}, TASKS)


def test_nan_metric_is_a_candidate_failure():
    with pytest.raises(NonFiniteMetricError):
        weighted_score({"a": {"acc,none": math.nan}, "b": {"ppl,none": 1.0}}, TASKS)


def test_failed_candidates_rank_below_the_worst_success():
    assert scores_for_optimizer([0.5, None, 0.2]) == [0.5, pytest.approx(-0.8), 0.2]
    assert scores_for_optimizer([None, None]) == [-1.0, -1.0]


def test_failure_threshold():
    assert not too_many_failures(4, 8, 0.5)
    assert too_many_failures(5, 8, 0.5)
    assert not too_many_failures(0, 0, 0.5)
