"""The merge-method registry against mergekit 0.1.5's own method specs."""

import pytest
from mergekit import merge_methods as mergekit_methods
from mergekit.merge_methods.base import BasePolicy, ParameterScope

from evomerge.core import merge_methods
from evomerge.core.merge_methods import METHODS, NOT_SEARCHABLE, within_density_margin

BASE_POLICY = {
    "required": BasePolicy.REQUIRED,
    "optional": BasePolicy.OPTIONAL,
    "unused": BasePolicy.IGNORED,
    "first_model": BasePolicy.REQUIRED,  # slerp: the first model is the base when none is given
}


def test_every_mergekit_method_is_searchable_or_says_why_not():
    registered = {m.spec.name for m in mergekit_methods.registered_methods()}
    assert set(METHODS) | set(NOT_SEARCHABLE) == registered
    assert not set(METHODS) & set(NOT_SEARCHABLE)


@pytest.mark.parametrize("name", list(METHODS))
def test_entry_agrees_with_mergekits_spec(name):
    entry, spec = METHODS[name], mergekit_methods.get(name).spec
    scopes = {p.name: p.scope for p in spec.parameters}
    for p in entry.per_model:
        per_input = ParameterScope.INPUT if entry.base == "unused" else ParameterScope.NON_BASE
        assert scopes[p.name] == per_input, p.name
    for p in entry.per_group:
        assert scopes[p.name] == ParameterScope.SHARED, p.name
    for option, _ in entry.options:
        assert scopes[option] == ParameterScope.SHARED
    assert ("normalize" in scopes) == (entry.normalize_default is not None)
    assert spec.contract.base == BASE_POLICY[entry.base]
    contract = spec.contract
    assert entry.sources[0] >= contract.min_inputs
    if contract.max_inputs is not None:
        assert entry.sources[1] == contract.max_inputs
    if contract.min_non_base is not None:
        assert entry.non_base[0] >= contract.min_non_base
    if contract.max_non_base is not None:
        assert entry.non_base[1] == contract.max_non_base


def test_random_methods_are_the_ones_that_draw():
    sparsification = {
        m.spec.name: getattr(m, "sparsification_method", None) for m in mergekit_methods.registered_methods()
    }
    random = {n for n, s in sparsification.items() if s is not None and s.value in ("random", "della_magprune")}
    assert {n for n, m in METHODS.items() if m.random} == random


def test_unknown_and_unsearchable_methods_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown merge method 'frankenmerge'; use one of: linear"):
        merge_methods.get("frankenmerge")
    with pytest.raises(ValueError, match="'model_stock' cannot be searched: it takes no weights"):
        merge_methods.get("model_stock")


@pytest.mark.parametrize(
    "value, density, expected",
    [
        (0.15, 1.0, 0.0),  # density 1: mergekit returns before reading epsilon
        (0.15, 0.0, 0.0),
        (0.15, 0.5, 0.15),
        (0.5, 0.9, None),  # capped below 1 - density
        (0.5, 0.2, None),  # capped below density
        (0.3, 1 - 2**-53, None),  # next to 1: still strictly inside
    ],
)
def test_della_epsilon_keeps_density_plus_minus_epsilon_inside_0_1(value, density, expected):
    epsilon = within_density_margin(value, density)
    if expected is not None:
        assert epsilon == expected
    else:
        assert 0 < epsilon < value
        assert density - epsilon > 0 and density + epsilon < 1
    assert within_density_margin(epsilon, density) == epsilon  # a fixed point
