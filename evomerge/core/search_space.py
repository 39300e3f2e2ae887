"""The search space: a real vector <-> a mergekit merge configuration.

Layout. The layers are cut into groups of ``layer_granularity`` consecutive layers (0: one group
for all). Each group has one value per (model, filter set, parameter) for the method's per-model
parameters, and one value per method-wide parameter (slerp's t, sce's select_topk). Which
parameters a method has, their start values, decoding and domains are the merge-method registry's
(``evomerge/core/merge_methods.py``; the README's "What is searched" table lists them):

==================  =======================================  ==================================
merge_method        models with parameters                   parameters (start value)
==================  =======================================  ==================================
linear              every model in ``models``                weight (1/k)
task_arithmetic     ``models`` except the base model         weight (1/k)
ties, dare_ties     ``models`` except the base model         weight (1/k), density (1.0)
slerp               -- (two sources, one value per group)    t (0.5)
==================  =======================================  ==================================

(and so on for the newer methods). k is the number of weighted models, so the start point is
the uniform merge. The base model of a task-arithmetic method carries no parameter: its task
vector is zero, so a weight on it would be a dimension CMA-ES explores for nothing (upstream kept
it; this is a deliberate difference). With ``filters`` (e.g. ``[self_attn, mlp]``) each model gets
one value per filter plus one for all other tensors, in that order.

Decoding follows upstream ``mergekit.evo.genome``: a weight is taken as its absolute value unless
``allow_negative_weights``; a density (and gamma, select_topk) is ``clip(|x|, 0, 1)``; slerp's t is
``clip(x, 0, 1)``; della's epsilon is ``clip(|x|, 0, 1)`` capped so that density +- epsilon stays
inside (0, 1). ``canonical(x)`` applies exactly these maps, and ``encode(decode(x)) ==
canonical(x)``.

Tensors outside the layer blocks. A ``slices`` configuration gives them, as mergekit does, the
parameters of the first group (token embeddings) and of the last group (final norm, lm_head). With
``smooth: true`` the parameters are gradients over layers, and mergekit 0.1.5 applies the
gradient's first value to the embeddings and also to the final norm and lm_head (checked against
its output in tests/test_merger_memory.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

from evomerge.core.config import GenomeDefinition
from evomerge.core.merge_methods import within_density_margin

# A search vector as CMA-ES asks it (an array) or as a suggestion or record carries it (floats).
VectorLike: TypeAlias = Sequence[float] | NDArray[np.float64]
# One entry's value, looked up by what it sets: (group, model, filter, parameter), as in Coordinate.
_ValueTable: TypeAlias = dict[tuple[int, str | None, str | None, str], float]


@dataclass(frozen=True)
class Coordinate:
    """What one entry of the search vector sets."""

    group: int
    model: str | None  # None for a method-wide parameter (slerp's t)
    filter: str | None  # None: every tensor not matched by a named filter
    parameter: str

    def label(self, space: SearchSpace) -> str:
        first, last = space.group_layers(self.group)
        parts = [f"layers {first}-{last - 1}"]
        if self.model is not None:
            parts.append(space.model_label(self.model))
        if self.filter is not None:
            parts.append(self.filter)
        parts.append(self.parameter)
        return "/".join(parts)


class SearchSpace:
    """Maps CMA-ES vectors to mergekit configurations (plain dicts, YAML-ready) and back.

    >>> from evomerge.core.config import GenomeDefinition
    >>> genome = GenomeDefinition(models=["/m/a", "/m/b"], merge_method="linear",
    ...                           layer_granularity=2)
    >>> space = SearchSpace(genome, num_layers=4)
    >>> space.dimension, space.initial_point().tolist()
    (4, [0.5, 0.5, 0.5, 0.5])
    >>> space.decode(space.initial_point())["slices"][1]["sources"][0]["layer_range"]
    [2, 4]
    """

    def __init__(self, genome: GenomeDefinition, num_layers: int, dtype: str = "bfloat16"):
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        granularity = genome.layer_granularity
        if granularity > 0 and num_layers % granularity != 0:
            divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
            raise ValueError(
                f"genome.layer_granularity {granularity} does not divide the models' "
                f"{num_layers} layers; use 0 (one group) or one of {divisors}"
            )
        self.genome = genome
        self.method = genome.method
        self.num_layers = num_layers
        self.dtype = dtype
        self.layers_per_group = granularity if granularity > 0 else num_layers
        self.num_groups = num_layers // self.layers_per_group
        self.parameters_per_model = tuple(p.name for p in self.method.per_model)
        self.filter_sets: tuple[str | None, ...] = (*(genome.filters or []), None)
        self.weighted_models: tuple[str, ...] = tuple(genome.non_base_models) if self.method.per_model else ()
        if self.method.base == "first_model":
            # slerp interpolates from the base (t = 0) to the other model (t = 1)
            base = genome.effective_base_model
            assert base is not None  # slerp's base falls back to the first model
            self.slerp_sources: tuple[str, str] = (base, genome.non_base_models[0])
        coords = [
            coordinate
            for g in range(self.num_groups)
            for coordinate in (
                *(Coordinate(g, None, None, p.name) for p in self.method.per_group),
                *(
                    Coordinate(g, m, f, p)
                    for m in self.weighted_models
                    for f in self.filter_sets
                    for p in self.parameters_per_model
                ),
            )
        ]
        self.coordinates: tuple[Coordinate, ...] = tuple(coords)
        self._parameters = [self.method.parameter(c.parameter) for c in self.coordinates]
        index = {(c.group, c.model, c.filter, c.parameter): i for i, c in enumerate(coords)}
        # (capped entry, the density it is capped by): della's epsilon
        self._density_margins = [
            (i, index[(c.group, c.model, c.filter, "density")])
            for i, (c, p) in enumerate(zip(coords, self._parameters, strict=True))
            if p.within_density_margin
        ]
        self._labels = _short_labels([*genome.models, *([genome.base_model] if genome.base_model else [])])

    # --- shape -----------------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        return len(self.coordinates)

    def group_layers(self, group: int) -> tuple[int, int]:
        """Half-open layer range ``[first, last)`` of a group."""
        return group * self.layers_per_group, (group + 1) * self.layers_per_group

    def model_label(self, model: str) -> str:
        return self._labels[model]

    def labels(self) -> list[str]:
        return [c.label(self) for c in self.coordinates]

    # --- points ----------------------------------------------------------------------------
    def initial_point(self, rng: np.random.Generator | None = None) -> NDArray[np.float64]:
        """The uniform merge; with ``rng`` (config ``random_init: true``) uniform in [0, 1)."""
        if rng is not None:
            return rng.random(self.dimension)
        k = len(self.weighted_models)
        return np.array([p.start_value(k) for p in self._parameters], dtype=float)

    def canonical(self, x: VectorLike) -> NDArray[np.float64]:
        """The values the merge will use, in vector form (see the module docstring)."""
        x = self._as_vector(x)
        negative = self.genome.allow_negative_weights
        out = np.array([p.decode(float(v), negative) for p, v in zip(self._parameters, x, strict=True)])
        for i, density in self._density_margins:
            out[i] = within_density_margin(float(out[i]), float(out[density]))
        return out

    def domains(self) -> list[tuple[float | None, float | None]]:
        """Each coordinate's natural (lower, upper) domain, ``None`` where unbounded. (Capped
        values such as della's epsilon also depend on another coordinate; see canonical.)"""
        negative = self.genome.allow_negative_weights
        return [p.domain(negative) for p in self._parameters]

    def box(self) -> tuple[list[float], list[float]]:
        """The search box, ``(lower, upper)``: each coordinate's domain, an unbounded weight taken
        within 1 of zero ([0, 1], or [-1, 1] with negative weights allowed: the range a user
        would try by hand). cma-es-box clips its suggestions into it; random search draws in it.

        >>> from evomerge.core.config import GenomeDefinition
        >>> genome = GenomeDefinition(models=["/m/a", "/m/b"], base_model="/m/base",
        ...                           merge_method="ties", layer_granularity=0)
        >>> SearchSpace(genome, num_layers=2).box()
        ([0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
        """
        domains = self.domains()
        return [-1.0 if lo is None else lo for lo, _ in domains], [1.0 if hi is None else hi for _, hi in domains]

    # --- vector -> configuration -----------------------------------------------------------
    def decode(self, x: VectorLike) -> dict[str, Any]:
        """A mergekit merge configuration as a plain dict (``mergekit-yaml`` accepts its YAML)."""
        values = self.canonical(x)
        genome = self.genome
        config: dict[str, Any] = {"merge_method": genome.merge_method}
        base = genome.effective_base_model
        if base is not None:
            config["base_model"] = base
        if genome.smooth:
            config["models"] = self._smooth_models(values)
        else:
            config["slices"] = self._discrete_slices(values)
        parameters: dict[str, Any] = {}
        if genome.effective_normalize is not None:
            parameters["normalize"] = genome.effective_normalize
        parameters.update(self.method.options)
        if parameters:
            config["parameters"] = parameters
        config["dtype"] = self.dtype
        if genome.tokenizer_source is not None:
            config["tokenizer_source"] = genome.tokenizer_source
        return config

    def named_parameters(self, x: VectorLike) -> dict[str, float]:
        """``{"layers 0-1/model_a/weight": 0.5, ...}``: the decoded values, for records and tables."""
        return dict(zip(self.labels(), (float(v) for v in self.canonical(x)), strict=True))

    def _value_table(self, values: NDArray[np.float64]) -> _ValueTable:
        return {
            (c.group, c.model, c.filter, c.parameter): float(v) for c, v in zip(self.coordinates, values, strict=True)
        }

    def _model_parameters(self, table: _ValueTable, groups: list[int], model: str) -> dict[str, Any]:
        """One model's parameters over the given groups: a scalar per group, or a gradient list
        (smooth), each possibly split by filter as mergekit's ``[{filter, value}, ...]``."""
        params: dict[str, Any] = {}
        for p in self.parameters_per_model:
            per_filter = []
            for f in self.filter_sets:
                series = [table[(g, model, f, p)] for g in groups]
                per_filter.append((f, series[0] if len(series) == 1 else series))
            if len(per_filter) == 1:
                params[p] = per_filter[0][1]
            else:
                params[p] = [({"filter": f, "value": v} if f is not None else {"value": v}) for f, v in per_filter]
        return params

    def _source_models(self) -> list[str]:
        """The models of a slice, in order: slerp's base first; else the listed models, then the
        base if it is not listed."""
        if self.method.base == "first_model":
            return list(self.slerp_sources)
        return self.genome.sources

    def _discrete_slices(self, values: NDArray[np.float64]) -> list[dict[str, Any]]:
        table = self._value_table(values)
        slices = []
        for g in range(self.num_groups):
            sources = []
            for model in self._source_models():
                source: dict[str, Any] = {"model": model, "layer_range": list(self.group_layers(g))}
                if model in self.weighted_models:
                    source["parameters"] = self._model_parameters(table, [g], model)
                sources.append(source)
            slice_: dict[str, Any] = {"sources": sources}
            if self.method.per_group:
                shared = {p.name: table[(g, None, None, p.name)] for p in self.method.per_group}
                if "t" in shared and self.genome.tokenizer_source is not None:
                    # mergekit merges tokenizers by source weight: give it the interpolation's
                    sources[0]["parameters"] = {"weight": 1.0 - shared["t"]}
                    sources[1]["parameters"] = {"weight": shared["t"]}
                slice_["parameters"] = shared
            slices.append(slice_)
        return slices

    def _smooth_models(self, values: NDArray[np.float64]) -> list[dict[str, Any]]:
        table = self._value_table(values)
        groups = list(range(self.num_groups))
        models = []
        for model in self._source_models():
            entry: dict[str, Any] = {"model": model}
            if model in self.weighted_models:
                entry["parameters"] = self._model_parameters(table, groups, model)
            models.append(entry)
        return models

    # --- configuration -> vector -----------------------------------------------------------
    def encode(self, config: dict[str, Any]) -> NDArray[np.float64]:
        """The vector whose decoding is ``config`` (for configurations this space produces)."""
        if config.get("merge_method") != self.genome.merge_method:
            raise ValueError(
                f"configuration uses merge_method {config.get('merge_method')!r}, "
                f"this search space {self.genome.merge_method!r}"
            )
        table: _ValueTable = {}
        if self.genome.smooth:
            for entry in config["models"]:
                if entry["model"] in self.weighted_models:
                    self._read_parameters(table, list(range(self.num_groups)), entry)
        else:
            for g, slice_ in enumerate(config["slices"]):
                for p in self.method.per_group:
                    table[(g, None, None, p.name)] = float(slice_["parameters"][p.name])
                for source in slice_["sources"]:
                    if source["model"] in self.weighted_models:
                        self._read_parameters(table, [g], source)
        return np.array([table[(c.group, c.model, c.filter, c.parameter)] for c in self.coordinates])

    def _read_parameters(self, table: _ValueTable, groups: list[int], entry: dict[str, Any]) -> None:
        model = entry["model"]
        for p, setting in entry["parameters"].items():
            per_filter = (
                {item.get("filter"): item["value"] for item in setting}
                if isinstance(setting, list) and setting and isinstance(setting[0], dict)
                else {None: setting}
            )
            for f, value in per_filter.items():
                series = value if isinstance(value, list) else [value]
                for g, v in zip(groups, series, strict=True):
                    table[(g, model, f, p)] = float(v)

    def _as_vector(self, x: VectorLike) -> NDArray[np.float64]:
        x = np.asarray(x, dtype=float).reshape(-1)
        if x.shape != (self.dimension,):
            raise ValueError(f"expected a vector of {self.dimension} values, got {x.shape[0]}")
        if not np.all(np.isfinite(x)):
            raise ValueError("search vector holds a NaN or infinity")
        return x


def _short_labels(models: list[str]) -> dict[str, str]:
    """Readable, unique names for model references (the folder name where that is unique)."""
    labels: dict[str, str] = {}
    for model in dict.fromkeys(models):
        base = os.path.basename(os.path.normpath(model.split("@")[0])) or model
        label, n = base, 2
        while label in labels.values():
            label, n = f"{base}_{n}", n + 1
        labels[model] = label
    return labels


def default_popsize(dimension: int) -> int:
    """pycma's default population size, 4 + floor(3 ln n)."""
    return 4 + int(3 * math.log(max(dimension, 1)))
