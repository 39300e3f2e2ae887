"""Scoring a merged model folder with lm-eval's ``hf`` backend."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from evomerge.backends.lm_eval_tasks import load_task_objects
from evomerge.core.records import EvaluationSettings


@dataclass
class Scores:
    results: dict[str, dict[str, Any]]  # lm-eval's results["results"]
    # Per-item values of each task's configured metric, in document order (``per_item``
    # evaluators only: held-out scoring, where two models are compared item by item).
    item_scores: dict[str, list[float]] = field(default_factory=dict)
    load_seconds: float = 0.0  # loading a model folder (0 for a resident model)
    evaluate_seconds: float = 0.0


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

    def evaluate(self, model_path: str) -> Scores:
        """Load a model folder and score it."""
        from lm_eval.models.huggingface import HFLM

        started = time.perf_counter()
        lm = HFLM(
            pretrained=model_path,
            device=self.device,
            batch_size=self.batch_size,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
        )
        loaded = time.perf_counter()
        try:
            scores = self.score(lm)
        finally:
            del lm
        scores.load_seconds = loaded - started
        return scores

    def score(self, lm) -> Scores:
        """Score a model lm-eval already holds (a loaded folder, or the resident model)."""
        import lm_eval

        started = time.perf_counter()
        with _without_environment_report():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=self.tasks,
                task_manager=self.task_manager,
                limit=self.settings.limit,
                num_fewshot=self.settings.num_fewshot,
                apply_chat_template=self.settings.apply_chat_template,
                fewshot_as_multiturn=self.settings.fewshot_as_multiturn and self.settings.apply_chat_template,
                log_samples=self.per_item,
                bootstrap_iters=0,  # stderr bootstraps cost seconds and do not enter the fitness
                use_cache=None,  # lm-eval's response cache has no model identity: never use it
            )
        items = _item_scores(out.get("samples") or {}, self.settings.tasks) if self.per_item else {}
        return Scores(out["results"], items, evaluate_seconds=time.perf_counter() - started)


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
