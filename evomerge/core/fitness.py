"""From lm-eval metrics to one score, and what a failed candidate counts as.

Score = sum over configured tasks of ``weight * results[task][metric]`` (higher is better; a
negative weight makes a lower-is-better metric, such as perplexity, count the right way).

Failure policy (documented in the README): a candidate whose merge or evaluation raised, or whose
metric is missing or not finite, is recorded as ``failed`` with its error and is told to CMA-ES as
one point worse than the worst successful candidate of its generation. CMA-ES uses ranks only, so
this ranks it last without inventing a scale. When more than ``max_failed_fraction`` of a
generation fails, the run stops and shows the errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from evomerge.core.config import TaskConfiguration

FAILED_SCORE_MARGIN = 1.0


class MissingMetricError(ValueError):
    """A configured task or metric is absent from lm-eval's results: a configuration error."""


class NonFiniteMetricError(ValueError):
    """A metric came back NaN or infinite: a failure of this candidate."""


def weighted_score(results: Mapping[str, Mapping[str, object]], tasks: Sequence[TaskConfiguration]) -> float:
    total = 0.0
    for task in tasks:
        if task.name not in results:
            raise MissingMetricError(
                f"lm-eval returned no results for task {task.name!r} (it returned "
                f"{', '.join(sorted(results)) or 'nothing'}); check the task name in the config"
            )
        task_results = results[task.name]
        if task.metric not in task_results:
            # Metrics are "name,filter" keys; lm-eval also puts alias, name, sample_len here.
            available = sorted(k for k in task_results if "," in k and "_stderr" not in k)
            raise MissingMetricError(
                f"task {task.name!r} does not produce metric {task.metric!r}; it produces "
                f"{', '.join(available)}. Set 'metric:' of this task to one of those"
            )
        value = task_results[task.metric]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise NonFiniteMetricError(f"task {task.name!r} metric {task.metric!r} is {value!r}, not a finite number")
        total += task.weight * float(value)
    return total


def scores_for_optimizer(scores: Sequence[float | None]) -> list[float]:
    """Scores to tell CMA-ES: failed candidates (``None``) rank below the worst success."""
    successes = [s for s in scores if s is not None]
    floor = (min(successes) if successes else 0.0) - FAILED_SCORE_MARGIN
    return [floor if s is None else s for s in scores]


def too_many_failures(num_failed: int, num_total: int, max_failed_fraction: float) -> bool:
    return num_total > 0 and num_failed / num_total > max_failed_fraction
