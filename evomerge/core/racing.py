"""Racing evaluation (``--racing``): score a candidate in stages and stop the hopeless ones.

Each task's items are scored in one fixed random order, the same for every candidate of the run
(seeded by the run's seed), so two candidates that scored their first ``m`` items scored the same
items and can be compared item by item (paired). A candidate is scored in stages of 1/8, 1/4, 1/2
and all of each task's items; after each stage but the last it is compared, on the items both
scored, with the candidates of its generation whose results are already in: recorded ones, and
those still running on other slots, which publish their scores after each stage. When at least ``mu`` of
them (the searcher's number of parents: CMA-ES keeps the best ``mu`` of a generation) are better
on the same items with the stated confidence, the candidate cannot be among the generation's
``mu`` best with that confidence: it stops, and its score on the items it has scored (the same
weighted sum of means, over fewer items) is what the searcher is told.

"Better with confidence ``c``": the paired difference of the weighted scores over the shared
items, ``D = sum_t w_t mean_i (other_ti - candidate_ti)``, exceeds ``z_c`` standard errors
(``z_c`` the standard normal's ``c`` quantile; the standard error from each task's per-item
differences). A one-sided test per comparison; nothing is corrected for the number of stages or
comparisons, which is why the default confidence is high.

Racing needs metrics that are means over items (accuracy, exact match, the examples' ``score``):
a stage's mean over its items is then part of the full mean, and the full score of a candidate
that finishes equals its unraced score.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np

from evomerge.core.config import TaskConfiguration

# The share of each task's items scored by the end of each stage.
STAGES: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1.0)
DEFAULT_CONFIDENCE = 0.95
MIN_ITEMS_TO_COMPARE = 2  # a standard error needs two differences

ItemScores = Mapping[str, Sequence[float]]  # task -> the configured metric per item, in race order


def item_order(num_items: int, seed: int, task_name: str) -> list[int]:
    """The order in which every candidate of a run scores one task's items (document indices)."""
    task_seed = int.from_bytes(hashlib.sha256(task_name.encode()).digest()[:4], "little")
    return [int(i) for i in np.random.default_rng([seed, task_seed]).permutation(num_items)]


def stage_end(num_items: int, stage: int) -> int:
    """How many of a task's items are scored by the end of ``stage`` (all of them by the last).

    >>> [stage_end(200, s) for s in range(len(STAGES))]
    [25, 50, 100, 200]
    >>> [stage_end(3, s) for s in range(len(STAGES))]
    [1, 1, 2, 3]
    """
    return min(num_items, max(1, math.ceil(num_items * STAGES[stage])))


def is_better(other: ItemScores, candidate: ItemScores, tasks: Sequence[TaskConfiguration], z: float) -> bool:
    """Whether ``other`` beats ``candidate`` on the items both scored (the first ones of the race
    order: another candidate still running may have scored fewer), by more than ``z`` paired
    standard errors. False when they share fewer than two items of a task."""
    difference, variance = 0.0, 0.0
    for task in tasks:
        scored = min(len(candidate[task.name]), len(other.get(task.name, ())))
        if scored < MIN_ITEMS_TO_COMPARE:
            return False
        diffs = np.asarray(other[task.name][:scored], dtype=float) - np.asarray(
            candidate[task.name][:scored], dtype=float
        )
        difference += task.weight * float(diffs.mean())
        variance += task.weight**2 * float(diffs.var(ddof=1)) / scored
    return difference > z * math.sqrt(variance)


def outraced_by(
    candidate: ItemScores,
    others: Mapping[str, ItemScores],
    tasks: Sequence[TaskConfiguration],
    mu: int,
    confidence: float = DEFAULT_CONFIDENCE,
) -> list[str]:
    """The keys of the ``others`` that beat ``candidate`` with ``confidence`` when at least ``mu``
    do (the candidate stops), else an empty list (it goes on)."""
    z = NormalDist().inv_cdf(confidence)
    better = [key for key, items in others.items() if is_better(items, candidate, tasks, z)]
    return sorted(better) if len(better) >= mu else []
