"""Scoring a merged model folder with lm-eval's ``hf`` backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from evomerge.backends.lm_eval_tasks import load_task_objects
from evomerge.core.records import EvaluationSettings, RaceResult


@dataclass
class Scores:
    results: dict[str, dict[str, Any]]  # lm-eval's results["results"]
    # Per-item values of each task's configured metric, in document order (``per_item``
    # evaluators only: held-out scoring, where two models are compared item by item).
    item_scores: dict[str, list[float]] = field(default_factory=dict)
    load_seconds: float = 0.0  # loading a model folder (0 for a resident model)
    evaluate_seconds: float = 0.0
    race: RaceResult | None = None  # --racing: how far it was scored


class HFEvaluator:
    """Holds the lm-eval task objects; ``evaluate(path)`` loads a model folder and scores it."""

    def __init__(
        self,
        settings: EvaluationSettings,
        search_paths: list[str],
        include_defaults: bool,
        *,
        device: str = "cpu",
        batch_size: int | str = 1,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        per_item: bool = False,
    ):
        self.settings = settings
        self.per_item = per_item
        self.device = device
        self.batch_size = batch_size
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.task_manager, self.tasks = load_task_objects(settings.task_names, search_paths, include_defaults)

    def load(self, model_path: str):
        """lm-eval's model for a folder."""
        from lm_eval.models.huggingface import HFLM

        return HFLM(
            pretrained=model_path,
            device=self.device,
            batch_size=self.batch_size,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
        )

    def evaluate(self, model_path: str, score: Callable[[Any], Scores] | None = None) -> Scores:
        """Load a model folder and score it (with ``score``: its way, e.g. in racing stages)."""
        started = time.perf_counter()
        lm = self.load(model_path)
        loaded = time.perf_counter()
        try:
            scores = (score or self.score)(lm)
        finally:
            del lm
        scores.load_seconds = loaded - started
        return scores

    def score(self, lm) -> Scores:
        """Score a model lm-eval already holds (a loaded folder, or the resident model)."""
        started = time.perf_counter()
        out = self._simple_evaluate(lm, self.tasks, limit=self.settings.limit, log_samples=self.per_item)
        items = _item_scores(out.get("samples") or {}, self.settings.tasks) if self.per_item else {}
        return Scores(out["results"], items, evaluate_seconds=time.perf_counter() - started)

    def item_counts(self) -> dict[str, int]:
        """How many items each task has (after the config's ``limit``, by lm-eval's own rule)."""
        from lm_eval.evaluator_utils import get_sample_size

        return {
            task.config.task: min(
                len(task.eval_docs), get_sample_size(task, self.settings.limit) or len(task.eval_docs)
            )
            for task in self.tasks
        }

    def score_items(self, lm, items: Mapping[str, Sequence[int]]) -> dict[str, dict[int, dict[str, float]]]:
        """Each listed item's metric values (``name,filter`` -> value), by task and document index."""
        samples = {name: sorted(indices) for name, indices in items.items() if indices}
        if not samples:
            return {}
        # lm-eval walks a task's documents in their own order and names the j-th one it meets
        # samples[j]: the indices must go in sorted (above), or items get each other's names.
        tasks = [task for task in self.tasks if task.config.task in samples]
        out = self._simple_evaluate(lm, tasks, samples=samples, log_samples=True)
        values: dict[str, dict[int, dict[str, float]]] = {name: {} for name in samples}
        for name, rows in (out.get("samples") or {}).items():
            for row in rows:
                metrics = values[name].setdefault(row["doc_id"], {})
                for metric in row["metrics"]:
                    metrics[f"{metric},{row['filter']}"] = float(row[metric])
        return values

    def _simple_evaluate(self, lm, tasks, **selection) -> dict[str, Any]:
        import lm_eval

        with _without_environment_report():
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=self.task_manager,
                num_fewshot=self.settings.num_fewshot,
                apply_chat_template=self.settings.apply_chat_template,
                fewshot_as_multiturn=self.settings.fewshot_as_multiturn and self.settings.apply_chat_template,
                bootstrap_iters=0,  # stderr bootstraps cost seconds and do not enter the fitness
                use_cache=None,  # lm-eval's response cache has no model identity: never use it
                **selection,
            )


@contextmanager
def _without_environment_report() -> Iterator[None]:
    """lm-eval's ``simple_evaluate`` ends by describing the machine for its results file:
    ``torch.utils.collect_env`` (which runs ``pip list`` and probes for GPUs), ``git describe``
    and the parent folder's git commit. That is 1.5 s of CPU per call on a 2-core machine, more
    than scoring a small candidate, on every candidate, for fields evomerge never reads; a search
    skips it. Results and metrics are unchanged (tests/test_slot_worker.py)."""
    import lm_eval.evaluator as evaluator

    saved = {
        name: getattr(evaluator, name) for name in ("add_env_info", "get_git_commit_hash") if hasattr(evaluator, name)
    }
    evaluator.add_env_info = lambda storage: None
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(evaluator, name, function)


def _item_scores(samples: dict[str, list[dict]], tasks) -> dict[str, list[float]]:
    """Each task's configured metric (``name,filter``) per document, in document order. A task
    whose metric has no per-item number (a corpus-level metric such as perplexity) is left out."""
    out = {}
    for task in tasks:
        metric, _, filter_name = task.metric.partition(",")
        rows = sorted(
            (s for s in samples.get(task.name, []) if s.get("filter", "none") == (filter_name or "none")),
            key=lambda s: s["doc_id"],
        )
        values = [s.get(metric) for s in rows]
        if values and all(isinstance(v, (int, float)) for v in values):
            out[task.name] = [float(v) for v in values]
    return out
