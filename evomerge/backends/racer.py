"""``--racing`` in a slot: score one loaded candidate stage by stage, and stop it when its
generation's results already in say it cannot be among the parents (``evomerge.core.racing``).

The model stays loaded between stages (the resident model in memory, the merged folder's model on
disk), so a stage costs only its items. After each stage the slot publishes the candidate's
per-item scores so far on the run's board (``evomerge.backends.race_board``), and after each stage
but the last it compares them with the generation's others there: the candidates already scored,
and those still running on other slots.
"""

from __future__ import annotations

import time
from typing import Any

from evomerge.backends.evaluator_hf import HFEvaluator, Scores
from evomerge.backends.race_board import RaceBoard, RayRaceBoard
from evomerge.core.racing import STAGES, item_order, outraced_by, stage_end
from evomerge.core.records import CandidateRequest, RaceResult
from evomerge.core.run_spec import RunSpec


class RacingNotPossibleError(ValueError):
    """A task cannot be raced (a group, or a metric that is not a mean over items)."""


class Racer:
    def __init__(self, spec: RunSpec, evaluator: HFEvaluator, board: RaceBoard | RayRaceBoard):
        self.evaluator = evaluator
        self.board = board
        self.tasks = spec.evaluation.tasks
        self.mu = max(1, spec.popsize() // 2)  # CMA-ES's parents (pycma's default mu)
        self.confidence = spec.options.racing_confidence
        counts = evaluator.item_counts()
        _check_raceable(evaluator, counts, self.tasks)
        self.order = {name: item_order(counts[name], spec.options.seed, name) for name in counts}

    @property
    def items_full(self) -> int:
        return sum(len(order) for order in self.order.values())

    def race(self, request: CandidateRequest, lm: Any) -> Scores:
        """Score ``lm`` in stages; the metrics are means over the items scored."""
        started = time.perf_counter()
        values: dict[str, dict[int, dict[str, float]]] = {name: {} for name in self.order}
        beaten_by: list[str] = []
        for stage in range(len(STAGES)):
            wanted = {
                name: order[len(values[name]) : stage_end(len(order), stage)] for name, order in self.order.items()
            }
            for name, scored in self.evaluator.score_items(lm, wanted).items():
                values[name].update(scored)
            so_far = self._item_scores(values)
            self.board.publish(request.generation, request.key, so_far)
            if stage == len(STAGES) - 1:
                break
            others = self.board.others(request.generation, request.key)
            beaten_by = outraced_by(so_far, others, self.tasks, self.mu, self.confidence)
            if beaten_by:
                break
        race = RaceResult(
            items_scored=sum(len(v) for v in values.values()),
            items_full=self.items_full,
            beaten_by=beaten_by,
            item_scores=self._item_scores(values),
        )
        return Scores(_means(values), race=race, evaluate_seconds=time.perf_counter() - started)

    def _item_scores(self, values: dict[str, dict[int, dict[str, float]]]) -> dict[str, list[float]]:
        """Each configured task's metric per item scored, in the race order."""
        return {
            task.name: [
                values[task.name][doc][task.metric] for doc in self.order[task.name] if doc in values[task.name]
            ]
            for task in self.tasks
        }


def _means(values: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``mean`` aggregation of each metric over the items scored, summed in document
    order as lm-eval sums them: a candidate scored on every item gets lm-eval's own numbers."""
    out: dict[str, dict[str, float]] = {}
    for name, by_doc in values.items():
        metrics: dict[str, list[float]] = {}
        for doc in sorted(by_doc):
            for metric, value in by_doc[doc].items():
                metrics.setdefault(metric, []).append(value)
        out[name] = {metric: sum(v) / len(v) for metric, v in metrics.items()}
    return out


def _check_raceable(evaluator: HFEvaluator, counts: dict[str, int], tasks) -> None:
    from lm_eval.api.metrics import mean

    by_name = {task.config.task: task for task in evaluator.tasks if hasattr(task, "aggregation")}
    for configured in tasks:
        task = by_name.get(configured.name)
        if task is None or configured.name not in counts:
            raise RacingNotPossibleError(
                f"--racing scores each task's items in stages, and {configured.name!r} is a group or "
                "tag of tasks: name its tasks in the config instead, or leave --racing off"
            )
        metric = configured.metric.partition(",")[0]
        aggregation = task.aggregation().get(metric)
        if aggregation is not mean:
            raise RacingNotPossibleError(
                f"--racing needs metrics that are means over items; task {configured.name!r} aggregates "
                f"{metric!r} with {getattr(aggregation, '__name__', aggregation)!r}: leave --racing off"
            )
