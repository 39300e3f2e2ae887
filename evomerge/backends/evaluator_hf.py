"""Scoring a merged model folder with lm-eval's ``hf`` backend."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from evomerge.backends.lm_eval_tasks import load_task_objects
from evomerge.core.records import EvaluationSettings


@dataclass
class EvaluationResult:
    results: dict[str, dict[str, Any]]  # lm-eval's results["results"]
    load_seconds: float
    evaluate_seconds: float


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
    ):
        self.settings = settings
        self.device = device
        self.batch_size = batch_size
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.task_manager, self.tasks = load_task_objects(
            settings.task_names, search_paths, include_defaults
        )

    def evaluate(self, model_path: str) -> EvaluationResult:
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
            results = self.score(lm)
        finally:
            del lm
        return EvaluationResult(results, loaded - started, time.perf_counter() - loaded)

    def score(self, lm) -> dict[str, dict[str, Any]]:
        import lm_eval

        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=self.tasks,
            task_manager=self.task_manager,
            limit=self.settings.limit,
            num_fewshot=self.settings.num_fewshot,
            apply_chat_template=self.settings.apply_chat_template,
            fewshot_as_multiturn=self.settings.fewshot_as_multiturn
            and self.settings.apply_chat_template,
            log_samples=False,
            bootstrap_iters=0,  # stderr bootstraps cost seconds and do not enter the fitness
            use_cache=None,  # lm-eval's response cache has no model identity: never use it
        )
        return out["results"]
