"""``--in-memory``: one model kept loaded in a slot, merged into in place for every candidate.

The slot loads the sources once (``InMemoryMerger``), loads one model of the same architecture as
the resident model (the donor mergekit would take its config and tokenizer from: the base model,
else the first model), and wraps it once in lm-eval's ``HFLM``. Each candidate is then mergekit's
planner and kernels run on resident tensors and written into the resident parameters, and scoring
reads them through the same ``HFLM``: no merged folder, no reload. The merge equals mergekit's
``run_merge`` bit for bit for every searchable method, the random ones seeded with the run's seed
as the on-disk merger seeds ``run_merge`` (tests/test_merger_memory.py), so a candidate scores the
same in memory as on disk. With ``--vllm`` the resident model is a vLLM engine instead
(``evomerge.backends.resident_engine``).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from evomerge.core.run_spec import RunSpec


class Resident(Protocol):
    """What a slot needs of a resident model: lm-eval's model object, and a merge into it."""

    lm: Any

    def merge(self, merge_config: dict[str, Any]) -> float: ...

    def close(self) -> None: ...


def resident_sources(spec: RunSpec, device: str):
    """The in-memory merger of the run's sources, and the donor folder: the model a merged
    folder would take its config and tokenizer from (the base model, else the first model)."""
    from mergekit.config import MergeConfiguration

    from evomerge.backends.merger_memory import InMemoryMerger

    space = spec.search_space()
    template = space.decode(space.initial_point())
    parsed = MergeConfiguration.model_validate(template)
    donor = str(parsed.base_model or parsed.referenced_models()[0])
    merger = InMemoryMerger.from_config(template, device=device, trust_remote_code=spec.options.trust_remote_code)
    return merger, donor


class ResidentModel:
    def __init__(self, spec: RunSpec, *, device: str, batch_size: int | str):
        import torch
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        trust = spec.options.trust_remote_code
        self.seed = spec.options.seed
        self.merger, donor = resident_sources(spec, device)
        dtype = getattr(torch, spec.models.dtype) if spec.models.dtype != "auto" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(donor, dtype=dtype, trust_remote_code=trust)
        self.model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(donor, trust_remote_code=trust)
        self.lm = HFLM(pretrained=self.model, tokenizer=tokenizer, batch_size=batch_size, device=device)

    def merge(self, merge_config: dict[str, Any]) -> float:
        """Write the candidate's weights into the resident model; returns the seconds it took."""
        started = time.perf_counter()
        self.merger.merge_into(merge_config, self.model, seed=self.seed)
        return time.perf_counter() - started

    def close(self) -> None:
        """Nothing outlives the process: the model is plain memory."""
