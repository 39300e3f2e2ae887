"""Scoring a merged model folder with lm-eval's ``vllm`` model type (``--vllm``).

Kept thin on purpose: lm-eval builds the vLLM engine from ``model_args`` and scores through the
same task objects and ``simple_evaluate`` call as the ``hf`` backend (``HFEvaluator.score``).
vLLM needs a CUDA GPU and is not installable on the machines evomerge is developed on: this path
is unit-tested for its arguments only; it has never run against a real vLLM (see the README).
One engine is built per candidate folder and shut down after scoring (a merged folder is a new
model for vLLM); weight updates of a resident engine (``--vllm --in-memory``) are not built.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from evomerge.backends.evaluator_hf import HFEvaluator, Scores

# dtypes lm-eval's VLLM wrapper accepts; anything else lets vLLM read the folder's config.
_VLLM_DTYPES = ("float16", "bfloat16", "float32")


class VLLMEvaluator(HFEvaluator):
    def __init__(self, *args: Any, seed: int = 0, gpu_memory_utilization: float = 0.85, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.gpu_memory_utilization = gpu_memory_utilization

    def model_args(self, model_path: str) -> dict[str, Any]:
        """The keyword arguments of ``lm_eval.models.vllm_causallms.VLLM`` for one folder."""
        return {
            "pretrained": model_path,
            "dtype": self.dtype if self.dtype in _VLLM_DTYPES else "auto",
            "trust_remote_code": self.trust_remote_code,
            "batch_size": "auto" if self.batch_size in (None, "auto") else self.batch_size,
            "seed": self.seed,
            "tensor_parallel_size": 1,  # one slot is one GPU
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }

    def load(self, model_path: str):
        from lm_eval.models.vllm_causallms import VLLM

        return VLLM(**self.model_args(model_path))

    def evaluate(self, model_path: str, score: Callable[[Any], Scores] | None = None) -> Scores:
        try:
            return super().evaluate(model_path, score)
        finally:
            gc.collect()  # the engine holds the GPU until collected; the next candidate needs it
