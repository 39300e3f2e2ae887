"""Baselines, held-out re-scoring and the comparison with paired standard errors (pure core)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.core.config import GenomeDefinition, TaskConfiguration
from evomerge.core.records import CandidateRecord, EvaluationSettings, candidate_key
from evomerge.core.references import (
    baseline_requests,
    fixed_weight_points,
    held_out_requests,
    paired_difference,
    top_candidates,
)
from evomerge.core.run_report import comparison_markdown, comparison_rows, comparison_summary
from evomerge.core.search_space import SearchSpace

TASKS = [TaskConfiguration(name="a"), TaskConfiguration(name="b", weight=0.5)]
HELD = [TaskConfiguration(name="a_test"), TaskConfiguration(name="b_test", weight=0.5)]
SETTINGS = EvaluationSettings(tasks=TASKS)
HELD_SETTINGS = EvaluationSettings(tasks=HELD)


def space() -> SearchSpace:
    genome = GenomeDefinition(
        models=["/m/shift", "/m/rev"], base_model="/m/base", merge_method="task_arithmetic", layer_granularity=2
    )
    return SearchSpace(genome, num_layers=4, dtype="float32")


def record(
    key,
    score,
    *,
    generation=0,
    index=0,
    kind="candidate",
    label="",
    held_out=False,
    search_key="",
    items=None,
    metrics=None,
):
    return CandidateRecord(
        key=key,
        generation=generation,
        index=index,
        vector=[],
        parameters={},
        merge_config={"k": key},
        status="ok" if score is not None else "failed",
        score=score,
        kind=kind,
        label=label,
        held_out=held_out,
        search_key=search_key,
        item_scores=items or {},
        metrics=metrics or {},
    )


def test_baselines_are_each_parent_passed_through_and_the_uniform_merge():
    s = space()
    requests = baseline_requests(s, SETTINGS, None, {})
    assert [r.label for r in requests] == ["parent base", "parent shift", "parent rev", "uniform merge"]
    assert requests[1].merge_config == {
        "merge_method": "passthrough",
        "models": [{"model": "/m/shift"}],
        "dtype": "float32",
    }
    uniform = requests[3]
    assert uniform.merge_config == s.decode(s.initial_point()) and uniform.vector == [0.5] * 4
    assert all(r.kind == "baseline" and not r.held_out and r.generation == -1 for r in requests)
    assert all(r.key == candidate_key(r.merge_config, SETTINGS) == r.search_key for r in requests)


def test_fixed_baselines_add_one_weight_per_model_from_the_grid_the_same_in_every_group():
    """task_arithmetic over two fine-tunes: every combination of 0.5 / 0.75 / 1.0 / 1.25 (one
    weight per model, the same in both layer groups) but 0.5 / 0.5, the uniform merge; over three,
    the same weight for all; a method whose weights are normalized (linear, ties by default) adds
    none."""
    s = space()
    requests = baseline_requests(s, SETTINGS, None, {}, fixed=True)
    fixed = requests[4:]
    grid = [(a, b) for a in (0.5, 0.75, 1.0, 1.25) for b in (0.5, 0.75, 1.0, 1.25) if (a, b) != (0.5, 0.5)]
    assert [r.label for r in fixed] == [f"fixed weight {a:g} / {b:g}" for a, b in grid]
    for request, (shift, rev) in zip(fixed, grid, strict=True):
        assert request.vector == [shift, rev] * 2 and request.merge_config == s.decode(np.array([shift, rev] * 2))
        weights = [
            (source["model"], source["parameters"]["weight"])
            for piece in request.merge_config["slices"]
            for source in piece["sources"]
            if "parameters" in source
        ]
        assert weights == [("/m/shift", shift), ("/m/rev", rev)] * 2
    assert len({r.key for r in requests}) == len(requests)
    three = GenomeDefinition(
        models=["/m/a", "/m/b", "/m/c"], base_model="/m/base", merge_method="task_arithmetic", layer_granularity=4
    )
    # three models: the uniform merge is weight 1/3 each, so all four weights of the grid remain
    assert [label for label, _ in fixed_weight_points(SearchSpace(three, 4))] == [
        f"fixed weight {w:g} / {w:g} / {w:g}" for w in (0.5, 0.75, 1.0, 1.25)
    ]
    for method, models in (("linear", ["/m/a", "/m/b"]), ("ties", ["/m/a", "/m/b"])):
        genome = GenomeDefinition(
            models=models, base_model="/m/base" if method == "ties" else None, merge_method=method
        )
        assert [r.label for r in baseline_requests(SearchSpace(genome, 4), SETTINGS, None, {}, fixed=True)][-1] == (
            "uniform merge"
        )


def test_with_held_out_tasks_each_baseline_is_also_scored_on_them_and_recorded_ones_are_skipped():
    s = space()
    requests = baseline_requests(s, SETTINGS, HELD_SETTINGS, {})
    assert len(requests) == 8
    held = [r for r in requests if r.held_out]
    assert [r.label for r in held] == ["parent base", "parent shift", "parent rev", "uniform merge"]
    for r in held:
        assert r.key == candidate_key(r.merge_config, HELD_SETTINGS) != r.search_key
        assert r.search_key == candidate_key(r.merge_config, SETTINGS)
    done = {r.key: record(r.key, 1.0) for r in requests[:3]}
    assert [r.key for r in baseline_requests(s, SETTINGS, HELD_SETTINGS, done)] == [r.key for r in requests[3:]]


def test_top_candidates_and_their_held_out_requests():
    records = {
        k: record(k, score, generation=g, index=i)
        for k, score, g, i in [
            ("k1", 0.5, 0, 0),
            ("k2", 0.9, 0, 1),
            ("k3", 0.9, 1, 0),
            ("k4", None, 1, 1),
            ("k5", 0.7, 1, 2),
        ]
    }
    top = top_candidates(records, 3)
    assert [r.key for r in top] == ["k2", "k3", "k5"], "best first; a tie goes to the earlier one"
    requests = held_out_requests(top, HELD_SETTINGS, {})
    assert [r.search_key for r in requests] == ["k2", "k3", "k5"]
    assert all(r.held_out and r.key == candidate_key({"k": r.search_key}, HELD_SETTINGS) for r in requests)
    already = {requests[0].key: record(requests[0].key, 1.0, held_out=True)}
    assert [r.search_key for r in held_out_requests(top, HELD_SETTINGS, already)] == ["k3", "k5"]


def test_paired_difference_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    a = {"a_test": rng.integers(0, 2, 200).astype(float).tolist(), "b_test": rng.random(100).tolist()}
    b = {"a_test": rng.integers(0, 2, 200).astype(float).tolist(), "b_test": rng.random(100).tolist()}
    d = paired_difference(a, b, HELD)
    da, db = np.subtract(a["a_test"], b["a_test"]), np.subtract(a["b_test"], b["b_test"])
    assert d.difference == pytest.approx(da.mean() + 0.5 * db.mean())
    assert d.standard_error == pytest.approx(math.sqrt(da.var(ddof=1) / 200 + 0.25 * db.var(ddof=1) / 100))
    assert d.items == 300 and d.z == pytest.approx(d.difference / d.standard_error)
    with pytest.raises(ValueError, match="a_test.*cannot be paired"):
        paired_difference({"a_test": [1.0, 0.0], "b_test": [1.0, 1.0]}, {"a_test": [1.0], "b_test": [1.0, 1.0]}, HELD)


def test_comparison_shows_gain_over_best_parent_and_held_out_differences():
    items_best = {"a_test": [1.0, 1.0, 1.0, 0.0], "b_test": [1.0, 1.0, 0.0, 1.0]}
    items_rev = {"a_test": [1.0, 0.0, 0.0, 0.0], "b_test": [1.0, 0.0, 0.0, 1.0]}
    items_close = {"a_test": [1.0, 1.0, 1.0, 0.0], "b_test": [1.0, 0.0, 0.0, 1.0]}
    candidates = {
        "c1": record("c1", 1.3, metrics={"a": {"acc,none": 0.9}, "b": {"acc,none": 0.8}}),
        "c2": record("c2", 1.1, index=1),
    }
    baselines = {
        "p1": record("p1", 1.2, kind="baseline", label="parent rev", index=1),
        "p0": record("p0", 0.4, kind="baseline", label="parent base", index=0),
        "u": record("u", 1.25, kind="baseline", label="uniform merge", index=2),
    }
    held = {
        "h1": record(
            "h1",
            1.0,
            held_out=True,
            search_key="c1",
            items=items_best,
            metrics={"a_test": {"acc,none": 0.75}, "b_test": {"acc,none": 0.5}},
        ),
        "h2": record("h2", 0.4, held_out=True, kind="baseline", label="parent rev", search_key="p1", items=items_rev),
        "h3": record(
            "h3", 0.9, held_out=True, kind="baseline", label="uniform merge", search_key="u", items=items_close
        ),
    }
    rows = comparison_rows(top_candidates(candidates, 2), baselines, held, TASKS, HELD)
    assert [r.label for r in rows] == ["evolved (best)", "evolved #2", "parent base", "parent rev", "uniform merge"]
    assert rows[0].held_out_score == 1.0 and rows[0].held_out_metrics == {
        "a_test acc,none": 0.75,
        "b_test acc,none": 0.5,
    }
    assert rows[1].held_out_score is None
    summary = comparison_summary(rows, HELD)
    assert summary["best_parent"] == "parent rev" and summary["gain_over_best_parent"] == pytest.approx(0.1)
    expected = paired_difference(items_best, items_rev, HELD)
    close = paired_difference(items_best, items_close, HELD)
    assert summary["held_out_vs_baselines"] == {
        "parent rev": {
            "difference": expected.difference,
            "standard_error": expected.standard_error,
            "standard_errors": expected.z,
            "items": 8,
        },
        "uniform merge": {
            "difference": close.difference,
            "standard_error": close.standard_error,
            "standard_errors": close.z,
            "items": 8,
        },
    }
    assert 0 < close.difference < expected.difference and summary["closest_baseline_held_out"] == "uniform merge"
    text = comparison_markdown(rows, TASKS, HELD)
    assert "| evolved (best) | 0.9000 | 0.8000 | 1.3000 | 0.7500 | 0.5000 | 1.0000 |" in text
    assert f"best candidate - parent rev: {expected.difference:+.4f}" in text
    assert f"against its closest baseline (uniform merge): {close.difference:+.4f} ({close.z:.1f} paired" in text
