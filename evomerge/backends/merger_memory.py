"""In-memory merges into a resident model, with mergekit 0.1.5's numerics.

``InMemoryMerger`` loads every source model's safetensors once, keeps the tensors resident (on the
CPU or a GPU), and for each candidate computes the merged tensors from the same configuration dict
that ``mergekit.merge.run_merge`` would get, writing them in place into a model that stays loaded
(``param.data.copy_``), so an lm-eval ``HFLM`` wrapping that model object scores the new merge::

    merger = InMemoryMerger.from_config(config)          # once per slot
    model = LlamaForCausalLM.from_pretrained(base_path)  # the resident model, any of the sources
    stats = merger.merge_into(config, model)             # per candidate; no disk I/O
    merger.merge_into(other_config, model)               # overwrites every tensor again

What is taken from mergekit and what is not. mergekit parses the configuration
(``MergeConfiguration``), resolves parameters (filters, gradients, defaults, precedence; its own
``ConfigReader`` and ``resolve_parameters``) and names the tensors of each layer (its architecture
definitions); those are reused so that the recipe means exactly what it means to ``mergekit-yaml``.
The tensor arithmetic is re-implemented here, op for op after mergekit 0.1.5's
``merge_methods/{linear,generalized_task_arithmetic,slerp}.py`` and ``sparsify.py`` (same dtypes
for intermediate values, same order of operations, same leading batch axis), because it has to read
resident tensors and cached task vectors instead of a lazy loader. For linear, task_arithmetic,
ties and slerp the results are bit-identical to ``run_merge``'s, float32 and bfloat16 alike, when
both compute on the same kind of device: on the CPU (the tests check every tensor with
``torch.equal``), and on a GPU against ``run_merge`` with ``cuda=True`` (checked once on an H200).
CPU and GPU kernels can differ in the last bit (slerp did). dare_ties draws its random drops from a
``torch.Generator`` seeded per merge, so it matches mergekit in distribution (same kept fraction,
same L1 rescaling) but not draw for draw.

mergekit details matched (each checked against ``run_merge`` output by the tests):

- Tensors outside the layer blocks take the parameters of the first slice (``pre_weights``, the
  token embeddings) or of the last slice (``post_weights``: final norm, ``lm_head``), and both are
  evaluated at gradient position t = 0: with gradient parameters (``smooth``), the embeddings *and*
  the final norm and lm_head take the gradient's first value.
- Inside a slice of n layers, layer i is evaluated at t = i / (n - 1) (t = 1 for a one-layer slice);
  a gradient list interpolates linearly between its neighbouring entries.
- A filter ``{filter: s, value: v}`` applies when ``s`` is a substring of the tensor name; the first
  matching entry wins and an entry without a filter matches everything.
- Source tensors are cast to the configuration's ``dtype`` before any arithmetic (mergekit's
  ``LoadTensor``); linear and slerp then compute in float32 (float64 for float64 inputs) and cast
  back; the task-arithmetic family computes in the input dtype; ``out_dtype`` casts the result.
- ties keeps the ``int(density * numel)`` largest task-vector entries (at least one), elects a sign
  per entry from the weighted sum, and with ``normalize`` divides by the sum of the weights whose
  entries agree with the elected sign (1 where none does). dare_ties keeps each entry with
  probability ``density`` and rescales the survivors so the task vector keeps its L1 norm
  (``rescale``, on by default), which is a factor of about 1 / density.
- slerp works on each tensor flattened to one vector, in 1M-element chunks, and falls back to linear
  interpolation when the normalised vectors' dot product exceeds 0.9995 in absolute value.
- ``int8_mask`` only changes the dtype of ties' sign mask inside mergekit; the mask is compared
  elementwise with ``==`` either way, so it has no observable effect and is accepted as is.
- ``lambda`` and ``rescale`` (task-arithmetic family) are honoured; ``residual_weight`` and
  ``chat_template`` do not change weights in mergekit and are ignored here too.
- An optional tensor that no source stores (``lm_head`` of a model with tied embeddings) is not
  written: the resident model's tied ``lm_head`` is the merged ``embed_tokens``, as after a reload.
  Buffers the merge does not produce (model constants) are left as they are.

Refused with a ``ValueError`` naming the method, option or tensor (rather than approximated):
methods other than the five above, ``tokenizer_source`` / ``tokenizer`` (vocabulary surgery),
``modules:`` configurations, LoRA references, models without safetensors weights, architectures
mergekit has no definition for or with more than one module, tensors mergekit would have to convert
from another checkpoint layout, optional tensors present in only some sources, and any mismatch
between the merge's tensors and the resident model's (a name, a shape, a tensor the merge would not
write). All checks run before the first write, so a refused merge leaves the model untouched; an
error during the arithmetic itself can leave it partly written, which the next successful merge
repairs since every merge writes every tensor.
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

SUPPORTED_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")


@dataclass(frozen=True)
class _TaskArithmeticVariant:
    consensus: bool  # TIES sign election (mergekit's ConsensusMethod.sum)
    sparsification: str | None  # "magnitude" (ties), "random" (dare) or None


# The configured instances of mergekit's GeneralizedTaskArithmeticMerge that we reproduce; their
# parameter defaults (normalize, rescale, lambda, ...) are read from mergekit's own method specs.
_TASK_ARITHMETIC = {
    "task_arithmetic": _TaskArithmeticVariant(consensus=False, sparsification=None),
    "ties": _TaskArithmeticVariant(consensus=True, sparsification="magnitude"),
    "dare_ties": _TaskArithmeticVariant(consensus=True, sparsification="random"),
}

# mergekit.merge_methods.slerp: full-precision scratch is bounded per chunk of a flattened tensor.
_SLERP_CHUNK_ELEMENTS = 1024 * 1024
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


@dataclass
class _Job:
    """One output tensor: where its inputs come from and the parameters it merges with."""

    name: str
    models: tuple[str, ...]  # str(ModelReference) per loaded input, in mergekit's model order
    tensor_names: tuple[str, ...]  # the checkpoint tensor read from each of those models
    base: str | None
    load_dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    shared: dict[str, Any]
    per_input: dict[str, dict[str, Any]]
    shape: tuple[int, ...]


class InMemoryMerger:
    """Merges resident source tensors straight into a resident model's parameters.

    ``models`` are the source model folders (absolute paths, as the decoded configurations name
    them). ``dtype`` is the dtype the sources are kept in (default: as stored); keep them either as
    stored or in the merge configuration's ``dtype``, or widened (bf16 -> float32), so that the
    merge reads exactly the values mergekit reads. ``task_vectors_only`` (with ``base_model``)
    keeps only the base model and the cached task vectors once they are computed: the memory of a
    task-arithmetic-family search is then that of the sources, not twice that.
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

        self.device = torch.device(device)
        self.dtype = _as_dtype(dtype)
        self.trust_remote_code = trust_remote_code
        references = [ModelReference.model_validate(m) for m in models]
        if base_model is not None:
            references.append(ModelReference.model_validate(base_model))
        self.models = tuple(dict.fromkeys(references))
        self.base_model = ModelReference.model_validate(base_model) if base_model else None
        # keyed by str(ModelReference)
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._native: dict[str, dict[str, torch.dtype]] = {}
        self._configs: dict[Any, Any] = {}
        self._deltas: dict[tuple, torch.Tensor] = {}
        self._released: set[str] = set()
        self._layer_cache: dict[tuple[str, int], list] = {}
        arch = None
        for model in self.models:
            self._load(model)
            model_arch = self._architecture(model)
            if arch is not None and model_arch != arch:
                raise ValueError(
                    f"{model} has another architecture than {self.models[0]}; the in-memory "
                    "merger merges models of one architecture (mergekit needs --allow-crimes)"
                )
            arch = model_arch
        if len(arch.modules) != 1:
            raise ValueError(
                f"architecture {arch.architectures} has {len(arch.modules)} modules; the "
                "in-memory merger handles single-module models only"
            )
        self.architecture = arch
        (self._module_name,) = arch.modules

    @classmethod
    def from_config(
        cls,
        merge_config: Mapping[str, Any],
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        task_vectors_only: bool = False,
    ) -> InMemoryMerger:
        """A merger for every model ``merge_config`` names, with its task vectors cached.

        ``dtype`` defaults to the configuration's ``dtype``. With ``task_vectors_only`` (a
        task-arithmetic-family method), the fine-tuned sources are dropped once their task vectors
        are cached; a later configuration must then use the same method family and base model.
        """
        from mergekit.config import MergeConfiguration

        parsed = MergeConfiguration.model_validate(dict(merge_config))
        base = str(parsed.base_model) if parsed.base_model else None
        models = [str(m) for m in parsed.referenced_models() if m != parsed.base_model]
        merger = cls(
            sorted(models),
            base_model=base,
            device=device,
            dtype=dtype if dtype is not None else parsed.dtype,
            trust_remote_code=trust_remote_code,
        )
        merger.prepare(merge_config, release_sources=task_vectors_only)
        return merger

    # --- public ----------------------------------------------------------------------------
    def prepare(self, merge_config: Mapping[str, Any], *, release_sources: bool = False) -> None:
        """Cache the task vectors ``merge_config`` needs (task-arithmetic family; else a check).

        With ``release_sources``, drop the fine-tuned models' own tensors afterwards.
        """
        config, jobs = self._plan(merge_config)
        if config.merge_method not in _TASK_ARITHMETIC:
            if release_sources:
                raise ValueError(
                    f"merge_method {config.merge_method!r} reads the sources themselves; "
                    "only the task-arithmetic family can release them"
                )
            return
        for job in jobs:
            self._task_vectors(job)
        if release_sources:
            for model in map(str, self.models):
                if all(model != job.base for job in jobs):
                    self._tensors.pop(model, None)
                    self._released.add(model)

    def merge_into(
        self, merge_config: Mapping[str, Any], model: torch.nn.Module, seed: int | None = None
    ) -> MergeStats:
        """Compute every tensor of the merge and copy it into ``model``'s parameters in place.

        ``seed`` seeds dare's random drops (a private ``torch.Generator``; ``None``: torch's global
        generator, as mergekit does). Raises ``ValueError`` before writing anything when the merge
        cannot be done exactly or does not cover ``model``.
        """
        started = time.perf_counter()
        config, jobs = self._plan(merge_config)
        targets = self._targets(model, jobs)
        read = written = 0
        with torch.no_grad():
            for job, tensor, nbytes in self._run(config, jobs, seed):
                target = targets[job.name]
                target.data.copy_(tensor)
                read += nbytes
                written += target.numel() * target.element_size()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return MergeStats(len(jobs), read, written, time.perf_counter() - started)

    def merged_tensors(
        self, merge_config: Mapping[str, Any], seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The merge as a state dict: the tensors ``run_merge`` would write, dtypes included."""
        config, jobs = self._plan(merge_config)
        with torch.no_grad():
            return {job.name: tensor for job, tensor, _ in self._run(config, jobs, seed)}

    # --- loading ---------------------------------------------------------------------------
    def _load(self, model) -> None:
        from safetensors.torch import load_file

        if model.lora is not None:
            raise ValueError(
                f"{model}: LoRA references are not supported in memory; merge the adapter first"
            )
        path = model.model.path
        if not os.path.isdir(path):
            raise ValueError(
                f"{model}: not a local model folder (the in-memory merger reads local safetensors)"
            )
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(single) or os.path.exists(index):
            # mergekit's ShardedTensorIndex prefers the same two names, in this order
            if os.path.exists(index):
                with open(index) as fh:
                    shards = sorted(set(json.load(fh)["weight_map"].values()))
                files = [os.path.join(path, s) for s in shards]
            else:
                files = [single]
        else:
            raise ValueError(
                f"{model}: no model.safetensors (or its index) in {path}; the in-memory merger "
                "reads safetensors only"
            )
        tensors: dict[str, torch.Tensor] = {}
        native: dict[str, torch.dtype] = {}
        for file in files:
            for name, tensor in load_file(file, device="cpu").items():
                native[name] = tensor.dtype
                if (
                    self.dtype is not None
                    and tensor.is_floating_point()
                    and tensor.dtype != self.dtype
                ):
                    tensor = tensor.to(self.dtype)
                tensors[name] = tensor.to(self.device)
        self._tensors[str(model)] = tensors
        self._native[str(model)] = native

    def _model_config(self, model):
        if model not in self._configs:
            self._configs[model] = model.config(trust_remote_code=self.trust_remote_code)
        return self._configs[model]

    def _architecture(self, model):
        from mergekit.architecture import arch_info_for_config

        arch = arch_info_for_config(self._model_config(model))
        if arch is None:
            raise ValueError(
                f"{model}: mergekit has no architecture definition for "
                f"{self._model_config(model).architectures}; the in-memory merger needs one"
            )
        return arch

    def _layer_weights(self, model, index: int):
        key = (str(model), index)
        if key not in self._layer_cache:
            self._layer_cache[key] = self._module_arch(self._model_config(model)).layer_weights(
                index=index
            )
        return self._layer_cache[key]

    def _module_arch(self, config):
        from mergekit.architecture import ConfiguredModuleArchitecture

        module = self.architecture.modules[self._module_name]
        return ConfiguredModuleArchitecture(
            info=module.architecture, config=config, weight_prefix=module.weight_prefix
        )

    # --- planning (mirrors mergekit.plan.MergePlanner) -------------------------------------
    def _plan(self, merge_config: Mapping[str, Any]):
        from mergekit import merge_methods
        from mergekit.common import dtype_from_name
        from mergekit.config import (
            ConfigReader,
            InputSliceDefinition,
            MergeConfiguration,
            OutputModuleDefinition,
            OutputSliceDefinition,
        )

        config = MergeConfiguration.model_validate(copy.deepcopy(dict(merge_config)))
        method_name = config.merge_method
        if method_name not in SUPPORTED_METHODS:
            raise ValueError(
                f"merge_method {method_name!r} cannot be merged in memory; use one of "
                f"{', '.join(SUPPORTED_METHODS)} or the on-disk merger"
            )
        if config.tokenizer_source is not None or config.tokenizer is not None:
            raise ValueError(
                "tokenizer_source/tokenizer rebuild the vocabulary (embedding surgery), which the "
                "in-memory merger does not do; use the on-disk merger"
            )
        if config.modules:
            raise ValueError(
                "'modules:' configurations are not supported in memory; use slices or models"
            )
        for model in config.referenced_models():
            if str(model) not in self._native:
                raise ValueError(
                    f"merge configuration names {model}, which this in-memory merger has not loaded"
                )
            if str(model) in self._released and method_name not in _TASK_ARITHMETIC:
                raise ValueError(
                    f"{method_name} reads {model} itself, but its tensors were released "
                    "(task_vectors_only); only task-arithmetic-family merges can use it"
                )
        method = merge_methods.get(method_name)
        spec = method.spec

        if config.models:
            sources = []
            included = False
            for entry in config.models:
                included = included or (
                    config.base_model is not None and entry.model == config.base_model
                )
                n = self._module_arch(self._model_config(entry.model)).num_layers()
                sources.append(
                    InputSliceDefinition(
                        layer_range=(0, n), model=entry.model, parameters=entry.parameters
                    )
                )
            if config.base_model is not None and not included:
                n = self._module_arch(self._model_config(config.base_model)).num_layers()
                sources.append(InputSliceDefinition(layer_range=(0, n), model=config.base_model))
            slices = [OutputSliceDefinition(sources=sources)]
        else:
            slices = list(config.slices)
        module_def = OutputModuleDefinition(slices=slices)
        for i, out_slice in enumerate(slices):
            method.validate_inputs(
                [s.model for s in out_slice.sources],
                out_slice.base_model or config.base_model,
                group_name=f"{self._module_name}.slices[{i}]",
            )

        out_config = copy.deepcopy(
            self._model_config(config.base_model or config.referenced_models()[0])
        )
        out_arch = self._module_arch(out_config)
        total_layers = sum(
            s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices
        )
        if config.slices:
            from mergekit.common import set_config_value

            set_config_value(out_config, out_arch.info.num_layers_config_key(), total_layers)
            out_arch = self._module_arch(out_config)

        dtype = dtype_from_name(config.dtype)
        out_dtype = dtype_from_name(config.out_dtype)
        jobs: list[_Job] = []

        def plan_tensor(weight, weights_in, models, reader) -> None:
            pairs = list(zip(models, weights_in))
            if weight.optional and not any(
                any(n in self._native[str(m)] for n in (w.name, *(w.aliases or ())))
                for m, w in pairs
            ):
                return  # mergekit: "Skipping optional weight"
            shared, per_input = _resolve(spec, weight.name, pairs, reader, reader.base_model)
            # internally models are keyed by their string form (pydantic equality is slow)
            base = str(reader.base_model) if reader.base_model is not None else None
            per_input = {str(m): values for m, values in per_input.items()}
            loaded_models, loaded_names = [], []
            for m, w in pairs:
                m = str(m)
                name = next(
                    (
                        n
                        for n in (w.name, *(w.aliases or ()), *(w.tied_names or ()))
                        if n in self._native[m]
                    ),
                    None,
                )
                if name is None:
                    if not w.optional:
                        raise ValueError(
                            f"tensor {w.name} is not in {m} under that name; mergekit would convert "
                            "it from another checkpoint layout, which the in-memory merger does not do"
                        )
                    continue
                loaded_models.append(m)
                loaded_names.append(name)
            if len(loaded_models) < len(models):
                raise ValueError(
                    f"optional tensor {weight.name} is present in only some sources; mergekit's "
                    "handling of that case is not reproduced in memory"
                )
            method.validate_inputs(loaded_models, base, group_name=weight.name)
            job = _Job(
                name=weight.name,
                models=tuple(loaded_models),
                tensor_names=tuple(loaded_names),
                base=base,
                load_dtype=dtype_from_name(weight.force_dtype) or dtype,
                out_dtype=dtype_from_name(weight.force_dtype) or out_dtype,
                shared=shared,
                per_input=per_input,
                shape=self._shape(loaded_models, loaded_names),
            )
            for m, n in zip(job.models, job.tensor_names):
                if m in self._released and (
                    m == job.base or self._delta_key(job, m, n) not in self._deltas
                ):
                    raise ValueError(
                        f"{job.name}: the task vector of {m} is not cached and its tensors were "
                        "released (task_vectors_only); prepare() with this configuration first"
                    )
            jobs.append(job)

        top = ConfigReader(config=config, t=0, module=module_def)
        first_models = [s.model for s in slices[0].sources]
        for w in out_arch.pre_weights():
            plan_tensor(w, [w] * len(first_models), first_models, top.for_out_slice(slices[0]))
        out_layer = 0
        for out_slice in slices:
            lengths = {s.layer_range[1] - s.layer_range[0] for s in out_slice.sources}
            if len(lengths) != 1:
                raise ValueError("all inputs to a slice must contain the same number of layers")
            (n,) = lengths
            reader = ConfigReader(config=config, slice_out=out_slice, t=0, module=module_def)
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1
                weights_out = out_arch.layer_weights(index=out_layer)
                weights_in = [
                    self._layer_weights(s.model, s.layer_range[0] + offset)
                    for s in out_slice.sources
                ]
                for i, w in enumerate(weights_out):
                    plan_tensor(
                        w,
                        [ws[i] for ws in weights_in],
                        [s.model for s in out_slice.sources],
                        reader.with_t(t),
                    )
                out_layer += 1
        # mergekit pairs the last slice's models with the first slice's weight list (zip truncates)
        last_models = [s.model for s in slices[-1].sources]
        for w in out_arch.post_weights():
            plan_tensor(w, [w] * len(first_models), last_models, top.for_out_slice(slices[-1]))
        return config, jobs

    def _targets(self, model: torch.nn.Module, jobs: list[_Job]) -> dict[str, torch.Tensor]:
        """The resident tensor for each job, after checking that the merge covers the model."""
        state = model.state_dict(keep_vars=True)
        targets: dict[str, torch.Tensor] = {}
        written: set[int] = set()
        for job in jobs:
            target = state.get(job.name)
            if target is None:
                raise ValueError(
                    f"the merge writes {job.name}, which the resident model does not have"
                )
            if tuple(target.shape) != job.shape:
                raise ValueError(
                    f"{job.name}: the merge gives shape {job.shape}, the resident model "
                    f"has {tuple(target.shape)}"
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

    def _shape(self, models, names) -> tuple[int, ...]:
        """The inputs' common shape (mergekit refuses a group whose shapes differ)."""
        shapes = {
            tuple(self._tensors[m][n].shape) if m in self._tensors else self._released_shape(m, n)
            for m, n in zip(models, names)
        }
        shapes.discard(None)
        if len(shapes) != 1:
            raise ValueError(f"tensor size mismatch for {names[0]}: {sorted(shapes)}")
        return shapes.pop()

    def _released_shape(self, model, name: str):
        return next(
            (
                tuple(d.shape)
                for key, d in self._deltas.items()
                if key[2] == model and key[3] == name
            ),
            None,
        )

    # --- reading resident tensors ------------------------------------------------------------
    def _read(self, model, name: str, dtype: torch.dtype | None) -> torch.Tensor:
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

    def _delta_key(self, job: _Job, model, name: str) -> tuple:
        base_name = job.tensor_names[job.models.index(job.base)]
        return (job.base, base_name, model, name, self._compute_dtype(job))

    def _compute_dtype(self, job: _Job) -> torch.dtype:
        """mergekit aligns a group to the promotion of its loaded dtypes (all equal once cast)."""
        if job.load_dtype is not None:
            return job.load_dtype
        dtype = self._native[job.models[0]][job.tensor_names[0]]
        for m, n in zip(job.models[1:], job.tensor_names[1:]):
            dtype = torch.promote_types(dtype, self._native[m][n])
        return dtype

    def _task_vectors(self, job: _Job) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """(base, [source - base for each non-base input], bytes read), deltas cached."""
        dtype = self._compute_dtype(job)
        base_name = job.tensor_names[job.models.index(job.base)]
        base = self._read(job.base, base_name, job.load_dtype).to(dtype)
        nbytes = base.numel() * base.element_size()
        deltas = []
        for m, n in zip(job.models, job.tensor_names):
            if m == job.base:
                continue
            key = self._delta_key(job, m, n)
            delta = self._deltas.get(key)
            if delta is None:
                # generalized_task_arithmetic: delta = entry.tensor - base, in the group's dtype
                delta = self._read(m, n, job.load_dtype).to(dtype) - base
                self._deltas[key] = delta
            deltas.append(delta)
            nbytes += delta.numel() * delta.element_size()
        return base, deltas, nbytes

    # --- merging ---------------------------------------------------------------------------
    def _run(
        self, config, jobs: list[_Job], seed: int | None
    ) -> Iterator[tuple[_Job, torch.Tensor, int]]:
        method = config.merge_method
        generator = None
        if method == "dare_ties" and seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
        for job in jobs:
            tensor, nbytes = self._merge_one(method, job, generator)
            if job.out_dtype is not None:
                tensor = tensor.to(dtype=job.out_dtype)  # mergekit's SaveTensor cast
            yield job, tensor, nbytes

    def _merge_one(self, method: str, job: _Job, generator) -> tuple[torch.Tensor, int]:
        if method in _TASK_ARITHMETIC:
            dtype = self._compute_dtype(job)
            if not all(
                self._native[m][n].is_floating_point for m, n in zip(job.models, job.tensor_names)
            ):
                return self._non_floating(job)
            base, deltas, nbytes = self._task_vectors(job)
            weights = [job.per_input[m]["weight"] for m in job.models if m != job.base]
            densities = [job.per_input[m]["density"] for m in job.models if m != job.base]
            merged = _task_arithmetic(
                base, deltas, weights, densities, _TASK_ARITHMETIC[method], job.shared, generator
            )
            assert merged.dtype == dtype
            return merged, nbytes
        dtype = self._compute_dtype(job)
        inputs = [self._read(m, n, job.load_dtype) for m, n in zip(job.models, job.tensor_names)]
        nbytes = sum(x.numel() * x.element_size() for x in inputs)
        if not all(x.is_floating_point() for x in inputs):
            return self._non_floating(job)
        inputs = [x.to(dtype) for x in inputs]
        if method == "linear":
            weights = [job.per_input[m]["weight"] for m in job.models]
            return _linear(inputs, weights, job.shared["normalize"]), nbytes
        if method == "slerp":
            base_index = job.models.index(job.base)
            return _slerp(job.shared["t"], inputs[base_index], inputs[1 - base_index]), nbytes
        raise ValueError(f"merge_method {method!r} cannot be merged in memory")  # unreachable

    def _non_floating(self, job: _Job) -> tuple[torch.Tensor, int]:
        """mergekit copies a non-floating buffer when every input agrees on it."""
        inputs = [self._read(m, n, job.load_dtype) for m, n in zip(job.models, job.tensor_names)]
        first = inputs[0]
        if any(x.dtype != first.dtype or not torch.equal(x, first) for x in inputs[1:]):
            raise ValueError(f"non-floating tensor {job.name} differs between the sources")
        return first.clone(), sum(x.numel() * x.element_size() for x in inputs)


# --- parameters ---------------------------------------------------------------------------------
def _resolve(spec, tensor_name: str, pairs, reader, base):
    """mergekit.parameter_resolver.resolve_parameters, with its errors as ValueError."""
    from mergekit.parameter_resolver import resolve_parameters

    try:
        return resolve_parameters(
            spec,
            tensor_name=tensor_name,
            inputs={m: w.name for m, w in pairs},
            sources=reader.parameter_sources,
            base_model=base,
            t=reader.t,
        )
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"{spec.name}, tensor {tensor_name}: {error}") from error


