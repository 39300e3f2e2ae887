"""What the search is compared with: baselines, held-out re-scoring and paired differences.

Baselines are each parent model (the ``models`` and the ``base_model``) and the uniform merge
(the point CMA-ES starts from), and with ``--fixed-baselines`` one weight per model from a small
grid, the same in every layer group, scored on the search's tasks before the search; they are what
a user would pick by hand. With ``held_out_tasks`` in the config, the baselines and the best few
candidates are scored again on those tasks, which the search never sees: the gap between the
search score and the held-out score is how much of a win is selection noise.

A parent is written by mergekit's ``passthrough`` method (the model itself, in the run's dtype),
so it is scored through exactly the same merge-load-evaluate path as every candidate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from evomerge.core.config import TaskConfiguration
from evomerge.core.records import CandidateRecord, CandidateRequest, EvaluationSettings, candidate_key
from evomerge.core.search_space import SearchSpace

UNIFORM_LABEL = "uniform merge"
PARENT_PREFIX = "parent "
# --fixed-baselines: the settings a user would try by hand before searching, one weight per model,
# the same in every layer group, from this grid (the other parameters at their start values):
# every combination up to FIXED_GRID_MODELS models, beyond that one weight for all of them (the
# grid has 4^n combinations; 64 merges for three models would cost more than a search's start).
FIXED_WEIGHTS = (0.5, 0.75, 1.0, 1.25)
FIXED_GRID_MODELS = 2
FIXED_PREFIX = "fixed weight "
# Baselines and held-out scores carry no CMA-ES generation.
REFERENCE_GENERATION = -1


def parent_models(space: SearchSpace) -> list[str]:
    """The models a user starts from: the base model first, then the others, each once."""
    genome = space.genome
    return list(dict.fromkeys([*([genome.base_model] if genome.base_model else []), *genome.models]))


def fixed_weight_points(space: SearchSpace) -> list[tuple[str, NDArray[np.float64]]]:
    """``(label, search vector)`` of each fixed setting that gives a merge other than the uniform
    one: one weight per model (in the order of ``models``) from ``FIXED_WEIGHTS``, every
    combination for up to ``FIXED_GRID_MODELS`` models, else the same weight for all. None for a
    method whose weights are normalized (equal weights are then the uniform merge whatever their
    value) or that has no weights.

    >>> from evomerge.core.config import GenomeDefinition
    >>> genome = GenomeDefinition(models=["/m/a", "/m/b"], base_model="/m/base",
    ...                           merge_method="task_arithmetic", layer_granularity=2)
    >>> [(label, x.tolist()) for label, x in fixed_weight_points(SearchSpace(genome, 4))][:2]
    [('fixed weight 0.5 / 0.75', [0.5, 0.75, 0.5, 0.75]), ('fixed weight 0.5 / 1', [0.5, 1.0, 0.5, 1.0])]
    """
    if "weight" not in space.parameters_per_model or space.genome.effective_normalize:
        return []
    models = space.weighted_models
    if len(models) <= FIXED_GRID_MODELS:
        settings = list(itertools.product(FIXED_WEIGHTS, repeat=len(models)))
    else:
        settings = [(w,) * len(models) for w in FIXED_WEIGHTS]
    uniform = space.initial_point()
    uniform_merge = space.decode(uniform)
    points = []
    for setting in settings:
        weight_of = dict(zip(models, setting, strict=True))
        x = np.array(
            [
                weight_of[c.model] if c.parameter == "weight" and c.model else v
                for c, v in zip(space.coordinates, uniform, strict=True)
            ]
        )
        if space.decode(x) != uniform_merge:
            points.append((FIXED_PREFIX + " / ".join(f"{w:g}" for w in setting), x))
    return points


def baseline_merges(space: SearchSpace, fixed: bool = False) -> list[tuple[str, dict[str, Any], list[float]]]:
    """``(label, mergekit config, search vector)`` of every baseline: each parent (no vector),
    then the uniform merge, then (``fixed``) the fixed weights of ``fixed_weight_points``."""
    merges: list[tuple[str, dict[str, Any], list[float]]] = [
        (
            f"{PARENT_PREFIX}{space.model_label(model)}",
            {"merge_method": "passthrough", "models": [{"model": model}], "dtype": space.dtype},
            [],
        )
        for model in parent_models(space)
    ]
    uniform = space.initial_point()
    points = [(UNIFORM_LABEL, uniform), *(fixed_weight_points(space) if fixed else [])]
    merges.extend((label, space.decode(x), [float(v) for v in x]) for label, x in points)
    return merges


def baseline_requests(
    space: SearchSpace,
    settings: EvaluationSettings,
    held_out: EvaluationSettings | None,
    recorded: Mapping[str, CandidateRecord],
    fixed: bool = False,
) -> list[CandidateRequest]:
    """Baselines on the search's tasks (and on the held-out tasks) that have no record yet."""
    requests = []
    for index, (label, merge, vector) in enumerate(baseline_merges(space, fixed)):
        search_key = candidate_key(merge, settings)
        variants = [(search_key, False)]
        if held_out is not None:
            variants.append((candidate_key(merge, held_out), True))
        for key, is_held_out in variants:
            if key not in recorded:
                requests.append(
                    CandidateRequest(
                        key=key,
                        generation=REFERENCE_GENERATION,
                        index=index,
                        vector=vector,
                        merge_config=merge,
                        kind="baseline",
                        label=label,
                        held_out=is_held_out,
                        search_key=search_key,
                    )
                )
    return requests


