"""CMA-ES ask/tell: seeded, private randomness, strict tell."""

import numpy as np
import pytest

from evomerge.core.optimizer import CmaOptimizer


def trajectory(seed, disturb_global=None, generations=5, dim=4):
    if disturb_global is not None:
        np.random.seed(disturb_global)
    opt = CmaOptimizer(np.full(dim, 0.5), 0.2, seed=seed, popsize=6)
    asked = []
    for _ in range(generations):
        X = opt.ask()
        np.random.rand(7)  # other code using numpy's global generator must not matter
        asked.append(X)
        opt.tell(X, [-float(((x - 0.1) ** 2).sum()) for x in X])
    return np.array(asked), opt


def test_same_seed_same_trajectory_whatever_the_global_generator_does():
    a, _ = trajectory(3, disturb_global=1)
    b, _ = trajectory(3, disturb_global=99)
    assert np.array_equal(a, b)


def test_other_seed_other_trajectory():
    a, _ = trajectory(3)
    b, _ = trajectory(4)
    assert not np.array_equal(a, b)


def test_it_maximizes_the_score():
    _, opt = trajectory(0, generations=40)
    assert np.abs(opt.mean - 0.1).max() < 0.05


def test_one_dimensional_problems_work():
    opt = CmaOptimizer([0.5], 0.3, seed=0, popsize=4)
    for _ in range(30):
        X = opt.ask()
        assert X.shape == (4, 1)
        opt.tell(X, [-(x[0] - 0.8) ** 2 for x in X])
    assert abs(opt.mean[0] - 0.8) < 0.05


def test_tell_demands_the_asked_candidates_and_finite_scores():
    opt = CmaOptimizer([0.5, 0.5], 0.3, seed=0, popsize=4)
    with pytest.raises(RuntimeError, match="without ask"):
        opt.tell(np.zeros((4, 2)), [0, 0, 0, 0])
    X = opt.ask()
    with pytest.raises(RuntimeError, match="twice"):
        opt.ask()
    with pytest.raises(ValueError, match="exactly the candidates"):
        opt.tell(X + 1, [0, 0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        opt.tell(X, [0, float("nan"), 0, 0])
    opt.tell(X, [0, 1, 2, 3])
    assert opt.generation == 1


def test_default_population_size_is_pycmas():
    assert CmaOptimizer(np.zeros(12), 0.2, seed=0).popsize == 4 + int(3 * np.log(12))