# --- arithmetic: op for op after mergekit 0.1.5 -------------------------------------------------
def _linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """merge_methods/linear.py on a batch of one group (leading axis of size 1)."""
    batch = [t.unsqueeze(0) for t in tensors]
    first = batch[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor([weights], dtype=dtype, device=first.device)
    coefficient_shape = (first.shape[0],) + (1,) * (first.ndim - 1)
    if normalize:
        denominator = weight.sum(dim=1).reshape(coefficient_shape)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(batch, weight.unbind(1)):
        result.addcmul_(tensor, coefficient.reshape(coefficient_shape))
    if normalize:
        result.div_(denominator)
    return result.to(first.dtype)[0]


def _slerp(
    t_value: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """merge_methods/slerp.py's ``slerp`` on a batch of one group: the whole tensor is one vector."""
    v0, v1 = v0.unsqueeze(0), v1.unsqueeze(0)
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    t = torch.tensor([t_value], dtype=dtype, device=v0.device)  # batching: a float32 coefficient
    a = v0.reshape(v0.shape[0], -1)
    b = v1.reshape(v1.shape[0], -1)
    t = t.reshape(-1, 1).to(dtype)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)[0]
    chunk = max(1, _SLERP_CHUNK_ELEMENTS // a.shape[0])
    norm_a_parts, norm_b_parts = [], []
    for start in range(0, a.shape[1], chunk):
        x = a[:, start : start + chunk].to(dtype)
        y = b[:, start : start + chunk].to(dtype)
        norm_a_parts.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot_parts = []
    for start in range(0, a.shape[1], chunk):
        x = a[:, start : start + chunk].to(dtype) / norm_a
        y = b[:, start : start + chunk].to(dtype) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    # nearly colinear (or antipodal) vectors: plain linear interpolation
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for start in range(0, a.shape[1], chunk):
        x = a[:, start : start + chunk].to(dtype)
        y = b[:, start : start + chunk].to(dtype)
        result[:, start : start + chunk] = coef_a * x + coef_b * y
    return result.reshape(v0.shape)[0]


def _task_arithmetic(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    variant: _TaskArithmeticVariant,
    shared: Mapping[str, Any],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """GeneralizedTaskArithmeticMerge.merge_group, reading cached task vectors."""
    if not deltas:
        return base
    stacked = base.new_empty((len(deltas), *base.shape))
    for index, (delta, density) in enumerate(zip(deltas, densities)):
        if variant.sparsification == "magnitude":
            delta = _magnitude(delta, density, shared["rescale"])
        elif variant.sparsification == "random":
            delta = _bernoulli(delta, density, shared["rescale"], generator)
        stacked[index] = delta
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    while stacked.dim() > w.dim():
        w.unsqueeze_(-1)
    stacked.mul_(w)
    if variant.consensus:
        mask_dtype = torch.int8 if shared["int8_mask"] else base.dtype
        mask = _sign_consensus(stacked, mask_dtype)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)  # the weights that survive the sign vote
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if shared["normalize"]:
        mixed /= divisor
    if shared["lambda"] != 1:
        mixed *= shared["lambda"]
    return (base + mixed).to(base.dtype)


def _sign_consensus(delta: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """get_mask(method="sum"): keep entries whose sign agrees with the sign of the weighted sum."""
    sign = delta.sign().to(mask_dtype)
    majority = (delta.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def _rescaled(
    tensor: torch.Tensor, mask: torch.Tensor, l1: bool, eps: float = 1e-7
) -> torch.Tensor:
    """sparsify.rescaled_masked_tensor with RescaleNorm.l1 (or none)."""
    masked = tensor * mask
    if not l1:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """sparsify.magnitude: keep the int(density * numel) largest magnitudes (at least one)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def _bernoulli(
    tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """sparsify.bernoulli (DARE), drawing from ``generator``."""
    if density >= 1:
        return tensor
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        work_dtype = tensor.dtype
    else:
        work_dtype = torch.float32  # torch.bernoulli lacks float16 on the CPU
    mask = torch.bernoulli(
        torch.full_like(tensor, fill_value=density, dtype=work_dtype), generator=generator
    )
    return _rescaled(tensor.to(work_dtype), mask, rescale).to(tensor.dtype)


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from mergekit.common import dtype_from_name

    return dtype_from_name(dtype)
