"""``--vllm --in-memory``: one vLLM engine per slot, started once, its weights swapped in place.

The slot starts lm-eval's ``VLLM`` model once, on the donor folder (the model a merged folder
would take its config and tokenizer from), so the engine, its KV cache and lm-eval's wrapper are
built once per slot, not once per candidate. For each candidate the in-memory merger computes the
merged tensors one at a time from the resident sources (``InMemoryMerger.merge_stream``, the same
tensors ``run_merge`` writes) and vLLM's own ``reload_weights`` loads them into the running engine
as it would load a checkpoint (its weight loaders, then the CPU build's repacking for oneDNN).
Then the prefix cache is emptied: no reload does that, and a cached block of a shared prompt
prefix would otherwise give the next candidate the previous weights' keys and values.

What the engine holds after a swap is what a fresh engine on the merged folder holds, so a
candidate scores the same here as with ``--vllm`` on disk and with ``hf``
(tests/test_vllm_in_memory.py). The engine runs in the slot's own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which the swap needs: tensors are handed to it, not sent),
so no engine process can outlive its slot. The sources stay on the CPU: on a GPU the engine owns
its ``gpu_memory_utilization`` share and the merged tensors are copied in by its loaders.

Everything a slot scores goes through this engine, baselines too (a parent is a ``passthrough``
merge of one source): a second engine started and shut down in the same process would tear down
the parallel groups this one runs in (found running it).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from evomerge.backends.evaluator_vllm import VLLMEvaluator
from evomerge.backends.merger_memory import InMemoryMerger
from evomerge.backends.resident_model import resident_sources
from evomerge.core.run_spec import RunSpec


class ResidentEngine:
    """An engine on ``donor`` (a folder ``merger`` has loaded), scored through ``evaluator``'s
    lm-eval model; ``seed``: the random methods' draws, as the on-disk merger's."""

    def __init__(self, merger: InMemoryMerger, donor: str, evaluator: VLLMEvaluator, seed: int):
        # Tensors go to the engine by reference, which only an in-process engine can take.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.merger, self.seed = merger, seed
        self._loaded = merger.stored_names(donor)  # what the engine read from the donor
        self.lm = evaluator.load(donor)
        self.engine = self.lm.model  # vllm.LLM

    @classmethod
    def for_run(cls, spec: RunSpec, evaluator: VLLMEvaluator) -> ResidentEngine:
        merger, donor = resident_sources(spec, "cpu")
        return cls(merger, donor, evaluator, spec.options.seed)

    def merge(self, merge_config: dict[str, Any]) -> float:
        """Load the candidate's merged weights into the engine; returns the seconds it took."""
        started = time.perf_counter()
        names, tensors = self.merger.merge_stream(merge_config, seed=self.seed)
        if names != self._loaded:
            # A tensor the merge does not write would keep a previous candidate's values.
            unwritten, extra = sorted(self._loaded - names), sorted(names - self._loaded)
            raise ValueError(
                "the merge's tensors are not the resident engine's: "
                + (f"not written: {', '.join(unwritten[:8])}; " if unwritten else "")
                + (f"not in the engine: {', '.join(extra[:8])}" if extra else "")
            )
        self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
        self.engine.reset_prefix_cache()
        return time.perf_counter() - started

    def close(self) -> None:
        """Shut the engine down (its KV cache, and any process or thread it started)."""
        engine, self.engine, self.lm = self.engine, None, None
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            del engine
            gc.collect()
