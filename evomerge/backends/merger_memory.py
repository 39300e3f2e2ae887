"""In-memory merges into a resident model, with mergekit's own planner and kernels.

``InMemoryMerger`` loads every source model's safetensors once, keeps the tensors resident (on the
CPU or a GPU), and for each candidate computes the merged tensors from the same configuration dict
that ``mergekit.merge.run_merge`` would get, writing them in place into a model that stays loaded
(``param.data.copy_``), so an lm-eval ``HFLM`` wrapping that model object scores the new merge::

    merger = InMemoryMerger.from_config(config)          # once per slot
    model = LlamaForCausalLM.from_pretrained(base_path)  # the resident model, any of the sources
    stats = merger.merge_into(config, model, seed=0)     # per candidate; no disk I/O
    merger.merge_into(other_config, model, seed=0)       # overwrites every tensor again

What is mergekit's and what is ours. mergekit plans the merge (``MergePlanner.plan_to_disk``:
slices, filters, gradients, parameter resolution, the tensors of each layer, optional tensors) and
merges each tensor (the planned ``ExecuteMergeMethodTask``, which calls the method's kernel from
``mergekit.merge_methods``); nothing of either is re-implemented here. What ``run_merge`` would then
do with files, this module does with resident tensors: it reads each planned input from the
resident sources (the ``LoadTensor`` step: the same name resolution, the cast to the config's
``dtype``), hands them to the planned task, casts the result to ``out_dtype`` (``SaveTensor``) and
copies it into the resident model. So the merge equals ``run_merge``'s bit for bit for every
deterministic method, when both compute on the same kind of device (tested tensor by tensor on the
CPU for every searchable method; CPU and GPU kernels can differ in the last bit).

Random methods (dare_ties, dare_linear, della, della_linear) draw from torch's global generator, as
in mergekit. ``run_merge`` seeds it once (``MergeOptions.random_seed``, through transformers'
``set_seed``) and then merges the tensors in its executor's order, which sorts them by their input
tensors' names (``LoadTensor.group_label``). ``merge_into(..., seed=s)`` seeds torch the same way
and merges in the same order, inside ``torch.random.fork_rng`` (the caller's generator state is left
as it was), so an in-memory merge draws exactly what ``run_merge`` with ``random_seed=s`` draws: the
random methods are bit-identical too (tested).

Refused with a ``ValueError`` naming the method, option or tensor, before anything is written:
``tokenizer_source`` / ``tokenizer`` (vocabulary surgery), LoRA references, models without
safetensors weights, tensors mergekit would have to convert from another checkpoint layout, models
the merger has not loaded, and any mismatch between the merge's tensors and the resident model's
(a name, a shape, a tensor the merge would not write, two merged values for one tied tensor). An
error inside a kernel (e.g. a non-floating buffer that differs between sources) can leave the model
partly written, which the next successful merge repairs since every merge writes every tensor. An
optional tensor that no source stores (``lm_head`` of a model with tied embeddings) is not written:
the resident model's tied ``lm_head`` is the merged ``embed_tokens``, as after a reload.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Exact conversions: a wider float holds every value of a narrower one, so casting a widened copy
# to any dtype gives the same result as casting the original.
_WIDENINGS = {
    (torch.float16, torch.float32),
    (torch.float16, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float64),
    (torch.float32, torch.float64),
}


@dataclass(frozen=True)
class MergeStats:
    """What one merge moved: resident bytes read, model bytes written, wall time."""

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float

    @property
    def read_bytes_per_second(self) -> float:
        return self.bytes_read / self.seconds if self.seconds > 0 else float("inf")

    @property
    def written_bytes_per_second(self) -> float:
        return self.bytes_written / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Job:
    """One output tensor: mergekit's planned merge task and where its inputs are resident."""

    name: str
    task: Any  # mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask
    # (ModelReference, checkpoint tensor name, dtype LoadTensor casts it to) per input
    inputs: tuple[tuple[Any, str, torch.dtype | None], ...]
    out_dtype: torch.dtype | None
    shape: tuple[int, ...]

    @property
    def order(self) -> str:
        """run_merge's executor runs merges sorted by this (GatherTensors.group_label)."""
        return max(name for _, name, _ in self.inputs)


