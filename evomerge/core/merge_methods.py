"""The merge-method registry: every fact evomerge needs about a mergekit method, in one place.

One frozen ``MergeMethod`` per mergekit method name: which values the search sets and how a search
vector's entry becomes one (``Parameter``), which models the method needs, and how the merge
configuration is written. ``core/config.py`` validates a genome against it, ``core/search_space.py``
builds the vector layout and the mergekit configuration from it, and the backends hand its
``name`` to mergekit (``run_merge`` on disk, ``mergekit.merge_methods`` kernels in memory); the
core names mergekit's methods by string and never imports mergekit.

The task-arithmetic family (mergekit's ``GeneralizedTaskArithmeticMerge``: task_arithmetic, ties,
dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear) is one configured
shape, ``_task_arithmetic``, as in mergekit: they differ by sparsification (the extra per-model
parameter: density, gamma, epsilon) and by mergekit's ``normalize`` default.

Methods mergekit 0.1.5 ships that evomerge does not search are listed in ``NOT_SEARCHABLE`` with
the reason, so that a config naming one is refused with it rather than accepted.

>>> entry = METHODS["della"]
>>> [p.name for p in entry.per_model], entry.base, entry.normalize_default
(['weight', 'density', 'epsilon'], 'required', True)
>>> entry.per_model[2].start, entry.random
(0.15, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Decoding = Literal["weight", "abs_fraction", "fraction"]
Base = Literal["required", "optional", "unused", "first_model"]


@dataclass(frozen=True)
class Parameter:
    """One searched mergekit parameter.

    ``start``: the value the search starts from, a number or ``"1/k"`` (k = number of models
    with parameters: the uniform merge). ``decoding``: how a vector entry x becomes the value
    mergekit gets:

    - ``weight``: ``|x|``, or x itself with ``allow_negative_weights`` (upstream's rule);
    - ``abs_fraction``: ``clip(|x|, 0, 1)`` (upstream's rule for density);
    - ``fraction``: ``clip(x, 0, 1)`` (upstream's rule for slerp's t).

    ``lower`` / ``upper``: the parameter's natural domain (``None``: unbounded), for an optimizer
    that handles bounds itself. ``within_density_margin``: the value is also capped so that
    density - value > 0 and density + value < 1 (della's epsilon; mergekit raises otherwise).
    """

    name: str
    start: float | Literal["1/k"]
    decoding: Decoding
    lower: float | None = 0.0
    upper: float | None = 1.0
    within_density_margin: bool = False
    description: str = ""

    def start_value(self, models_with_parameters: int) -> float:
        if self.start == "1/k":
            return 1.0 / max(1, models_with_parameters)
        return float(self.start)

    def decode(self, x: float, allow_negative_weights: bool = False) -> float:
        if self.decoding == "weight":
            return x if allow_negative_weights else abs(x)
        if self.decoding == "abs_fraction":
            return min(abs(x), 1.0)
        return min(max(x, 0.0), 1.0)

    def domain(self, allow_negative_weights: bool = False) -> tuple[float | None, float | None]:
        if self.decoding == "weight" and allow_negative_weights:
            return (None, self.upper)
        return (self.lower, self.upper)


@dataclass(frozen=True)
class MergeMethod:
    """What evomerge knows about one mergekit merge method.

    ``per_model``: parameters each model with parameters gets, per layer group (and filter).
    ``per_group``: method-wide parameters, one value per layer group (written on the slice).
    ``base``: ``required`` (genome.base_model must be given; it gets no parameters),
    ``optional`` (with a base the method works on task vectors; the base gets no parameters),
    ``unused`` (no base: every listed model gets parameters), ``first_model`` (slerp: the
    base, or the first model when none is given, is the start of the interpolation).
    ``sources``: (min, max) distinct models including the base; ``non_base``: (min, max) models
    besides the base (``None``: no maximum). ``normalize_default``: mergekit's default for
    ``normalize``, except for dare_ties, where it is upstream mergekit-evolve's (true); ``None``:
    the method has no such option, and genome.normalize is ignored, as upstream did.
    ``options``: mergekit parameters written as is (int8_mask: a memory saving, same result).
    ``random``: the method draws from torch's global generator (the run's seed
    makes it repeatable; in memory it is seeded the way ``run_merge`` seeds it).
    """

    name: str
    per_model: tuple[Parameter, ...] = ()
    per_group: tuple[Parameter, ...] = ()
    base: Base = "unused"
    sources: tuple[int, int | None] = (1, None)
    non_base: tuple[int, int | None] = (1, None)
    normalize_default: bool | None = None
    options: tuple[tuple[str, object], ...] = ()
    random: bool = False
    count_hint: str = ""  # what to do when the model count is wrong

    def parameter(self, name: str) -> Parameter:
        return next(p for p in (*self.per_group, *self.per_model) if p.name == name)

    @property
    def base_gets_parameters(self) -> bool:
        return self.base == "unused"


@dataclass(frozen=True)
class NotSearchable:
    name: str
    reason: str


# --- parameters ---------------------------------------------------------------------------------
WEIGHT = Parameter("weight", "1/k", "weight", lower=0.0, upper=None, description="the model's weight")
DENSITY = Parameter("density", 1.0, "abs_fraction", description="fraction of the task vector kept")
GAMMA = Parameter("gamma", 0.01, "abs_fraction", description="fraction of the largest task-vector entries dropped")
EPSILON = Parameter(
    "epsilon",
    0.15,
    "abs_fraction",
    upper=0.5,
    within_density_margin=True,
    description="spread of the keep probability around the density, by magnitude rank",
)
T = Parameter("t", 0.5, "fraction", description="interpolation from the base (0) to the other model (1)")
SELECT_TOPK = Parameter("select_topk", 1.0, "abs_fraction", description="fraction of entries kept, by variance")

_INT8_MASK = (("int8_mask", True),)


def _task_arithmetic(
    name: str, sparsification: tuple[Parameter, ...], normalize: bool, random: bool = False
) -> MergeMethod:
    """A configured instance of mergekit's GeneralizedTaskArithmeticMerge."""
    return MergeMethod(
        name=name,
        per_model=(WEIGHT, *sparsification),
        base="required",
        normalize_default=normalize,
        options=_INT8_MASK,
        random=random,
    )


_METHODS = (
    MergeMethod(name="linear", per_model=(WEIGHT,), normalize_default=True),
    _task_arithmetic("task_arithmetic", (), normalize=False),
    _task_arithmetic("ties", (DENSITY,), normalize=True),
    # mergekit's default is normalize false; upstream mergekit-evolve set it true for dare_ties
    _task_arithmetic("dare_ties", (DENSITY,), normalize=True, random=True),
    _task_arithmetic("dare_linear", (DENSITY,), normalize=False, random=True),
    _task_arithmetic("breadcrumbs", (DENSITY, GAMMA), normalize=False),
    _task_arithmetic("breadcrumbs_ties", (DENSITY, GAMMA), normalize=False),
    _task_arithmetic("della", (DENSITY, EPSILON), normalize=True, random=True),
    _task_arithmetic("della_linear", (DENSITY, EPSILON), normalize=False, random=True),
    MergeMethod(
        name="slerp",
        per_group=(T,),
        base="first_model",
        sources=(2, 2),
        non_base=(0, None),
        count_hint="list two models, or use 'linear' or 'task_arithmetic'",
    ),
    MergeMethod(
        name="nuslerp",
        per_model=(WEIGHT,),
        base="optional",
        non_base=(2, 2),
        count_hint="list two models besides the base, or use 'multislerp'",
    ),
    MergeMethod(name="multislerp", per_model=(WEIGHT,), base="optional"),
    MergeMethod(name="sce", per_group=(SELECT_TOPK,), base="required", options=_INT8_MASK),
)
METHODS: dict[str, MergeMethod] = {m.name: m for m in _METHODS}

NOT_SEARCHABLE: dict[str, NotSearchable] = {
    n.name: n
    for n in (
        NotSearchable(
            "model_stock",
            "it takes no weights: mergekit computes the interpolation from the models' geometry",
        ),
        NotSearchable("karcher", "it takes no weights (its max_iter and tol only set convergence)"),
        NotSearchable("arcee_fusion", "it takes no parameters"),
        NotSearchable("passthrough", "it copies one model and merges nothing"),
        NotSearchable(
            "nearswap",
            "its t is a threshold in the units of the weights, with no scale-free start value",
        ),
        NotSearchable("ram", "its epsilon is a threshold in the units of the weights"),
        NotSearchable("ramplus_tl", "its r, alpha and epsilon are thresholds, not per-model parameters"),
    )
}


def get(name: str) -> MergeMethod:
    """The registry entry, or a ``ValueError`` that says what to use instead."""
    if name in METHODS:
        return METHODS[name]
    if name in NOT_SEARCHABLE:
        raise ValueError(
            f"merge_method {name!r} cannot be searched: {NOT_SEARCHABLE[name].reason}; merge it "
            f"once with mergekit-yaml, or search one of: {', '.join(METHODS)}"
        )
    raise ValueError(f"unknown merge method {name!r}; use one of: {', '.join(METHODS)}")


def within_density_margin(value: float, density: float) -> float:
    """The largest value <= ``value`` with density - value > 0 and density + value < 1, in
    Python floats as mergekit checks it (della_magprune); 0 where the density is 0 or 1
    (mergekit then returns before reading epsilon)."""
    if density <= 0 or density >= 1:
        return 0.0
    value = min(value, density, 1 - density)
    while value > 0 and not (density - value > 0 and density + value < 1):
        value /= 2  # within ~60 halvings even next to 0 or 1 (value can reach 0, always valid)
    return value