def top_candidates(records: Mapping[str, CandidateRecord], count: int) -> list[CandidateRecord]:
    """The ``count`` best successful candidates scored on every item, best first (ties: earliest
    evaluated)."""
    scored = [
        (r.score, r)
        for r in records.values()
        if r.kind == "candidate" and r.status == "ok" and r.score is not None and r.fully_scored
    ]
    ranked = sorted(scored, key=lambda pair: (-pair[0], pair[1].generation, pair[1].index))
    return [r for _, r in ranked[:count]]


def held_out_requests(
    candidates: Sequence[CandidateRecord],
    held_out: EvaluationSettings,
    recorded: Mapping[str, CandidateRecord],
) -> list[CandidateRequest]:
    """Held-out scoring of these candidates, for those not scored yet."""
    requests = []
    for record in candidates:
        key = candidate_key(record.merge_config, held_out)
        if key not in recorded:
            requests.append(
                CandidateRequest(
                    key=key,
                    generation=record.generation,
                    index=record.index,
                    vector=record.vector,
                    merge_config=record.merge_config,
                    kind="candidate",
                    held_out=True,
                    search_key=record.key,
                )
            )
    return requests


@dataclass(frozen=True)
class PairedDifference:
    """Fitness of A minus fitness of B over the same items, with its standard error."""

    difference: float
    standard_error: float
    items: int

    @property
    def z(self) -> float:
        return self.difference / self.standard_error if self.standard_error > 0 else math.inf


def paired_difference(
    a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], tasks: Sequence[TaskConfiguration]
) -> PairedDifference:
    """Weighted fitness difference of two models scored item by item on the same tasks.

    Per task, the mean of the per-item differences and its standard error (sample standard
    deviation / sqrt(n)); tasks are independent, so the weighted variances add.
    """
    difference, variance, items = 0.0, 0.0, 0
    for task in tasks:
        x, y = np.asarray(a[task.name], dtype=float), np.asarray(b[task.name], dtype=float)
        if x.shape != y.shape or x.size < 2:
            raise ValueError(
                f"task {task.name!r}: per-item scores of unequal length ({x.size} and {y.size}) cannot be paired"
            )
        d = x - y
        difference += task.weight * float(d.mean())
        variance += task.weight**2 * float(d.var(ddof=1)) / d.size
        items += d.size
    return PairedDifference(difference, math.sqrt(variance), items)