class InMemoryMerger:
    """Merges resident source tensors straight into a resident model's parameters.

    ``models`` are the source model folders (absolute paths, as the decoded configurations name
    them). ``dtype`` is the dtype the sources are kept in (default: as stored); keep them either as
    stored or in the merge configuration's ``dtype``, or widened (bf16 -> float32), so that the
    merge reads exactly the values mergekit reads.
    """

    def __init__(
        self,
        models: Sequence[str],
        *,
        base_model: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
    ):
        from mergekit.common import ModelReference
        from mergekit.options import MergeOptions

        self.device = torch.device(device)
        self.dtype = _as_dtype(dtype)
        self.trust_remote_code = trust_remote_code
        self._options = MergeOptions(trust_remote_code=trust_remote_code, quiet=True)
        references = [ModelReference.model_validate(m) for m in models]
        if base_model is not None:
            references.append(ModelReference.model_validate(base_model))
        self.models = tuple(dict.fromkeys(references))
        # keyed by str(ModelReference)
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._native: dict[str, dict[str, torch.dtype]] = {}
        for model in self.models:
            self._load(model)
        self._structures: dict[str, tuple[Any, Any]] = {}  # see _plan

    @classmethod
    def from_config(
        cls,
        merge_config: Mapping[str, Any],
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> InMemoryMerger:
        """A merger for every model ``merge_config`` names (``dtype``: default the config's)."""
        from mergekit.config import MergeConfiguration

        parsed = MergeConfiguration.model_validate(copy.deepcopy(dict(merge_config)))
        base = str(parsed.base_model) if parsed.base_model else None
        models = [str(m) for m in parsed.referenced_models() if m != parsed.base_model]
        merger = cls(
            sorted(models),
            base_model=base,
            device=device,
            dtype=dtype if dtype is not None else parsed.dtype,
            trust_remote_code=trust_remote_code,
        )
        merger._plan(merge_config)  # refuse now what every candidate would be refused
        return merger

    # --- public ----------------------------------------------------------------------------
    def merge_into(
        self, merge_config: Mapping[str, Any], model: torch.nn.Module, seed: int | None = None
    ) -> MergeStats:
        """Compute every tensor of the merge and copy it into ``model``'s parameters in place.

        ``seed``: the random methods draw what ``run_merge`` with ``random_seed=seed`` draws
        (``None``: from torch's generator as it is, as ``run_merge`` without a seed). Raises
        ``ValueError`` before writing anything when the merge does not cover ``model`` exactly.
        """
        started = time.perf_counter()
        jobs = self._plan(merge_config)
        targets = self._targets(model, jobs)
        read = written = 0
        for job, tensor, nbytes in self._run(jobs, seed):
            target = targets[job.name]
            target.data.copy_(tensor)
            read += nbytes
            written += target.numel() * target.element_size()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return MergeStats(len(jobs), read, written, time.perf_counter() - started)

    def merged_tensors(self, merge_config: Mapping[str, Any], seed: int | None = None) -> dict[str, torch.Tensor]:
        """The merge as a state dict: the tensors ``run_merge`` would write, dtypes included."""
        return dict(self.merge_stream(merge_config, seed)[1])

    def merge_stream(
        self, merge_config: Mapping[str, Any], seed: int | None = None
    ) -> tuple[frozenset[str], Iterator[tuple[str, torch.Tensor]]]:
        """The names of the tensors the merge writes (planned, nothing computed yet), and the
        tensors ``(name, tensor)`` computed one at a time as the iterator is read: for a consumer
        that loads them somewhere else (a vLLM engine) without holding a whole merged copy."""
        jobs = self._plan(merge_config)
        return frozenset(job.name for job in jobs), ((job.name, tensor) for job, tensor, _ in self._run(jobs, seed))

    def stored_names(self, model: str) -> frozenset[str]:
        """The tensor names a loaded source model's safetensors hold."""
        from mergekit.common import ModelReference

        return frozenset(self._native[str(ModelReference.model_validate(model))])

    # --- loading ---------------------------------------------------------------------------
    def _load(self, model) -> None:
        from safetensors.torch import load_file

        if model.lora is not None:
            raise ValueError(f"{model}: LoRA references are not supported in memory; merge the adapter first")
        path = model.model.path
        if not os.path.isdir(path):
            raise ValueError(f"{model}: not a local model folder (the in-memory merger reads local safetensors)")
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(single):  # mergekit's ShardedTensorIndex prefers the same name
            files = [single]
        elif os.path.exists(index):
            with open(index) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            files = [os.path.join(path, s) for s in shards]
        else:
            raise ValueError(
                f"{model}: no model.safetensors (or its index) in {path}; the in-memory merger reads safetensors only"
            )
        tensors: dict[str, torch.Tensor] = {}
        native: dict[str, torch.dtype] = {}
        for file in files:
            for name, tensor in load_file(file, device="cpu").items():
                native[name] = tensor.dtype
                if self.dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(self.dtype)
                tensors[name] = tensor.to(self.device)
        self._tensors[str(model)] = tensors
        self._native[str(model)] = native

    # --- planning: mergekit's own ----------------------------------------------------------
    def _plan(self, merge_config: Mapping[str, Any]) -> list[_Job]:
        from mergekit.architecture import get_architecture_info
        from mergekit.common import dtype_from_name
        from mergekit.config import MergeConfiguration
        from mergekit.io.tasks import SaveTensor
        from mergekit.merge import _model_out_config
        from mergekit.plan import MergePlanner

        config = MergeConfiguration.model_validate(copy.deepcopy(dict(merge_config)))
        if config.tokenizer_source is not None or config.tokenizer is not None:
            raise ValueError(
                "tokenizer_source/tokenizer rebuild the vocabulary (embedding surgery), which the "
                "in-memory merger does not do; use the on-disk merger"
            )
        for model in config.referenced_models():
            if str(model) not in self._native:
                raise ValueError(f"merge configuration names {model}, which this in-memory merger has not loaded")
        try:
            # Both read every model's config.json from disk (transformers' AutoConfig, about 4 ms
            # each) and depend on the models and layer ranges only: once per search, not per merge.
            structure = json.dumps(_without_parameters(dict(merge_config)), sort_keys=True, default=str)
            if structure not in self._structures:
                architecture = get_architecture_info(config, self._options)
                self._structures[structure] = (
                    architecture,
                    _model_out_config(config, architecture, self.trust_remote_code),
                )
            architecture, out_model_config = self._structures[structure]
            planner = MergePlanner(config, architecture, options=self._options, out_model_config=out_model_config)
            saves = [t for t in planner.plan_to_disk(out_path="") if isinstance(t, SaveTensor)]
        except (RuntimeError, TypeError) as error:  # mergekit's planning errors, as ValueError
            raise ValueError(f"merge_method {config.merge_method}: {error}") from error
        return [self._job(save, dtype_from_name(save.dtype)) for save in saves]

    def _job(self, save, out_dtype: torch.dtype | None) -> _Job:
        """Where the inputs of one planned tensor are resident (LoadTensor's name resolution)."""
        from mergekit.common import dtype_from_name

        task = save.tensor_task
        gather = task.gather_tensors
        inputs = []
        for model, weight in gather.weight_info.items():
            stored = self._native[str(model)]
            names = (weight.name, *(weight.aliases or ()), *(weight.tied_names or ()))
            name = next((n for n in names if n in stored), None)
            if name is not None:
                inputs.append((model, name, dtype_from_name(weight.force_dtype or gather.dtype)))
            elif not weight.optional:
                raise ValueError(
                    f"tensor {weight.name} is not in {model} under that name; mergekit would "
                    "convert it from another checkpoint layout, which the in-memory merger does not"
                )
        if not inputs:  # mergekit plans an optional tensor only when some source stores it
            raise ValueError(f"no source stores {save.tensor_name}")
        shapes = {tuple(self._tensors[str(m)][n].shape) for m, n, _ in inputs}
        if len(shapes) != 1:
            raise ValueError(f"tensor size mismatch for {save.tensor_name}: {sorted(shapes)}")
        return _Job(
            name=save.tensor_name,
            task=task,
            inputs=tuple(inputs),
            out_dtype=out_dtype,
            shape=shapes.pop(),
        )

    def _targets(self, model: torch.nn.Module, jobs: list[_Job]) -> dict[str, torch.Tensor]:
        """The resident tensor for each job, after checking that the merge covers the model."""
        state = model.state_dict(keep_vars=True)
        targets: dict[str, torch.Tensor] = {}
        written: set[int] = set()
        for job in jobs:
            target = state.get(job.name)
            if target is None:
                raise ValueError(f"the merge writes {job.name}, which the resident model does not have")
            if tuple(target.shape) != job.shape:
                raise ValueError(
                    f"{job.name}: the merge gives shape {job.shape}, the resident model has {tuple(target.shape)}"
                )
            if id(target) in written:
                # tied weights (e.g. lm_head = embed_tokens): two merged values for one tensor
                raise ValueError(
                    f"{job.name} is tied to another tensor the merge also writes; the in-memory "
                    "merger cannot tell which value a reload would keep"
                )
            written.add(id(target))
            targets[job.name] = target
        missing = [
            name
            for name, tensor in state.items()
            if isinstance(tensor, torch.nn.Parameter) and id(tensor) not in written
        ]
        if missing:
            raise ValueError(
                "the merge does not write these tensors of the resident model (they would keep a "
                f"previous candidate's values): {', '.join(missing[:8])}"
                + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            )
        return targets

    # --- merging: mergekit's kernels -------------------------------------------------------
    def _run(self, jobs: list[_Job], seed: int | None) -> Iterator[tuple[_Job, torch.Tensor, int]]:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(int(seed))  # what transformers' set_seed does for torch
            for job in sorted(jobs, key=lambda j: j.order):
                inputs = {m: self._read(str(m), n, dtype) for m, n, dtype in job.inputs}
                tensor = job.task.execute(tensors=inputs)
                if tensor is None:  # an optional tensor mergekit's policy skips (model_stock)
                    raise ValueError(
                        f"mergekit skips {job.name} in this merge; the in-memory merger cannot "
                        "leave a tensor of the resident model unwritten"
                    )
                if job.out_dtype is not None:
                    tensor = tensor.to(dtype=job.out_dtype)  # mergekit's SaveTensor cast
                yield job, tensor, sum(x.numel() * x.element_size() for x in inputs.values())

    def _read(self, model: str, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor mergekit's LoadTensor would produce (``dtype``: the config's, or None)."""
        stored = self._tensors[model][name]
        native = self._native[model][name]
        wanted = dtype or native
        if stored.dtype == wanted:
            return stored
        if stored.dtype == native or (native, stored.dtype) in _WIDENINGS:
            return stored.to(wanted)
        raise ValueError(
            f"{model}:{name} is kept as {stored.dtype} but stored as {native}, and the merge reads "
            f"it as {wanted}; keep the sources in the merge's dtype ({wanted}) or as stored"
        )


def _without_parameters(value):
    if isinstance(value, dict):
        return {k: _without_parameters(v) for k, v in value.items() if k != "parameters"}
    if isinstance(value, list):
        return [_without_parameters(v) for v in value]
    return value


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from mergekit.common import dtype_from_name

    return dtype_from_name(dtype)
